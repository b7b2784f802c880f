"""What a job runs, read from its run directory for the control plane (issue 27 item 1).

A job submitted without a preset is fitted at train time (``recipe=auto``, excb/training/recipe.py) and a budget sets
its step count after timing real steps (excb/training/budget.py), so the submitted config is not what runs. The trainer
writes what runs to ``RUN/config.yaml`` and the choices with their reasons to ``RUN/recipe.json`` (always that pair, the
config first; docs/internals.md "Trainer run directory"), at the start and again when the budget sets or corrects the
length. :class:`RunPlan` notices each new ``recipe.json`` with one ``stat`` per progress sync and turns the pair into
the job's ``effective_config`` and ``recipe`` columns.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from excb.config import RUN_CONFIG, TrainConfig, validate
from excb.training.plan import PLAN_FILE
from excb.training.recipe import DataProfile

log = logging.getLogger("excb.worker")

Signature = tuple[int, int, int]  # (inode, mtime_ns, size): the trainer replaces the file atomically


def _signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class RunPlan:
    """The run's ``config.yaml`` + ``recipe.json`` once this attempt's trainer has (re)written them.

    The signature of ``recipe.json`` is taken before the trainer starts, so a previous attempt's pair (still there
    until this attempt's trainer replaces it; the trainer is the only writer of both) is not mistaken for this one's."""

    def __init__(self, run_dir: Path) -> None:
        self.config_path = run_dir / RUN_CONFIG
        self.plan_path = run_dir / PLAN_FILE
        self.seen = _signature(self.plan_path)
        self._candidate: Signature | None = None

    def pending(self) -> dict[str, Any]:
        """``{"effective_config", "recipe"}`` when the trainer wrote a new pair since the last :meth:`confirm`,
        else ``{}``."""
        sig = _signature(self.plan_path)
        if sig is None or sig == self.seen:
            return {}
        try:
            plan = json.loads(self.plan_path.read_text())
            cfg = validate(yaml.safe_load(self.config_path.read_text()))
        except (OSError, ValueError, yaml.YAMLError) as exc:  # ConfigError is a ValueError
            log.warning("run plan in %s not readable yet: %s", self.plan_path.parent, exc)
            return {}
        self._candidate = sig
        return {"effective_config": cfg.model_dump(mode="json"), "recipe": recipe_summary(plan, cfg)}

    def confirm(self) -> None:
        """The values of the last :meth:`pending` reached the job row: do not send them again."""
        if self._candidate is not None:
            self.seen, self._candidate = self._candidate, None


def recipe_summary(plan: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """The job's ``recipe`` block: the fitted recipe's one-line reasons (as ``excb train --dry-run`` prints them)
    and how the step count was chosen."""
    profile = plan.get("profile")
    return {
        "fitted": bool(plan.get("choices")),
        "data": DataProfile(**profile).describe() if isinstance(profile, dict) else None,
        "device": plan.get("device"),
        "reasons": [str(r) for r in plan.get("reasons") or []],
        "kept": [k for k in cfg.pinned if k != "out"],
        "steps": steps_summary(plan, cfg),
    }


def steps_summary(plan: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """``max_steps`` in effect, what chose it (``budget``, ``budget_pending`` while the budget is being timed,
    ``config``) and one line that says so."""
    cal = plan.get("calibration") if isinstance(plan.get("calibration"), dict) else None
    out: dict[str, Any] = {"max_steps": cfg.max_steps, "epochs": cfg.epochs, "budget": cfg.budget,
                           "chosen_by": "config", "corrected_at_step": plan.get("corrected_at_step")}
    if cal is not None:
        out.update(chosen_by="budget", seconds_per_step=cal.get("seconds_per_step"),
                   seconds_before_training=cal.get("seconds_before_training"))
        line = (f"max_steps={cfg.max_steps}: budget {cfg.budget} at {cal['seconds_per_step']:.3g} s/step measured "
                f"on this machine, after {cal['seconds_before_training']:.0f} s of set-up")
        at = [c["step"] for c in plan.get("corrections", []) if isinstance(c, dict) and "step" in c]
        if at:  # the budget re-times the loop up to three times (excb.training.budget.CHECK_FRACTIONS)
            line += f" (corrected at step{'s' if len(at) > 1 else ''} {', '.join(map(str, at))} from the loop's pace)"
        elif out["corrected_at_step"] is not None:  # a run planned before the corrections were listed
            line += f" (corrected at step {out['corrected_at_step']} from the loop's pace)"
    elif cfg.budget:
        out["chosen_by"] = "budget_pending"
        line = f"budget {cfg.budget}: max_steps is set at the start by timing real steps on this machine"
    elif cfg.max_steps is not None:
        line = f"max_steps={cfg.max_steps}, as configured"
    else:
        line = f"epochs={cfg.epochs}, as configured"
    out["line"] = line
    return out
