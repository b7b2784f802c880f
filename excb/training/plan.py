"""A run's plan: the recipe it trains (fitted now, or the one stored with its checkpoint) and its length, which a
budget sets from timed steps and corrects from the loop's pace. Both live in ``recipe.json`` (``PLAN_FILE``)
and ``config.yaml``, always written as that pair, where a resume and the worker (services/worker/plan.py) find
them."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from excb.config import RUN_CONFIG, TrainConfig, budget_seconds, dump_yaml
from excb.distributed import DistContext
from excb.fileio import atomic_write
from excb.training.budget import (
    BudgetCheck,
    calibrate,
    corrected_length,
    fewest_steps,
    length_overrides,
    short_budget_warning,
    steps_for_warmup,
)
from excb.training.checkpoint import has_checkpoint
from excb.training.recipe import apply, fit_config
from excb.training.rerun import without_keys
from excb.training.run_log import RunLogger

if TYPE_CHECKING:  # for annotations only: the trainer drives a Run through these functions
    from excb.training.trainer import Run

log = logging.getLogger("excb.trainer")  # these lines have always come from the trainer's logger

PLAN_FILE = "recipe.json"  # the fitted choices and the budget's step count: a resume reuses them


def plan_config(cfg: TrainConfig, ctx: DistContext, run_dir: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The recipe of this run: the one stored with its checkpoint (a resume trains the same recipe and step
    count), or one fitted now to the data and device (``recipe=auto``; excb/training/recipe.py)."""
    stored = run_dir / PLAN_FILE
    if cfg.resume != "never" and stored.exists() and has_checkpoint(run_dir):
        plan = json.loads(stored.read_text())
        choices = without_keys(plan.get("choices", {}), cfg.pinned)  # what the user typed now is compared
        return apply(cfg, choices, plan.get("length", {})), plan
    fitted, recipe = fit_config(cfg, ctx.device, ctx.world_size)
    return fitted, (recipe.to_json() if recipe is not None else {})


def write_plan(run_dir: Path, ctx: DistContext, cfg: TrainConfig, plan: dict[str, Any]) -> None:
    if ctx.is_main:
        atomic_write(run_dir / RUN_CONFIG, dump_yaml(cfg))
        atomic_write(run_dir / PLAN_FILE, json.dumps(plan, indent=2))


def set_length(run: Run, plan: dict[str, Any], steps: int) -> None:
    """End the run after ``steps`` (max_steps, epochs and a fitted recipe's warm-up follow) and record that
    length in recipe.json and config.yaml, where a resume finds it. A second call (the budget check) keeps the
    first plan's warm-up (excb.training.budget.corrected_length)."""
    if "length" in plan:
        plan["length"] = corrected_length(plan["length"], steps, run.steps_per_epoch)
    else:
        plan["length"] = length_overrides(run.cfg, steps, run.steps_per_epoch, fitted=run.cfg.recipe == "fitted")
    run.set_length(apply(run.cfg, {}, plan["length"]))
    write_plan(run.run_dir, run.ctx, run.cfg, plan)


def fit_to_budget(run: Run, plan: dict[str, Any], started: float, logger: RunLogger) -> None:
    """Time real steps, then set max_steps (and a fitted recipe's warm-up) so the schedules end with the budget."""
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
    set_length(run, plan, cal.steps)


def budget_check(run: Run, budget: str, plan: dict[str, Any], started: float) -> BudgetCheck:
    """The loop's chances to move the end of a budgeted run (the whitening fit's reserve kept)."""
    reserve = plan.get("calibration", {}).get("seconds_for_whitening", 0.0)
    return BudgetCheck(budget_seconds(budget), started, run.total_steps, run.step, plan, reserve)


def correct_length(run: Run, check: BudgetCheck, logger: RunLogger, progress: Any) -> None:
    """Move the end of a budgeted run from the loop's measured pace (excb.training.budget.BudgetCheck)."""
    steps = check.corrected_steps(run.step, lambda n: fewest_steps(n, run))
    log.info("budget check at step %d: %d -> %d steps at the loop's pace", run.step, run.total_steps, steps)
    check.plan["corrected_at_step"] = run.step
    check.plan.setdefault("corrections", []).append({"step": run.step, "steps": steps})
    set_length(run, check.plan, steps)
    logger.emit({"type": "budget", "step": run.step, "time": time.time(), "steps": steps})
    if progress is not None:
        progress.total = run.total_steps
