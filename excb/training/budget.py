"""A compute budget (``budget=10m``) turned into a step count by timing real steps on this machine.

An epoch count means 300 steps on a small folder and 30,000 on a large one; a user knows how long they can
wait, not how many steps their data needs. The trainer times a few real optimisation steps of the actual run
(data loading included, across epoch boundaries on small sets), restores the state from before them, and
sets ``max_steps`` so the learning-rate, EMA and crop-scale schedules end when the budget does. Machines of
one kind differ up to 2x in speed, so the count is measured, never assumed.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

from excb.config import TrainConfig, budget_seconds
from excb.data.loader import dataloader_settings
from excb.evaluation.whitening_fit import estimate_fit_seconds

WARMUP_STEPS = 3          # first steps pay for allocator warm-up / compilation: timed separately
MEASURED_STEPS = 12
SAFETY = 0.97             # checkpoints, logging and the final save are not in the per-step figure
MIN_STEPS = 10
WARMUP_FRACTION = 0.05    # lr warm-up as a share of a fitted run's steps (cpu-small: 1 epoch of 16 = 6%)
# re-time the real loop at these shares of the run and move its end: the first catches what a dozen timed steps
# miss, the later ones a pace that drifts (8x8 px digits: one check at 10% left a 10-minute run at 8.5 minutes)
CHECK_FRACTIONS = (0.1, 0.35, 0.6)
MIN_CHECK_STEPS = 30
MIN_WARMUP_STEPS = 10     # a fitted recipe's warm-up (5% of the run) needs a run of 200 steps to have this many


@dataclass
class Calibration:
    budget_seconds: float
    seconds_per_step: float
    seconds_before_training: float    # data/model set-up, k-means and the calibration itself
    steps: int
    seconds_for_whitening: float = 0.0  # reserved at the end for the served embedding's whitening fit

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def time_steps(run: Any, steps: int = MEASURED_STEPS, warmup: int = WARMUP_STEPS) -> float:
    """Mean seconds per step of ``run`` over ``steps`` steps after ``warmup``; state restored after.

    The mean (not the median) keeps the per-epoch loader restarts of small data sets in the figure.
    """
    saved = copy.deepcopy(run.state())
    started = time.perf_counter()
    batches = itertools.islice(_batches_across_epochs(run), warmup + steps)
    for done, (epoch, index, batch) in enumerate(batches, start=1):
        g, l, _ = run.data.device_views(batch, epoch, index)
        run.train_step(g, l, want_metrics=True)  # the loop logs every step by default: time that too
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        if done == warmup:
            started = time.perf_counter()
    per_step = (time.perf_counter() - started) / steps
    run.restore(saved)
    return per_step


def _batches_across_epochs(run: Any) -> Iterator[tuple[int, int, Any]]:
    """(epoch, index in epoch, batch) from epoch 0 on, without end: small sets cross epoch boundaries."""
    for epoch in itertools.count():
        for index, batch in enumerate(run.batches(epoch, 0)):
            yield epoch, index, batch


def steps_within(budget: float, per_step: float, spent: float) -> int:
    """Steps that fit in what is left of the budget after ``spent`` seconds of set-up."""
    return max(int(math.floor(max(budget - spent, 0.0) * SAFETY / per_step)), MIN_STEPS)


def length_overrides(cfg: TrainConfig, steps: int, steps_per_epoch: int, fitted: bool) -> dict[str, Any]:
    """max_steps and epochs for ``steps`` (and, for a fitted recipe, a warm-up that is 5% of them)."""
    out: dict[str, Any] = {"max_steps": steps, "epochs": max(math.ceil(steps / steps_per_epoch), 1)}
    if fitted and "optim.warmup_epochs" not in cfg.pinned:
        out["optim"] = {"warmup_epochs": round(WARMUP_FRACTION * steps / steps_per_epoch, 4)}
    return out


def steps_for_warmup(cfg: TrainConfig, steps_per_epoch: int, fitted: bool) -> int:
    """Fewest steps of a run that has its recipe's whole warm-up: a fitted recipe warms up over 5% of its steps,
    at least ``MIN_WARMUP_STEPS`` of them; otherwise over ``optim.warmup_epochs``, which the trainer cuts to half
    the run (Run.set_length) when the run is shorter than twice that."""
    if fitted and "optim.warmup_epochs" not in cfg.pinned:
        return math.ceil(MIN_WARMUP_STEPS / WARMUP_FRACTION)
    return max(2 * int(round(cfg.optim.warmup_epochs * steps_per_epoch)), MIN_STEPS)


def _duration(seconds: float) -> str:
    """A budget as a user writes it, rounded up: 95s, 4m, 2h."""
    if seconds <= 120:
        return f"{math.ceil(seconds)}s"
    if seconds <= 2 * 3600:
        return f"{math.ceil(seconds / 60)}m"
    return f"{math.ceil(seconds / 3600)}h"


def short_budget_warning(cal: Calibration, budget: str, needed: int) -> str | None:
    """One line when the budget, after its own set-up, buys fewer than ``needed`` steps (None otherwise), with the
    smallest budget that would buy them on this machine (set-up, the steps and the whitening fit it reserves)."""
    if cal.steps >= needed:
        return None
    minimum = cal.seconds_before_training + needed * cal.seconds_per_step / SAFETY + cal.seconds_for_whitening
    return (f"budget {budget} is too short: after {cal.seconds_before_training:.0f} s of set-up it trains {cal.steps} "
            f"steps ({cal.seconds_per_step:.2f} s each), fewer than the {needed} the recipe's warm-up needs; "
            f"budget={_duration(minimum)} or more would give them")


def calibrate(cfg: TrainConfig, run: Any, started: float) -> Calibration:
    """Time the run's steps and size it to ``cfg.budget`` counted from ``started`` (time.time()), less the time
    the whitening fit will take when training ends."""
    assert cfg.budget is not None
    budget = budget_seconds(cfg.budget)
    per_step = time_steps(run)
    per_step = _slowest_rank(per_step, run)
    reserve = _slowest_rank(time_whitening(run), run)
    spent = time.time() - started
    return Calibration(budget, per_step, spent, steps_within(budget - reserve, per_step, spent), reserve)


def time_whitening(run: Any) -> float:
    """Seconds the run's end-of-training whitening fit will take on rank 0 (the one that fits; 0 elsewhere)."""
    if not run.ctx.is_main:
        return 0.0
    workers = dataloader_settings(run.device)["num_workers"]
    return estimate_fit_seconds(run.learner.teacher, run.cfg, run.device, workers)


