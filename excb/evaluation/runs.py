"""Evaluation runs of a model: its served embedding on a labelled source, the trainer's online kNN, and the
raw-pixel / random-init baselines a learned representation must beat (data.md). The metrics are in
excb.evaluation.metrics, the splits and transform in excb.evaluation.splits, ``excb eval`` in excb.evaluation.cli.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import transforms

from excb.data.datasets import evenly_spaced, evenly_spaced_subset
from excb.evaluation.metrics import evaluate, evaluate_features, extract_features, linear_probe, raw_pixel_features
from excb.evaluation.splits import labelled_splits, model_transform
from excb.evaluation.whitening_fit import FIT_IMAGES, fit_model
from excb.models import ExCBModel, build_model
from excb.models.whitening import Whitening


def evaluate_model(model: ExCBModel, train_ds: Dataset, test_ds: Dataset, k: int = 20, temperature: float = 0.07,
                   linear: bool = False, batch_size: int = 256, device: str | torch.device = "cpu",
                   num_workers: int = 0, progress: bool = False,
                   linear_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """kNN on the embedding ``model`` serves; the linear probe on that embedding before its whitening.

    Why the probe skips the whitening (excb.models.whitening): a linear map followed by a linear classifier is still
    linear, so whitening cannot add to what a probe can separate; the probe standardises its input itself, and on
    whitened input its SGD fits the noise of the shrunken low-variance directions (icons, one ten-minute teacher:
    48.0 % unwhitened, 38.4 % whitened). A model without whitening is evaluated exactly as :func:`evaluate` does.
    """
    whiten = getattr(model, "whiten", None)
    if whiten is None:
        return evaluate(model.features, train_ds, test_ds, k, temperature, linear, batch_size, device, num_workers,
                        progress, linear_kwargs)
    t0 = time.perf_counter()
    train_feats, train_labels = extract_features(model.unwhitened_features, train_ds, batch_size, device, num_workers,
                                                 progress)
    test_feats, test_labels = extract_features(model.unwhitened_features, test_ds, batch_size, device, num_workers,
                                               progress)
    extract_seconds = time.perf_counter() - t0
    with torch.no_grad():
        served = [whiten(f.to(whiten.mean.device)).cpu() for f in (train_feats, test_feats)]
    out = evaluate_features(served[0], train_labels, served[1], test_labels, k, temperature)
    if linear:
        out["linear"] = {**linear_probe(train_feats, train_labels, test_feats, test_labels, **(linear_kwargs or {})),
                         "features": "unwhitened"}
    out["extract_seconds"] = extract_seconds
    return out


def online_knn(teacher: ExCBModel, cfg: Any, device: torch.device) -> dict[str, Any] | None:
    """The trainer's kNN of the teacher on the labelled train/test split of the run's own data.

    A source without labels (an unlabelled folder) returns None, with a warning in train.log.
    """
    try:
        train_ds, test_ds = labelled_splits(cfg.data.source, model_transform(cfg), cfg.eval.train_limit,
                                            cfg.eval.test_limit)
    except (ValueError, FileNotFoundError) as exc:
        logging.getLogger("excb.trainer").warning("online kNN skipped: %s", exc)
        return None
    teacher.eval()
    try:
        res = evaluate(teacher.features, train_ds, test_ds, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                       batch_size=256, device=device)
    finally:
        teacher.train()
    return {"knn_acc": res["knn_acc"], "knn_majority_acc": res["knn_majority_acc"], "knn_k": cfg.eval.knn_k}


def baselines(cfg: Any, data: str, device: torch.device, k: int = 20, temperature: float = 0.07,
              linear: bool = False, train_limit: int | None = None, test_limit: int | None = None,
              batch_size: int = 256) -> dict[str, Any]:
    """Raw pixels at the model's input size and the same network randomly initialised, evaluated exactly like
    the trained teacher: a representation is only learned if it beats both (data.md).

    With ``model.whitening=pca`` the random network's whitening is fitted as the trainer fits the teacher's (on
    at most ``FIT_IMAGES`` evenly spaced training images), and ``raw_pixels_whitened`` adds the pixels under a
    whitening fitted on the same images (kNN only): whitening alone is not a learned representation.
    """
    size = cfg.augment.global_size
    pixels = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])
    raw_train, raw_test = labelled_splits(data, pixels, train_limit, test_limit)
    (tr, ytr), (te, yte) = raw_pixel_features(raw_train), raw_pixel_features(raw_test)
    out = {"raw_pixels": evaluate_features(tr, ytr, te, yte, k=k, temperature=temperature, linear=linear)}
    torch.manual_seed(cfg.seed)
    random_model = build_model(cfg, teacher=True).to(device).eval()
    train_ds, test_ds = labelled_splits(data, model_transform(cfg), train_limit, test_limit)
    fit: dict[str, Any] = {}
    if cfg.model.whitening == "pca":  # whitened as the trained model is, so the comparison is like for like
        fit = fit_model(random_model, evenly_spaced_subset(train_ds, FIT_IMAGES), device)
        white = Whitening.fitted_on(tr[evenly_spaced(tr.shape[0], FIT_IMAGES)].float())
        out["raw_pixels_whitened"] = evaluate_features(white(tr), ytr, white(te), yte, k=k, temperature=temperature)
        out["raw_pixels_whitened"]["whitened_on"] = int(white.images)
    out["random_init"] = evaluate_model(random_model, train_ds, test_ds, k=k, temperature=temperature,
                                        linear=linear, batch_size=batch_size, device=device)
    if fit.get("fitted"):
        out["random_init"]["whitened_on"] = fit["images"]
    return out
