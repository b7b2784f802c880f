"""PCA whitening of the served embedding: the fit, the model's buffers, the trainer's end-of-run fit, the bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from excb.config import resolve
from excb.evaluation.whitening_fit import fit_images, fit_model
from excb.models import build_model
from excb.models.whitening import Whitening, fit_pca
from excb.training.teacher import load_teacher
from excb.training.trainer import train
from support.training import read_rows, tiny

torch.set_num_threads(1)


def _anisotropic(n: int = 4000, dim: int = 12, seed: int = 0) -> torch.Tensor:
    """Gaussian rows whose variances span four orders of magnitude, rotated and shifted."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, dim)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    return (torch.randn(n, dim, generator=g) * scales) @ rotation + 5.0


def test_fit_without_shrinkage_whitens_the_training_features() -> None:
    x = _anisotropic()
    mean, proj = fit_pca(x, shrink=0.0)
    y = (x - mean) @ proj
    assert torch.allclose(y.mean(0), torch.zeros(12), atol=1e-4)
    assert torch.allclose(torch.cov(y.T), torch.eye(12), atol=2e-3)  # 1e-6 x mean eigenvalue floor: 0.9985


def test_shrinkage_keeps_low_variance_directions_small_and_orders_them() -> None:
    x = _anisotropic()
    mean, proj = fit_pca(x, shrink=0.1)
    var = torch.cov(((x - mean) @ proj).T).diagonal()
    assert torch.all(var[:-1] >= var[1:] - 1e-5)  # columns ordered by decreasing variance
    assert 0.9 < var[0] < 1.0 and var[-1] < 0.05  # the largest direction nearly whitened, the smallest held down


def test_fit_refuses_too_few_rows_and_survives_constant_features() -> None:
    with pytest.raises(ValueError, match="N >= 2"):
        fit_pca(torch.ones(1, 4))
    mean, proj = fit_pca(torch.ones(10, 4))
    assert torch.isfinite(proj).all() and torch.equal((torch.ones(3, 4) - mean) @ proj, torch.zeros(3, 4))


def test_whitening_is_the_identity_until_fitted() -> None:
    w = Whitening(5)
    x = torch.randn(3, 5)
    assert not w.fitted and torch.equal(w(x), x)
    mean, proj = fit_pca(_anisotropic(dim=5))
    w.load_fit(mean, proj, 4000)
    assert w.fitted and torch.allclose(w(x), (x - mean) @ proj)


def test_whitening_off_leaves_the_state_dict_as_before() -> None:
    """Checkpoints written before whitening existed (or with it off) still load strictly."""
    off = build_model(resolve(overrides=["data=digits"]), teacher=True)
    on = build_model(resolve(overrides=["data=digits", "model.whitening=pca"]), teacher=True)
    assert off.whiten is None and not any(k.startswith("whiten.") for k in off.state_dict())
    assert {k for k in on.state_dict() if k.startswith("whiten.")} == {"whiten.mean", "whiten.proj", "whiten.images"}


def test_fit_model_whitens_what_the_model_serves() -> None:
    cfg = resolve(overrides=["data=digits", "model.whitening=pca", "model.width=8", "augment.global_size=16"])
    model = build_model(cfg, teacher=True).eval()
    result = fit_model(model, fit_images(cfg, max_images=600), torch.device("cpu"))
    assert result["fitted"] and result["images"] == 600 and model.whiten.fitted
    x = torch.stack([fit_images(cfg, max_images=600)[i] for i in range(600)])
    with torch.no_grad():
        served, raw = model.features(x), model.unwhitened_features(x)
    assert torch.allclose(served, (raw - model.whiten.mean) @ model.whiten.proj, atol=1e-5)
    assert served.mean(0).abs().max() < 1e-3  # centred on the images it was fitted on
    assert model.training is False


def test_a_run_fits_its_whitening_at_the_end_and_the_bundle_serves_it(tmp_path: Path) -> None:
    from excb.inference.export import export_bundle
    from excb.inference.onnx_runtime import OrtEmbedder, load_bundle

    out = tmp_path / "run"
    train(tiny(out, "max_steps=4", "model.whitening=pca", "data.limit=300"))
    rows = [r for r in read_rows(out) if r["type"] == "whitening"]
    assert len(rows) == 1 and rows[0]["fitted"] and rows[0]["images"] == 300 and rows[0]["step"] == 4
    teacher = load_teacher(out)
    assert teacher.model.whiten is not None and int(teacher.model.whiten.images) == 300
    meta = export_bundle(out, tmp_path / "bundle", parity_data="digits", parity_count=32)
    assert meta["whitening"] == {"kind": "pca", "fitted": True, "images": 300} and meta["parity"]["passed"]
    x = torch.stack([fit_images(teacher.cfg)[i] for i in range(8)])
    with torch.no_grad():
        expected = teacher.model.features(x).numpy()
    got, _ = OrtEmbedder(load_bundle(tmp_path / "bundle"), intra_op_threads=1).run(x.numpy())
    assert np.allclose(got, expected, atol=1e-3 * float(np.abs(expected).max()))


