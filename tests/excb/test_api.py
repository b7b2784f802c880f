"""The Python API (issue 32, training): ``excb.train(data=, out=, budget=, **overrides)`` returns the run, typed;
``excb.export_weights`` and ``excb.embed`` are the CLI verbs as calls."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import excb
from excb.config import ConfigError
from support import embed as es
from support.training import image_folder, read_rows

torch.set_num_threads(1)

TINY = {"batch_size": 32, "model": {"width": 8, "num_clusters": 32, "projector_hidden_dim": 32,
                                    "bottleneck_dim": 16, "predictor_hidden_dim": 32},
        "augment.global_size": 16, "augment.local_size": 8, "augment.num_local_crops": 2,
        "kmeans.samples": 256, "kmeans.iterations": 5, "progress": False, "data.num_workers": 0}


def test_train_returns_the_run(tmp_path: Path) -> None:
    run = excb.train(data="digits", out=tmp_path / "run", preset="cpu-small", max_steps=3, **TINY)
    assert isinstance(run, excb.TrainedRun)
    assert run.out == tmp_path / "run" and run.status == "completed" and run.steps == 3
    last = [r for r in read_rows(run.out) if r["type"] == "step"][-1]
    assert run.metrics["step"] == 3 and run.metrics["loss"] == pytest.approx(last["loss"])
    assert math.isfinite(run.metrics["loss"])
    assert "s_effective_clusters" in run.metrics and run.summary["steps"] == 3
    for path in (run.config, run.checkpoint, run.weights, run.metrics_file):
        assert path.is_file(), path
    config = run.config.read_text()
    assert "width: 8" in config and "model.width" in config  # the overrides are set and pinned
    emb = run.load_backbone()
    with torch.no_grad():
        assert emb(torch.zeros(2, 3, 16, 16)).shape == (2, 64)
    meta = excb.export_weights(run.out, tmp_path / "weights")
    assert meta["architecture"] == "resnet18" and (tmp_path / "weights" / "backbone.safetensors").is_file()


def test_train_reports_config_mistakes_by_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="budget: 10 has no unit"):
        excb.train(data="digits", out=tmp_path / "a", budget="10")
    with pytest.raises(ConfigError, match="optim.lrr: not a config field; did you mean optim.lr"):
        excb.train(data="digits", out=tmp_path / "b", **{"optim.lrr": 0.1})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_embed_is_the_cli_verb(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "images", 5)
    summary = excb.embed(folder, es.bundle(), tmp_path / "emb.npy")
    assert summary["images"] == 5 and summary["skipped"] == 0
    assert np.load(tmp_path / "emb.npy").shape == (5, summary["embed_dim"])
    assert len(json.loads((tmp_path / "emb.npy.meta.json").read_text())["cluster"]) == 5
