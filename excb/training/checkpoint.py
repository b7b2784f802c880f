"""Owns checkpoint files: atomic saves, ``weights_only`` loads, where the last one is, the run-dir fence.

Building a model from one is excb.training.teacher."""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from excb.fileio import atomic_write

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
PREVIOUS = "previous.pt"  # the checkpoint before last.pt: resume falls back to it when last.pt is unreadable
# What torch.load raises on a truncated or damaged file. A refused pickle (UnpicklingError) is not damage: it
# stays an error rather than silently resuming from an older file.
DAMAGED = (RuntimeError, EOFError, zipfile.BadZipFile, OSError)

log = logging.getLogger("excb.checkpoint")


def save_checkpoint(path: str | Path, state: dict[str, Any], keep_previous: bool = False) -> Path:
    """Atomic (excb.fileio): a crash or a full disk mid-write leaves the previous checkpoint intact
    (reliability.md row 14). ``keep_previous`` first hard-links the current file to ``previous.pt``, so the
    last two checkpoints survive even a file damaged after it was written (disk errors, a bad copy)."""
    path = Path(path)
    if keep_previous and path.exists():
        tmp = path.with_name(f".{PREVIOUS}.link")
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)
        os.replace(tmp, path.with_name(PREVIOUS))
    return atomic_write(path, lambda fh: torch.save(state, fh))


FENCE_FILE = "fence"          # the newest writer's token, written by whoever starts an attempt on the run
FENCE_ENV = "EXCB_FENCE_TOKEN"  # this process's token: it may write checkpoints while no newer token exists


class FencedOut(RuntimeError):
    """A newer attempt owns this run directory: this (stale) trainer must not write another checkpoint."""


def write_fence(run_dir: str | Path, token: int) -> None:
    """Claim the run directory for the attempt holding ``token`` (a monotonically increasing lease token)."""
    atomic_write(Path(run_dir) / FENCE_FILE, str(int(token)))


def check_fence(run_dir: str | Path) -> None:
    """Raise :class:`FencedOut` when a newer token than ``$EXCB_FENCE_TOKEN`` has claimed ``run_dir``.

    The DB commit of a stale worker is fenced by its lease token; this fences its checkpoint *file* writes too
    (reliability.md row 3): a redelivered job's old trainer, still running, cannot overwrite the checkpoint
    the new attempt resumes from. Without the variable (plain ``excb train``) there is no fence."""
    mine = os.environ.get(FENCE_ENV)
    if not mine:
        return
    try:
        newest = int((Path(run_dir) / FENCE_FILE).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return
    if newest > int(mine):
        raise FencedOut(f"{run_dir} belongs to a newer attempt (token {newest} > {mine}); not writing")


def load_resumable(run_dir: str | Path, map_location: str | torch.device = "cpu"
                   ) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint of a run (last.pt, else previous.pt), or None when it has none."""
    folder = checkpoint_dir(run_dir)
    candidates = [p for p in (folder / LAST, folder / PREVIOUS) if p.is_file()]
    for i, path in enumerate(candidates):
        try:
            why = damage(path)  # torch.load reads garbage inside a tensor's bytes as weights; the CRCs do not
            if why is not None:
                raise RuntimeError(f"damaged archive: {why}")
            return load_checkpoint(path, map_location), path
        except DAMAGED as exc:
            if i + 1 == len(candidates):
                raise
            log.warning("checkpoint %s is unreadable (%s); resuming from %s", path, exc, candidates[i + 1])
    return None


def damage(path: str | Path) -> str | None:
    """Why a checkpoint file cannot be loaded, found without unpickling or holding it in memory (the zip
    structure torch.save writes, and every member's CRC); None when it reads whole. For a worker deciding, before
    its trainer starts, whether a run still has a checkpoint to resume from."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"{bad} fails its CRC check" if bad else None


def has_checkpoint(run_dir: str | Path) -> bool:
    folder = checkpoint_dir(run_dir)
    return (folder / LAST).is_file() or (folder / PREVIOUS).is_file()


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
