"""CI guard (issue 28 item 2): the default recipe, trained a fixed number of steps, must rank neighbours better
than raw pixels and than its own untrained network, on a validation split nothing was tuned on.

A time budget would train fewer steps on a slower or busier machine; a fixed step count makes the figure a
property of the code. The set is ``icons`` of benchmarks/suite_data.py (three Debian icon themes, installed by
scripts/system-deps.sh; prepared in about half a minute). On the digit sets raw pixels reach 98% and 300 steps
reach 89.5%; on Fashion-MNIST the whitened pixels (88.6%) are not passed within ten minutes.

Not yet the guard the issue asks for (ExCB >= the *best* pixel baseline, the better of raw and whitened pixels):
at 800 steps on icons that margin was +6.9, +0.6 and -1.9 points over seeds 0, 1, 2 (160 validation images;
benchmarks/RESULTS.md, "CI guard"), so asserting it would fail on one run in three. What held on every seed with
room to spare is asserted: over raw pixels +13.8 / +7.5 / +5.0, over the untrained network (whitened alike)
+10.0 / +4.4 / +6.9.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from excb.config import resolve
from excb.evaluation.runs import baselines, evaluate_model
from excb.evaluation.splits import labelled_splits, model_transform
from excb.training.teacher import load_teacher
from excb.training.trainer import train
from support import REPO_ROOT as ROOT

SET = "icons"
STEPS = 800
OVER_RAW = 0.02        # kNN accuracy ExCB must lead raw pixels by (lowest lead over three seeds: 0.050)
OVER_UNTRAINED = 0.02  # ... and the same network randomly initialised (lowest lead over three seeds: 0.044)


def _suite_data():
    spec = importlib.util.spec_from_file_location("suite_data", ROOT / "benchmarks" / "suite_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["suite_data"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def guard_figures(data_root: Path, out: Path, *extra: str) -> dict[str, float]:
    """Train the default recipe on ``SET``'s validation view for ``STEPS`` steps; kNN (k=20) of its served
    embedding, raw and whitened pixels and the untrained network on the validation images."""
    sd = _suite_data()
    sd.prepare(SET, data_root)
    source = sd.data_source(SET, data_root, "val")
    threads = torch.get_num_threads()
    # other test modules pin 1 thread at import; the guard takes the threads the suite was started with
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or min(2, os.cpu_count() or 1))
    try:
        train(resolve(overrides=[f"data={source}", f"out={out}", f"max_steps={STEPS}", "progress=false", *extra]))
        cfg, model, *_ = load_teacher(out, torch.device("cpu"))
        excb = evaluate_model(model, *labelled_splits(source, model_transform(cfg)), k=20, batch_size=512)
        base = baselines(cfg, source, torch.device("cpu"), k=20, batch_size=512)
    finally:
        torch.set_num_threads(threads)
    return {"excb": excb["knn_acc"], "raw": base["raw_pixels"]["knn_acc"],
            "whitened": base["raw_pixels_whitened"]["knn_acc"], "untrained": base["random_init"]["knn_acc"],
            "recipe": cfg.recipe, "steps": json.loads((out / "summary.json").read_text())["steps"]}


@pytest.mark.slow
# a hang guard, not a speed limit: 800 steps took 185 s on a quiet machine with 2 threads and 879 s (plus the
# evaluation) with 1 thread at load average 10, past the suite's default 900 s
@pytest.mark.timeout(3600)
def test_the_default_recipe_beats_pixels_and_its_untrained_network_on_validation(tmp_path: Path) -> None:
    f = guard_figures(tmp_path / "data", tmp_path / "run")
    assert f["recipe"] == "fitted" and f["steps"] == STEPS  # no preset: the recipe a user gets
    assert f["excb"] >= f["raw"] + OVER_RAW, f
    assert f["excb"] >= f["untrained"] + OVER_UNTRAINED, f
