"""Owns a training run: its state, checkpoints, resume and the loop; ``train()`` is the entry point.

One code path for a laptop CPU, one GPU and many GPUs under torchrun. What a step does lives in
``excb.method.step.ExCBStep``; how batches are made in ``excb.data.loader.TrainData``; the recipe and the length a
budget sets in ``excb.training.plan``; what the run writes about itself (metrics.jsonl, train.log, timing) in
``excb.training.run_log``; the progress display in ``excb.training.progress``. Resume is exact: the data order,
every augmentation and every random draw are functions of (seed, epoch, index) or of saved generator states.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from excb.config import ConfigError, TrainConfig
from excb.data.loader import TrainData, dataloader_settings
from excb.distributed import DistContext, all_reduce_sum_int, barrier, cleanup, setup
from excb.evaluation.runs import online_knn
from excb.evaluation.whitening_fit import fit_images, fit_model
from excb.fileio import atomic_write
from excb.method import stats
from excb.method.step import ExCBStep
from excb.models.weights import save_run_backbone
from excb.seeds import seed_everything
from excb.training.checkpoint import (
    LAST,
    FencedOut,
    check_fence,
    checkpoint_dir,
    has_checkpoint,
    load_resumable,
    save_checkpoint,
)
from excb.training.plan import budget_check, correct_length, fit_to_budget, plan_config, write_plan
from excb.training.progress import progress_bar
from excb.training.rerun import check_resumable, set_aside, warm_source, warm_start
from excb.training.run_log import RunLogger, make_sinks, timing, timing_text, train_log

log = logging.getLogger("excb.trainer")

COUNTERS = ("step", "epoch", "epoch_batch", "images_seen", "skipped", "wall_time")


class TrainingInterrupted(RuntimeError):
    """Raised after a cooperative stop (cancel/SIGTERM) once a checkpoint has been written."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; ``checkpoints/nan.pt`` holds the state for inspection."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    epochs_completed: int
    status: str
    summary: dict[str, Any] = field(default_factory=dict)


class Run:
    """State of one training run (counters, length, data, the ExCB step); ``train()`` drives it."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext) -> None:
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.run_dir = Path(cfg.out)
        self.step = self.epoch = self.epoch_batch = self.images_seen = self.skipped = 0
        self.wall_time = 0.0
        self.data = TrainData(cfg, ctx.rank, ctx.world_size, ctx.device)
        self.steps_per_epoch = self.data.steps_per_epoch
        self.set_length(cfg)
        self.learner = ExCBStep(cfg, ctx, self.total_steps)

    def set_length(self, cfg: TrainConfig) -> None:
        """Total steps, warm-up and epochs from ``cfg`` (again after a budget calibration changed them)."""
        self.cfg = cfg
        planned = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(planned, cfg.max_steps) if cfg.max_steps else planned
        self.warmup_steps = min(int(round(cfg.optim.warmup_epochs * self.steps_per_epoch)), self.total_steps // 2)
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

    # -- checkpoints
    def state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "balance": self.learner.balance_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"format": 1, "config": json.loads(self.cfg.model_dump_json()), **self.learner.state_dict(),
                **{key: getattr(self, key) for key in COUNTERS}, "rng": rng}

    def save(self, name: str = LAST) -> Path | None:
        path = None
        if self.ctx.is_main:
            check_fence(self.run_dir)  # a newer attempt owns the directory: raises FencedOut, writes nothing
            path = save_checkpoint(checkpoint_dir(self.run_dir) / name, self.state(), keep_previous=name == LAST)
        barrier()
        return path

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.learner.load_state_dict(ckpt)
        for key in COUNTERS:
            setattr(self, key, ckpt[key])
        rng = {k: v.cpu() for k, v in ckpt["rng"].items()}  # CPU byte tensors whatever the map_location
        torch.set_rng_state(rng["torch"])
        self.learner.balance_gen.set_state(rng["balance"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    # -- data and steps (also driven by excb.training.budget.time_steps)
    def batches(self, epoch: int, start_batch: int, schedule_epoch: int | None = None) -> Iterator[Any]:
        """This rank's loader batches of ``epoch`` from ``start_batch`` on (see TrainData.batches)."""
        return self.data.batches(epoch, start_batch, self.total_epochs, schedule_epoch)

    def train_step(self, globals_: Tensor, locals_: Tensor | None, want_metrics: bool) -> dict[str, Tensor]:
        return self.learner(globals_, locals_, self.step, self.total_steps, self.warmup_steps, want_metrics)

    def init_centroids(self) -> dict[str, float]:
        """k-means on a shuffle of its own (epoch = cfg.epochs, as in the reference), epoch 0's crop scale."""
        epoch = self.cfg.epochs
        views = (self.data.device_views(batch, epoch, i)[0][i % 2]
                 for i, batch in enumerate(self.batches(epoch, 0, schedule_epoch=0)))
        return self.learner.init_centroids(views)

    def row(self, kind: str, **fields: Any) -> dict[str, Any]:
        """A metrics.jsonl row: type, step, epoch, time, then ``fields``."""
        return {"type": kind, "step": self.step, "epoch": self.epoch, "time": time.time(), **fields}