def corrected_length(first: dict[str, Any], steps: int, steps_per_epoch: int) -> dict[str, Any]:
    """The run's length after the budget check: ``steps`` and their epochs, with the first plan's warm-up kept.

    The schedules end at the new last step, so only their tail stretches or shrinks; a warm-up recomputed as 5%
    of a total more than twice the first would send the learning rate back into warm-up mid-run."""
    out = {**first, "max_steps": steps, "epochs": max(math.ceil(steps / steps_per_epoch), 1)}
    return copy.deepcopy(out)


def _across_ranks(value: float, run: Any, op: str, dtype: torch.dtype) -> float:
    """``value`` reduced over every rank with ``op`` ("MAX", "MIN"); the value itself outside torchrun."""
    if not run.ctx.distributed:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=dtype, device=run.device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.item()


def _slowest_rank(per_step: float, run: Any) -> float:
    """Under torchrun every rank must agree on the step count: take the slowest rank's time."""
    return float(_across_ranks(per_step, run, "MAX", torch.float64))


def fewest_steps(steps: int, run: Any) -> int:
    """Under torchrun every rank must stop at the same step: the smallest count any rank computed."""
    return int(_across_ranks(steps, run, "MIN", torch.int64))


class BudgetCheck:
    """Corrections of the step count from the real loop's speed, at 10%, 35% and 60% of the run.

    A dozen timed steps miss what the loop adds (logging, histograms, checkpoints, epoch restarts) and any
    change in machine load; at 10% of the run the loop's own pace is known and the end is moved while the
    learning rate is still near its peak. The pace can drift later (on tiny images the calibrated step was 15%
    slower than the loop's average), so it is measured again over each stretch since the last check; after 60%
    a drift moves the end by little, and a late move would jolt the schedules, so the checks stop there.
    """

    def __init__(self, budget: float, started: float, total_steps: int, first_step: int,
                 plan: dict[str, Any], reserve: float = 0.0) -> None:
        self.budget, self.started = budget - reserve, started  # ``reserve``: the whitening fit after the loop
        self.plan = plan  # the run's recipe.json contents: the corrected length is recorded there
        self.first_step = first_step
        self.fractions = list(CHECK_FRACTIONS)
        self.since = (time.time(), first_step)  # (time, step) the pace is measured from
        self.check_step: int | None = self._next_check(total_steps, first_step)

    def _next_check(self, total_steps: int, step: int) -> int | None:
        if not self.fractions:
            return None
        at = self.first_step + max(int((total_steps - self.first_step) * self.fractions.pop(0)), MIN_CHECK_STEPS)
        return max(at, step + MIN_CHECK_STEPS)

    def due(self, step: int) -> bool:
        return self.check_step is not None and step >= self.check_step

    def corrected_steps(self, step: int, agree: Callable[[int], int] = lambda n: n) -> int:
        """Total steps that end the run at the budget, at the pace of the steps since the last check (``agree``:
        every rank's count made one, :func:`fewest_steps`)."""
        now = time.time()
        per_step = (now - self.since[0]) / max(step - self.since[1], 1)
        self.since = (now, step)
        left = self.budget - (now - self.started)
        total = agree(step + steps_within(left, per_step, 0.0) if left > 0 else step + 1)
        self.check_step = self._next_check(total, step)
        return total
