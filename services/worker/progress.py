"""Turn the trainer's ``metrics.jsonl`` into the job's progress block, latest metrics and balance block."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from excb.method.stats import balance_stats

_META_KEYS = {"type", "step", "epoch", "time", "total_steps", "steps_per_epoch", "epochs"}


@dataclass
class ProgressTracker:
    """Accumulates rows and derives ``progress`` (epoch, step, total_steps, percent, ETA) for the DB."""

    total_steps: int | None
    epochs: int | None
    started: float = field(default_factory=time.monotonic)
    first_step: int | None = None
    step: int = 0
    epoch: float = 0.0
    latest: dict[str, Any] = field(default_factory=dict)
    curve: dict[str, Any] | None = None
    balance: dict[str, float] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            kind = row.get("type", "step")
            if kind == "cluster_sizes" and row.get("relative_size"):
                self.curve = {"step": row.get("step"), "rank": row.get("rank", []),
                              "relative_size": row["relative_size"]}
                # The trainer ships statistics of the full K-vector; the curve is downsampled to <= 256 points,
                # so it is only a fallback for rows written before that field existed.
                full = row.get("balance")
                self.balance = full if isinstance(full, dict) else balance_stats(row["relative_size"], kind="sizes")
            elif kind == "step" and "step" in row:
                self._step_row(row)

    def _step_row(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        if self.first_step is None:
            self.first_step, self.started = step, time.monotonic()
        self.step = step
        self.epoch = float(row.get("epoch", self.epoch) or 0)
        if row.get("total_steps"):
            self.total_steps = int(row["total_steps"])
        elif row.get("steps_per_epoch") and self.epochs:
            by_epochs = int(row["steps_per_epoch"]) * self.epochs
            self.total_steps = min(self.total_steps, by_epochs) if self.total_steps else by_epochs
        self.latest = {k: v for k, v in row.items() if k not in _META_KEYS and _is_number(v)}
        self.steps.append({k: v for k, v in row.items() if k != "type"})

    def follow(self, effective: dict[str, Any] | None) -> None:
        """The trainer's fitted config is known: its length replaces the submitted one until step rows say more."""
        if not effective or self.first_step is not None:
            return
        self.epochs = int(effective.get("epochs") or 0) or self.epochs
        self.total_steps = int(effective["max_steps"]) if effective.get("max_steps") else self.total_steps

    def take_steps(self) -> list[dict[str, Any]]:
        rows, self.steps = self.steps, []
        return rows

    def progress(self) -> dict[str, Any]:
        total = self.total_steps
        percent = min(100.0, 100.0 * self.step / total) if total else None
        eta = None
        if total and self.first_step is not None and self.step > self.first_step:
            rate = (self.step - self.first_step) / max(time.monotonic() - self.started, 1e-6)
            eta = max(0.0, (total - self.step) / rate)
        return {"epoch": self.epoch, "step": self.step, "total_steps": total,
                "percent": None if percent is None else round(percent, 2),
                "eta_seconds": None if eta is None else round(eta, 1)}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