def test_an_interrupted_run_keeps_the_identity(tmp_path: Path) -> None:
    from excb.training.trainer import TrainingInterrupted

    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(tiny(out, "max_steps=6", "model.whitening=pca"), should_stop=lambda: True)
    assert not any(r["type"] == "whitening" for r in read_rows(out))
    assert not load_teacher(out).model.whiten.fitted


def test_baselines_whiten_the_random_network_and_report_whitened_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    import excb.evaluation.runs
    from excb.evaluation.runs import baselines

    monkeypatch.setattr(excb.evaluation.runs, "FIT_IMAGES", 150)  # fitted like the trainer: at most FIT_IMAGES images
    cfg = resolve(overrides=["data=digits", "model.whitening=pca", "model.width=8", "augment.global_size=16"])
    out = baselines(cfg, "digits", torch.device("cpu"), train_limit=400, test_limit=100)
    assert set(out) == {"raw_pixels", "raw_pixels_whitened", "random_init"}
    assert 0.5 < out["raw_pixels_whitened"]["knn_acc"] <= 1.0 and out["raw_pixels_whitened"]["feature_dim"] == 256
    assert out["raw_pixels_whitened"]["whitened_on"] == out["random_init"]["whitened_on"] == 150
    assert json.dumps(out)  # plain numbers all through (excb eval --json)


def test_evaluate_model_ranks_on_the_served_embedding_and_probes_before_whitening() -> None:
    from excb.evaluation.metrics import evaluate_features, extract_features
    from excb.evaluation.runs import evaluate_model
    from excb.evaluation.splits import labelled_splits, model_transform

    cfg = resolve(overrides=["data=digits", "model.whitening=pca", "model.width=8", "augment.global_size=16"])
    model = build_model(cfg, teacher=True).eval()
    train_ds, test_ds = labelled_splits("digits", model_transform(cfg), 400, 100)
    fit_model(model, train_ds, torch.device("cpu"))
    res = evaluate_model(model, train_ds, test_ds, linear=True, linear_kwargs={"epochs": 5})
    served = [extract_features(model.features, ds) for ds in (train_ds, test_ds)]
    assert res["knn_acc"] == evaluate_features(*served[0], *served[1])["knn_acc"]
    assert res["linear"]["features"] == "unwhitened" and res["feature_dim"] == model.embed_dim


def test_too_few_decodable_images_leave_the_identity() -> None:
    cfg = resolve(overrides=["data=digits", "model.whitening=pca", "model.width=8", "augment.global_size=16"])
    model = build_model(cfg, teacher=True).eval()
    images = [torch.rand(3, 16, 16) for _ in range(3)] + [None, None]  # None: an undecodable file, skipped
    result = fit_model(model, images, torch.device("cpu"))  # type: ignore[arg-type]
    assert result == {"fitted": False, "reason": "3 decodable images", "images": 3} and not model.whiten.fitted
    assert fit_model(model, [None] * 4, torch.device("cpu"))["images"] == 0  # type: ignore[arg-type]


def test_the_fit_time_estimate_leaves_the_model_as_it_was() -> None:
    """A budgeted run reserves the fit's time (excb.training.budget.calibrate): the estimate times a real pass over a
    sample of the fit images, without fitting or changing the model; no whitening costs nothing."""
    from excb.evaluation.whitening_fit import estimate_fit_seconds

    cfg = resolve(overrides=["data=digits", "model.whitening=pca", "model.width=8", "augment.global_size=16"])
    model = build_model(cfg, teacher=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert estimate_fit_seconds(model, cfg, torch.device("cpu"), sample=64) > 0
    assert model.training and not model.whiten.fitted
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    off = resolve(overrides=["data=digits", "model.whitening=off", "model.width=8", "augment.global_size=16"])
    assert estimate_fit_seconds(build_model(off, teacher=True), off, torch.device("cpu")) == 0.0