def train(cfg: TrainConfig, should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train (or resume) a run described by ``cfg``; see docs/internals.md for the run-directory layout."""
    cfg = cfg.model_copy(deep=True)  # private copy: the caller's config is never changed (validated once, by resolve)
    if cfg.checkpoint:
        warm_source(cfg.checkpoint)  # a wrong path fails before anything is written
    ctx = setup(cfg.device)
    try:
        return _logged_train(cfg, ctx, should_stop)
    finally:
        cleanup(ctx)


def _logged_train(cfg: TrainConfig, ctx: DistContext, should_stop: Callable[[], bool] | None) -> TrainResult:
    """The run with its directory made (or set aside: ``overwrite``) and train.log attached for its length."""
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite:
        _start_over(run_dir, ctx)
    with train_log(run_dir, ctx):
        return _train(cfg, ctx, run_dir, should_stop)


def _start_over(run_dir: Path, ctx: DistContext) -> None:
    """``overwrite=true``: rank 0 moves the old run aside (before train.log is reopened), the others wait."""
    if ctx.is_main:
        set_aside(run_dir)
    barrier()


def _train(cfg: TrainConfig, ctx: DistContext, run_dir: Path, should_stop: Callable[[], bool] | None) -> TrainResult:
    started = time.time()
    seed_everything(cfg.seed + ctx.rank)  # per-rank seeds (the reference seeds every rank alike, §10.5)
    cfg, plan = plan_config(cfg, ctx, run_dir)
    ckpt = _checkpoint_to_resume(cfg, ctx, run_dir, plan)  # before anything in run_dir is rewritten
    write_plan(run_dir, ctx, cfg, plan)
    run = Run(cfg, ctx)
    logger = RunLogger(run_dir, ctx)
    resumed = _resume(run, logger, ckpt)
    sinks = make_sinks(cfg, ctx, run_dir, run.step if resumed else None)
    logger.sinks.extend(sinks)
    warm = _warm_start(run, logger) if not resumed and cfg.checkpoint else {}
    if not resumed and not warm.get("centroids_loaded") and cfg.kmeans.enabled and cfg.model.num_clusters > 1:
        logger.emit({"type": "kmeans", "step": 0, "time": time.time(), **run.init_centroids()})
    if not resumed and cfg.budget and "length" not in plan:
        fit_to_budget(run, plan, started, logger)
    log.info("run %s: %d steps (%d per epoch), device %s, world %d, precision %s", run_dir, run.total_steps,
             run.steps_per_epoch, ctx.device, ctx.world_size, run.learner.amp_dtype or "fp32")
    if not resumed:
        run.save()
    progress = progress_bar(run.total_steps, run.step) if ctx.is_main and cfg.progress else None
    check = budget_check(run, cfg.budget, plan, started) if cfg.budget and not resumed else None
    status = "completed"
    clock = [started, time.time()]  # start, loop start, loop end, whitening end: the summary's timing
    try:
        _loop(run, logger, should_stop, progress, check)
        clock.append(time.time())
        _fit_whitening(run, logger)
        clock.append(time.time())
    except TrainingInterrupted:
        status = "interrupted"
        raise
    except FencedOut:
        status = "superseded"  # a newer attempt owns the directory: write nothing more into it
        raise
    finally:
        if progress is not None:
            progress.close()
        for sink in sinks:  # an interrupted run keeps its curves; "done" closes them
            sink.flush(status if status != "completed" or sys.exc_info()[0] is None else "failed")
        summary = _summary(run, status, clock)
        if ctx.is_main and status != "superseded":
            atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
            log.info("run %s %s after %d steps: %s", run_dir, status, run.step, timing_text(summary["timing"]))
    if ctx.is_main:  # weights for fine-tuning next to the checkpoints (excb.models.load_backbone reads them)
        save_run_backbone(run.learner.teacher, run.cfg, run_dir, run.step)
    logger.emit({"type": "done", "step": run.step, "time": time.time(), "summary": summary})
    return TrainResult(run_dir, run.step, run.epoch, status, summary)


def _checkpoint_to_resume(cfg: TrainConfig, ctx: DistContext, run_dir: Path,
                          plan: dict[str, Any]) -> dict[str, Any] | None:
    """The run's own last checkpoint when this config may continue it, None for a fresh start; a config that
    differs in a field that may not change on resume (or resume=never on an existing run) is a ConfigError,
    so two runs never mix in one directory (excb/training/rerun.py)."""
    last = checkpoint_dir(run_dir) / LAST
    if not has_checkpoint(run_dir):
        if cfg.resume == "must":
            raise ConfigError("resume", f"resume=must but no checkpoint at {last}")
        return None
    if cfg.resume == "never":
        raise ConfigError("resume", f"resume=never but out={cfg.out} already holds a run ({last}); to start "
                          "over add overwrite=true, or choose a new out=")
    found = load_resumable(run_dir, map_location=ctx.device)
    assert found is not None
    ckpt, path = found
    log.info("resuming from %s", path)
    if isinstance(ckpt.get("config"), dict):
        check_resumable(ckpt["config"], json.loads(cfg.model_dump_json()), cfg.out, plan.get("length"))
    return ckpt


def _resume(run: Run, logger: RunLogger, ckpt: dict[str, Any] | None) -> bool:
    if ckpt is None:
        logger.reset()
        return False
    run.restore(ckpt)
    logger.rewind(run.step)
    log.info("resumed from the checkpoint at step %d (epoch %d, batch %d)", run.step, run.epoch, run.epoch_batch)
    return True


def _warm_start(run: Run, logger: RunLogger) -> dict[str, Any]:
    """``checkpoint=PATH`` on a fresh run: another run's weights, this run's optimizer and step 0."""
    assert run.cfg.checkpoint is not None
    info = warm_start(run.learner, run.cfg.checkpoint)
    logger.emit({"type": "warm_start", "step": 0, "time": time.time(), **info})
    return info


def _loop(run: Run, logger: RunLogger, should_stop: Callable[[], bool] | None, progress: Any,
          check: Any = None) -> None:
    """Epochs of steps until ``total_steps``: step, count, log, maybe correct the length, checkpoint, stop."""
    cfg = run.cfg
    while run.step < run.total_steps:
        if run.epoch_batch == 0:
            run.learner.balancer.reset_epoch_counts()
        t_last = time.perf_counter()
        for batch in run.batches(run.epoch, run.epoch_batch):
            if run.step >= run.total_steps:
                break
            want = (run.step + 1) % cfg.log_every_steps == 0 or run.step + 1 == run.total_steps
            tensors, images = _step(run, batch, want)
            now = time.perf_counter()
            run.wall_time += now - t_last
            if want:
                logger.emit(_step_row(run, tensors, now - t_last, images))
            t_last = now
            if run.step % cfg.histogram_every_steps == 0 or run.step == run.total_steps:
                logger.emit(run.row("cluster_sizes", **run.learner.size_curve()))
            if check is not None and check.due(run.step):
                correct_length(run, check, logger, progress)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{float(tensors['loss']):.3f}", refresh=False)
            stop = bool(should_stop()) if should_stop is not None else False
            if run.step % cfg.checkpoint_every_steps == 0 or stop:
                run.save()
            if stop:
                raise TrainingInterrupted(f"stopped at step {run.step}; checkpoint written")
        if run.epoch_batch >= run.steps_per_epoch:
            _end_epoch(run, logger)
    run.save()


def _fit_whitening(run: Run, logger: RunLogger) -> None:
    """The served embedding's PCA whitening, fitted by the finished teacher on the run's own images
    (``model.whitening=pca``, excb.models.whitening), then written into the last checkpoint."""
    if getattr(run.learner.teacher, "whiten", None) is None:
        return
    if run.ctx.is_main:
        workers = dataloader_settings(run.device)["num_workers"]
        logger.emit(run.row("whitening", **fit_model(run.learner.teacher, fit_images(run.cfg), run.device, workers)))
    run.save()


def _step(run: Run, batch: Any, want: bool) -> tuple[dict[str, Tensor], int]:
    """One optimisation step on ``batch`` and the counters it moves; a non-finite loss saves nan.pt and stops."""
    g, l, skipped = run.data.device_views(batch, run.epoch, run.epoch_batch)
    distributed = run.ctx.distributed
    run.skipped += all_reduce_sum_int(skipped, run.device) if distributed else skipped
    tensors = run.train_step(g, l, want)
    images = all_reduce_sum_int(g.shape[1], run.device) if distributed else g.shape[1]
    loss = float(tensors["loss"])
    if not math.isfinite(loss):
        run.save("nan.pt")
        raise NonFiniteLossError(f"loss became {loss} at step {run.step}; state saved to checkpoints/nan.pt")
    run.step += 1
    run.epoch_batch += 1
    run.images_seen += images
    return tensors, images


def _step_row(run: Run, tensors: dict[str, Tensor], step_seconds: float, images: int) -> dict[str, Any]:
    row = run.row("step", total_steps=run.total_steps)
    row.update({k: float(v) for k, v in tensors.items()})
    row.update(run.learner.size_metrics())
    row.update(img_per_s=images / max(step_seconds, 1e-9), skipped_files=run.skipped,
               crop_min_scale=run.data.transform.scale_min)
    return row


def _end_epoch(run: Run, logger: RunLogger) -> None:
    """Log the epoch's balance, move to the next epoch, then the online kNN and an epoch checkpoint if due."""
    logger.emit(run.row("epoch", **run.learner.epoch_balance()))
    run.epoch += 1
    run.epoch_batch = 0
    every = run.cfg.eval.knn_every_epochs
    if every and run.epoch % every == 0:
        if run.ctx.is_main:
            knn = online_knn(run.learner.teacher, run.cfg, run.device)
            if knn is not None:
                logger.emit(run.row("eval", **knn))
        barrier()
    if run.cfg.keep_epoch_checkpoints:
        run.save(f"epoch{run.epoch:04d}.pt")


def _summary(run: Run, status: str, clock: list[float]) -> dict[str, Any]:
    return {
        "timing": timing(clock),
        "status": status,
        "steps": run.step,
        "total_steps": run.total_steps,
        "epochs": run.epoch,
        "images_seen": run.images_seen,
        "skipped_files": run.skipped,
        "wall_time_seconds": run.wall_time,
        "world_size": run.ctx.world_size,
        "device": str(run.ctx.device),
        "compiled": run.learner.compiled,
        "balance": stats.balance_stats(run.learner.balancer.sizes, kind="sizes"),
    }
