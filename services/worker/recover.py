"""A run whose every checkpoint is damaged starts over instead of failing its job (issue 33's soak: a corrupted
``last.pt`` with no ``previous.pt`` failed the job with torch's "invalid header or archive is corrupted").

The trainer falls back from ``last.pt`` to ``previous.pt`` itself (excb.training.checkpoint.load_resumable); when
neither reads, the worker moves the run's outputs aside as ``overwrite=true`` does (excb.training.rerun.set_aside:
``RUN/replaced/STAMP/``, nothing deleted) before the trainer starts, so the run trains again from step 0 (or from
its ``checkpoint=`` warm start). ``resume=must`` is left alone: the user asked for that checkpoint or an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from excb.training.checkpoint import LAST, PREVIOUS, checkpoint_dir, damage
from excb.training.rerun import set_aside


@dataclass
class SetAside:
    """Where the damaged run went and why, for job.log and the worker's event line."""

    dest: Path
    reasons: str

    def message(self, run_dir: Path, config: dict[str, Any]) -> str:
        start = f"its warm start ({config['checkpoint']})" if config.get("checkpoint") else "step 0"
        return (f"checkpoint damaged ({self.reasons}) and no readable earlier one: the run starts over from {start}; "
                f"its previous files were moved to {self.dest.relative_to(run_dir)}")


def set_aside_if_unreadable(run_dir: Path, config: dict[str, Any]) -> SetAside | None:
    """Move the run's outputs aside when it has checkpoints and none of them reads; None otherwise (no checkpoint,
    a readable one, or ``resume=must``)."""
    if config.get("resume") == "must":
        return None
    folder = checkpoint_dir(run_dir)
    present = [p for p in (folder / LAST, folder / PREVIOUS) if p.is_file()]
    reasons = []
    for path in present:
        why = damage(path)
        if why is None:
            return None
        reasons.append(f"{path.name}: {why}")
    if not reasons:
        return None
    dest = set_aside(run_dir)
    return SetAside(dest, "; ".join(reasons)) if dest is not None else None
