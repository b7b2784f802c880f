"""Owns a training run: its directory, state, checkpoints, logging and the loop; ``train()`` is the entry point.

One code path for a laptop CPU, one GPU and many GPUs under torchrun. What a step does lives in
``excb.method.step.ExCBStep``; how batches are made lives in ``excb.data.loader.TrainData``. Resume is exact: the
data order, every augmentation and every random draw are functions of (seed, epoch, index) or of saved
generator states.
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

from excb.config import RUN_CONFIG, ConfigError, TrainConfig, dump_yaml
from excb.data.loader import TrainData
from excb.fileio import atomic_write
from excb.method import stats
from excb.method.step import ExCBStep
from excb.training.checkpoint import (
    LAST,
    FencedOut,
    check_fence,
    checkpoint_dir,
    has_checkpoint,
    load_resumable,
    save_checkpoint,
)
from excb.training.distributed import DistContext, all_reduce_sum_int, barrier, cleanup, setup
from excb.training.seeds import seed_everything

log = logging.getLogger("excb.trainer")

Sink = Callable[[dict[str, Any]], None]
PLAN_FILE = "recipe.json"  # the fitted choices and the budget's step count: a resume reuses them
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

    def device_views(self, batch: Any, epoch: int, index: int) -> tuple[Tensor, Tensor | None, int]:
        return self.data.device_views(batch, epoch, index)

    def train_step(self, globals_: Tensor, locals_: Tensor | None, want_metrics: bool) -> dict[str, Tensor]:
        return self.learner(globals_, locals_, self.step, self.total_steps, self.warmup_steps, want_metrics)

    def init_centroids(self) -> dict[str, float]:
        """k-means on a shuffle of its own (epoch = cfg.epochs, as in the reference), epoch 0's crop scale."""
        epoch = self.cfg.epochs
        views = (self.device_views(batch, epoch, i)[0][i % 2]
                 for i, batch in enumerate(self.batches(epoch, 0, schedule_epoch=0)))
        return self.learner.init_centroids(views)

    def row(self, kind: str, **fields: Any) -> dict[str, Any]:
        """A metrics.jsonl row: type, step, epoch, time, then ``fields``."""
        return {"type": kind, "step": self.step, "epoch": self.epoch, "time": time.time(), **fields}


