"""CI guard (issue 28 item 2): the default recipe, trained a fixed number of steps, must rank neighbours at least as
well as the best pixel baseline (the better of raw and PCA-whitened raw pixels) and better than its own untrained
network, on a validation split nothing was tuned on.

A time budget would train fewer steps on a slower or busier machine; a fixed step count makes the figure a
property of the code. The set is ``opencv-digits`` of benchmarks/suite_data.py (OpenCV's 5,000 MNIST-derived
20x20 digits, Debian's opencv-doc, installed by scripts/system-deps.sh; validation view 3,200 / 800), the stand-in
for the grey digits the product is judged on. At 1,200 steps (benchmarks/RESULTS.md, "CI guard"): 97.4 % and
96.6 % kNN over seeds 0 and 1 against 94.6 % for the best pixels (+2.8, +2.0) and 61.5 % untrained. At 600 steps
the same recipe is 2.3 points under the pixels, so the guard fails if a change halves what the steps learn.
The colour icons set, used before, was too small to assert the best-pixel margin on: at 800 steps it was +6.9,
+0.6 and -1.9 over three seeds (160 validation images).
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

SET = "opencv-digits"
STEPS = 1200
OVER_BEST_PIXELS = 0.0  # kNN accuracy ExCB must reach over the best pixel baseline (lowest lead, 2 seeds: 0.020)
OVER_UNTRAINED = 0.1    # ... and lead the same network randomly initialised by (lowest lead, 2 seeds: 0.35)


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
# a hang guard, not a speed limit: 1,200 steps took 8.6 minutes with 1 thread beside another run, and the
# loaded machine can take several times that
@pytest.mark.timeout(3600)
def test_the_default_recipe_beats_the_best_pixels_and_its_untrained_network_on_validation(tmp_path: Path) -> None:
    f = guard_figures(tmp_path / "data", tmp_path / "run")
    assert f["recipe"] == "fitted" and f["steps"] == STEPS  # no preset: the recipe a user gets
    assert f["excb"] >= max(f["raw"], f["whitened"]) + OVER_BEST_PIXELS, f
    assert f["excb"] >= f["untrained"] + OVER_UNTRAINED, f
