"""A trained run's teacher, rebuilt from its checkpoint: the one loader behind ``excb eval``, ``excb export``,
the weights export and the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from excb.config import validate
from excb.models import ExCBModel, build_model
from excb.training.checkpoint import CHECKPOINT_DIR, LAST, latest_checkpoint, load_checkpoint


class Teacher(NamedTuple):
    """A run's teacher as loaded for evaluation, export or serving benchmarks."""

    cfg: Any
    model: ExCBModel
    checkpoint: dict[str, Any]
    path: Path

    @property
    def info(self) -> dict[str, Any]:
        """Where the weights came from, for reports (``excb eval --json``)."""
        return {"checkpoint": str(self.path.resolve()), "step": int(self.checkpoint.get("step", 0))}


def load_teacher(source: str | os.PathLike[str], device: str | torch.device = "cpu",
                 require: tuple[str, ...] = ("config", "teacher")) -> Teacher:
    """Run dir or checkpoint -> ``Teacher(cfg, eval-mode teacher on device, checkpoint dict, its path)``.

    The one loader behind ``excb eval``, ``excb export`` and the weights export: clear errors for a missing
    run, a run without a checkpoint, or a checkpoint without the parts the caller needs.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run directory or checkpoint")
    ckpt_path = latest_checkpoint(path)
    if ckpt_path is None:
        raise FileNotFoundError(f"{path}: no checkpoint found (expected {CHECKPOINT_DIR}/{LAST})")
    ckpt = load_checkpoint(ckpt_path)
    for key in require:
        if key not in ckpt:
            raise ValueError(f"{ckpt_path}: checkpoint lacks {key!r}")
    cfg = validate(ckpt["config"])
    model = build_model(cfg, teacher=True)
    model.load_state_dict(ckpt["teacher"])
    model.to(device).eval()
    return Teacher(cfg, model, ckpt, ckpt_path)