def train(cfg: TrainConfig, should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train (or resume) a run described by ``cfg``; see docs/internals.md for the run-directory layout."""
    cfg = cfg.model_copy(deep=True)  # private copy: the caller's config is never changed (validated once, by resolve)
    if cfg.checkpoint:
        from excb.training.rerun import warm_source

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
    handler = _setup_file_log(run_dir, ctx)
    try:
        return _train(cfg, ctx, run_dir, should_stop)
    finally:
        if handler is not None:
            logging.getLogger("excb").removeHandler(handler)
            handler.close()


def _start_over(run_dir: Path, ctx: DistContext) -> None:
    """``overwrite=true``: rank 0 moves the old run aside (before train.log is reopened), the others wait."""
    from excb.training.rerun import set_aside

    if ctx.is_main:
        set_aside(run_dir)
    barrier()


def _setup_file_log(run_dir: Path, ctx: DistContext) -> logging.Handler | None:
    if not ctx.is_main:
        return None
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("excb").addHandler(handler)
    logging.getLogger("excb").setLevel(logging.INFO)
    return handler


def _train(cfg: TrainConfig, ctx: DistContext, run_dir: Path, should_stop: Callable[[], bool] | None) -> TrainResult:
    started = time.time()
    seed_everything(cfg.seed + ctx.rank)  # per-rank seeds (the reference seeds every rank alike, §10.5)
    cfg, plan = _plan_config(cfg, ctx, run_dir)
    ckpt = _checkpoint_to_resume(cfg, ctx, run_dir, plan)  # before anything in run_dir is rewritten
    _write_plan(run_dir, ctx, cfg, plan)
    run = Run(cfg, ctx)
    logger = RunLogger(run_dir, ctx)
    resumed = _resume(run, logger, ckpt)
    sinks = _sinks(cfg, ctx, run_dir, run.step if resumed else None)
    logger.sinks.extend(sinks)
    warm = _warm_start(run, logger) if not resumed and cfg.checkpoint else {}
    if not resumed and not warm.get("centroids_loaded") and cfg.kmeans.enabled and cfg.model.num_clusters > 1:
        logger.emit({"type": "kmeans", "step": 0, "time": time.time(), **run.init_centroids()})
    if not resumed and cfg.budget and "length" not in plan:
        _fit_to_budget(run, plan, started, logger)
    log.info("run %s: %d steps (%d per epoch), device %s, world %d, precision %s", run_dir, run.total_steps,
             run.steps_per_epoch, ctx.device, ctx.world_size, run.learner.amp_dtype or "fp32")
    if not resumed:
        run.save()
    progress = _progress_bar(run) if ctx.is_main and cfg.progress else None
    check = _budget_check(run, cfg.budget, plan, started) if cfg.budget and not resumed else None
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
            log.info("run %s %s after %d steps: %s", run_dir, status, run.step, _timing_text(summary["timing"]))
    if ctx.is_main:  # weights for fine-tuning next to the checkpoints (excb.models.load_backbone reads them)
        from excb.models.weights import save_run_backbone

        save_run_backbone(run.learner.teacher, run.cfg, run_dir, run.step)
    logger.emit({"type": "done", "step": run.step, "time": time.time(), "summary": summary})
    return TrainResult(run_dir, run.step, run.epoch, status, summary)


def _sinks(cfg: TrainConfig, ctx: DistContext, run_dir: Path, resumed_at: int | None) -> list[Any]:
    """Where rows go besides metrics.jsonl, on rank 0: ``logger=tensorboard`` (its writer purges events a crashed
    start wrote past the checkpoint it resumes from) or ``logger=mlflow`` (the same MLflow run across resumes)."""
    if cfg.logger == "jsonl" or not ctx.is_main:
        return []
    if cfg.logger == "mlflow":
        from excb.training.mlflow_logger import MlflowLogger

        return [MlflowLogger(run_dir, cfg, resumed_at)]
    from excb.training.tb_logger import TensorBoardLogger

    return [TensorBoardLogger(run_dir / "tb", purge_step=resumed_at + 1 if resumed_at is not None else None)]


def _checkpoint_to_resume(cfg: TrainConfig, ctx: DistContext, run_dir: Path,
                          plan: dict[str, Any]) -> dict[str, Any] | None:
    """The run's own last checkpoint when this config may continue it, None for a fresh start; a config that
    differs in a field that may not change on resume (or resume=never on an existing run) is a ConfigError,
    so two runs never mix in one directory (excb/training/rerun.py)."""
    from excb.training.rerun import check_resumable

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
    from excb.training.rerun import warm_start

    assert run.cfg.checkpoint is not None
    info = warm_start(run.learner, run.cfg.checkpoint)
    logger.emit({"type": "warm_start", "step": 0, "time": time.time(), **info})
    return info


def _plan_config(cfg: TrainConfig, ctx: DistContext, run_dir: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The recipe of this run: the one stored with its checkpoint (a resume trains the same recipe and step
    count), or one fitted now to the data and device (``recipe=auto``; excb/training/recipe.py)."""
    from excb.training.recipe import apply, fit_config
    from excb.training.rerun import without_keys

    stored = run_dir / PLAN_FILE
    if cfg.resume != "never" and stored.exists() and has_checkpoint(run_dir):
        plan = json.loads(stored.read_text())
        choices = without_keys(plan.get("choices", {}), cfg.pinned)  # what the user typed now is compared
        return apply(cfg, choices, plan.get("length", {})), plan
    fitted, recipe = fit_config(cfg, ctx.device, ctx.world_size)
    return fitted, (recipe.to_json() if recipe is not None else {})


def _write_plan(run_dir: Path, ctx: DistContext, cfg: TrainConfig, plan: dict[str, Any]) -> None:
    if ctx.is_main:
        atomic_write(run_dir / RUN_CONFIG, dump_yaml(cfg))
        atomic_write(run_dir / PLAN_FILE, json.dumps(plan, indent=2))


def _set_length(run: Run, plan: dict[str, Any], steps: int) -> None:
    """End the run after ``steps`` (max_steps, epochs and a fitted recipe's warm-up follow) and record that
    length in recipe.json and config.yaml, where a resume finds it. A second call (the budget check) keeps the
    first plan's warm-up (excb.training.budget.corrected_length)."""
    from excb.training.budget import corrected_length, length_overrides
    from excb.training.recipe import apply

    if "length" in plan:
        plan["length"] = corrected_length(plan["length"], steps, run.steps_per_epoch)
    else:
        plan["length"] = length_overrides(run.cfg, steps, run.steps_per_epoch, fitted=run.cfg.recipe == "fitted")
    run.set_length(apply(run.cfg, {}, plan["length"]))
    _write_plan(run.run_dir, run.ctx, run.cfg, plan)


def _fit_to_budget(run: Run, plan: dict[str, Any], started: float, logger: RunLogger) -> None:
    """Time real steps, then set max_steps (and a fitted recipe's warm-up) so the schedules end with the budget."""
    from excb.training.budget import calibrate, short_budget_warning, steps_for_warmup

    cal = calibrate(run.cfg, run, started)
    plan["calibration"] = cal.to_json()
    log.info("budget %s: %.3f s/step measured, %.0f s of set-up -> %d steps", run.cfg.budget, cal.seconds_per_step,
             cal.seconds_before_training, cal.steps)
    assert run.cfg.budget is not None
    needed = steps_for_warmup(run.cfg, run.steps_per_epoch, fitted=run.cfg.recipe == "fitted")
    warning = short_budget_warning(cal, run.cfg.budget, needed)
    if warning is not None:
        log.warning("%s", warning)
    logger.emit({"type": "budget", "step": 0, "time": time.time(), **cal.to_json()})
    _set_length(run, plan, cal.steps)


def _budget_check(run: Run, budget: str, plan: dict[str, Any], started: float) -> Any:
    from excb.config import budget_seconds
    from excb.training.budget import BudgetCheck

    reserve = plan.get("calibration", {}).get("seconds_for_whitening", 0.0)
    return BudgetCheck(budget_seconds(budget), started, run.total_steps, run.step, plan, reserve)


def _correct_length(run: Run, check: Any, logger: RunLogger, progress: Any) -> None:
    """Move the end of a budgeted run once, from the loop's measured pace (excb.training.budget.BudgetCheck)."""
    steps = check.corrected_steps(run.step)
    log.info("budget check at step %d: %d -> %d steps at the loop's pace", run.step, run.total_steps, steps)
    check.plan["corrected_at_step"] = run.step
    _set_length(run, check.plan, steps)
    logger.emit({"type": "budget", "step": run.step, "time": time.time(), "steps": steps})
    if progress is not None:
        progress.total = run.total_steps


PROGRESS_LOG_SECONDS = 30.0  # without a terminal: one progress line this often (and one at the end)


class LogProgress:
    """tqdm's interface (``update``, ``set_postfix``, ``total``, ``close``) as plain log lines, for a log file.

    A tqdm bar redrawn with carriage returns is one line of thousands of characters in a job's log; this writes
    ``progress: step 120/2000 (6%), 3.1 steps/s, eta 10m05s, loss 4.123`` every ``interval`` seconds instead.
    """

    def __init__(self, total: int, initial: int = 0, interval: float = PROGRESS_LOG_SECONDS) -> None:
        self.total, self.n, self.interval = total, initial, interval
        self.postfix: dict[str, Any] = {}
        self.started = self.last = time.monotonic()
        self.first, self.logged = initial, initial

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval or self.n >= self.total:
            self._log(now)

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if self.n != self.logged:
            self._log(time.monotonic())

    def _log(self, now: float) -> None:
        rate = (self.n - self.first) / max(now - self.started, 1e-9)
        left = max(self.total - self.n, 0) / rate if rate > 0 else None
        eta = f", eta {int(left // 60)}m{int(left % 60):02d}s" if left is not None else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        percent = 100 * self.n / max(self.total, 1)
        log.info("progress: step %d/%d (%.0f%%), %.2f steps/s%s%s", self.n, self.total, percent, rate, eta, extra)
        self.last, self.logged = now, self.n


def _progress_bar(run: Run) -> Any:
    """A tqdm bar on a terminal; plain log lines (:class:`LogProgress`) when stderr is a file or a pipe (a job)."""
    import sys

    if not sys.stderr.isatty():
        return LogProgress(run.total_steps, run.step)
    from tqdm.auto import tqdm

    return tqdm(total=run.total_steps, initial=run.step, desc="excb train", unit="step", dynamic_ncols=True)


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
                _correct_length(run, check, logger, progress)
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
        from excb.data.loader import dataloader_settings
        from excb.evaluation.whitening_fit import fit_images, fit_model

        workers = dataloader_settings(run.device)["num_workers"]
        logger.emit(run.row("whitening", **fit_model(run.learner.teacher, fit_images(run.cfg), run.device, workers)))
    run.save()


def _step(run: Run, batch: Any, want: bool) -> tuple[dict[str, Tensor], int]:
    """One optimisation step on ``batch`` and the counters it moves; a non-finite loss saves nan.pt and stops."""
    g, l, skipped = run.device_views(batch, run.epoch, run.epoch_batch)
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
            from excb.evaluation.runs import online_knn

            knn = online_knn(run.learner.teacher, run.cfg, run.device)
            if knn is not None:
                logger.emit(run.row("eval", **knn))
        barrier()
    if run.cfg.keep_epoch_checkpoints:
        run.save(f"epoch{run.epoch:04d}.pt")


def _timing(clock: list[float]) -> dict[str, float | None]:
    """Seconds of set-up (from the start of train() to the first step: data, model, k-means, the budget's timing),
    training (the loop) and the whitening fit; the phase a stopped run was in counts until now, one it never
    reached is None."""
    ends = [*clock, time.time()]
    phases = [round(b - a, 2) for a, b in zip(ends, ends[1:])] + [None, None, None]
    return {"setup_seconds": phases[0], "training_seconds": phases[1], "whitening_seconds": phases[2],
            "total_seconds": round(ends[-1] - ends[0], 2)}


def _timing_text(t: dict[str, float | None]) -> str:
    """The summary's timing as the run's last log line says it."""
    said = {k: "-" if v is None else f"{v:.1f} s" for k, v in t.items()}
    return (f"set-up {said['setup_seconds']}, training {said['training_seconds']}, whitening fit "
            f"{said['whitening_seconds']}, total {said['total_seconds']}")


def _summary(run: Run, status: str, clock: list[float]) -> dict[str, Any]:
    return {
        "timing": _timing(clock),
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
