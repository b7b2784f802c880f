"""Atomic checkpoints with everything needed for exact resume; loads are ``weights_only``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write to a temp file in the same directory, fsync, ``os.replace``, fsync the directory.

    A crash or a full disk mid-write leaves the previous checkpoint intact (reliability.md row 14).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``: a crafted pickle is refused, never executed."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def latest_checkpoint(run_dir_or_file: str | Path) -> Path | None:
    """The checkpoint to resume/export from: the file itself, or ``RUN_DIR/checkpoints/last.pt``."""
    p = Path(run_dir_or_file)
    if p.is_file():
        return p
    last = checkpoint_dir(p) / LAST
    return last if last.is_file() else None


def load_teacher(source: str | Path, device: str | torch.device = "cpu",
                 require: tuple[str, ...] = ("config", "teacher")) -> tuple[Any, torch.nn.Module, dict[str, Any], Path]:
    """Run dir or checkpoint -> (config, eval-mode teacher on ``device``, the checkpoint dict, its path).

    The one loader behind ``excb eval`` and ``excb export``: clear errors for a missing run, a run without a
    checkpoint, or a checkpoint without the parts the caller needs.
    """
    from excb.config import validate
    from excb.models import build_model

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
    return cfg, model, ckpt, ckpt_path
