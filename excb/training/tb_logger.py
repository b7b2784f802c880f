"""``logger=tensorboard``: the run's metric rows as TensorBoard scalars in ``out/tb``, beside metrics.jsonl.

It receives exactly the rows the trainer writes to metrics.jsonl, so it never changes what is logged. Step
rows go under ``train/``, epoch rows (online kNN, balance) under ``epoch/``, the budget's calibration under
``budget/``. On a resume TensorBoard is told to purge events after the checkpoint's step, as metrics.jsonl is
rewound, so no step appears twice.
Needs the ``tensorboard`` package (``pip install excb[tensorboard]``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from excb.config import ConfigError

SECTIONS = {"step": "train", "epoch": "epoch", "budget": "budget", "kmeans": "kmeans"}
SKIP_KEYS = {"step", "time", "epoch", "type"}


def scalars(event: dict[str, Any]) -> list[tuple[str, float]]:
    """The finite numeric fields of a metric row as ``(section/key, value)``; none for rows of other types.
    Every metrics sink (TensorBoard, MLflow) logs exactly these."""
    section = SECTIONS.get(str(event.get("type")))
    if section is None:
        return []
    return [(f"{section}/{key}", float(value)) for key, value in event.items()
            if key not in SKIP_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)]


class TensorBoardLogger:
    """A trainer sink writing numeric fields of metric rows as scalars at their step."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard not installed: a config error the user can fix
            raise ConfigError("logger",
                              "tensorboard needs the tensorboard package: pip install 'excb[tensorboard]'") from exc
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("type") == "done":
            self.close()
            return
        step = int(event.get("step", 0))
        for tag, value in scalars(event):
            self.writer.add_scalar(tag, value, step)

    def flush(self, status: str = "completed") -> None:
        """Called when the loop ends, however it ends (an interrupted run keeps its curves)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
