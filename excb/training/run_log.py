"""What a run writes about itself besides checkpoints: ``metrics.jsonl`` (:class:`RunLogger`) and the sinks that
mirror its rows (TensorBoard, MLflow), ``train.log`` and the timing that ``summary.json`` and the last log line
report. All of it on rank 0 only; docs/internals.md "Trainer run directory" lists the files."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from excb.config import TrainConfig
from excb.distributed import DistContext
from excb.fileio import atomic_write
from excb.training.mlflow_logger import MlflowLogger
from excb.training.tb_logger import TensorBoardLogger

Sink = Callable[[dict[str, Any]], None]


class RunLogger:
    """Writes metrics.jsonl on rank 0, the one stream of a run's events (the worker tails it; ``excb eval`` and the
    dashboard read it), and hands each row to ``sinks`` (``logger=tensorboard`` or ``logger=mlflow``)."""

    def __init__(self, run_dir: Path, ctx: DistContext) -> None:
        self.run_dir, self.ctx = run_dir, ctx
        self.sinks: list[Sink] = []
        self.metrics_path = run_dir / "metrics.jsonl"

    def rewind(self, step: int) -> None:
        """After a resume, drop rows logged past the checkpoint so the series has no duplicates."""
        if not self.ctx.is_main or not self.metrics_path.exists():
            return
        kept = [ln for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write(self.metrics_path, "".join(ln + "\n" for ln in kept))

    def reset(self) -> None:
        """A fresh start: rows a crashed start left before its first checkpoint belong to no run."""
        if self.ctx.is_main and self.metrics_path.exists():
            self.metrics_path.unlink()

    def emit(self, event: dict[str, Any]) -> None:
        if not self.ctx.is_main:
            return
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(event) + "\n")
        for sink in self.sinks:
            sink(event)


def make_sinks(cfg: TrainConfig, ctx: DistContext, run_dir: Path, resumed_at: int | None) -> list[Any]:
    """Where rows go besides metrics.jsonl, on rank 0: ``logger=tensorboard`` (its writer purges events a crashed
    start wrote past the checkpoint it resumes from) or ``logger=mlflow`` (the same MLflow run across resumes)."""
    if cfg.logger == "jsonl" or not ctx.is_main:
        return []
    if cfg.logger == "mlflow":
        return [MlflowLogger(run_dir, cfg, resumed_at)]
    return [TensorBoardLogger(run_dir / "tb", purge_step=resumed_at + 1 if resumed_at is not None else None)]


@contextlib.contextmanager
def train_log(run_dir: Path, ctx: DistContext) -> Iterator[None]:
    """``run_dir/train.log`` receives the ``excb`` loggers' lines on rank 0 while the block runs."""
    if not ctx.is_main:
        yield
        return
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("excb").addHandler(handler)
    logging.getLogger("excb").setLevel(logging.INFO)
    try:
        yield
    finally:
        logging.getLogger("excb").removeHandler(handler)
        handler.close()


def timing(clock: list[float]) -> dict[str, float | None]:
    """Seconds of set-up (from the start of train() to the first step: data, model, k-means, the budget's timing),
    training (the loop) and the whitening fit; the phase a stopped run was in counts until now, one it never
    reached is None."""
    ends = [*clock, time.time()]
    phases = [round(b - a, 2) for a, b in zip(ends, ends[1:])] + [None, None, None]
    return {"setup_seconds": phases[0], "training_seconds": phases[1], "whitening_seconds": phases[2],
            "total_seconds": round(ends[-1] - ends[0], 2)}


def timing_text(t: dict[str, float | None]) -> str:
    """The summary's timing as the run's last log line says it."""
    said = {k: "-" if v is None else f"{v:.1f} s" for k, v in t.items()}
    return (f"set-up {said['setup_seconds']}, training {said['training_seconds']}, whitening fit "
            f"{said['whitening_seconds']}, total {said['total_seconds']}")
