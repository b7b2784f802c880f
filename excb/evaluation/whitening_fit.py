"""Fitting a model's PCA whitening (excb.models.whitening) on the run's own training images, when training ends.

The trainer calls :func:`fit_model` after the last step, a budgeted run reserves :func:`estimate_fit_seconds`
at its start, and the random-init baseline is whitened the same way (excb.evaluation.runs.baselines). The
embedding is the model's unwhitened one, extracted as every evaluation extracts features.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from excb.data.datasets import build_dataset, evenly_spaced_subset
from excb.data.shards import open_shards
from excb.evaluation.metrics import extract_features
from excb.evaluation.splits import model_transform
from excb.models.whitening import SHRINK, fit_pca

log = logging.getLogger("excb.whitening")  # the name train.log has always shown for the fit

FIT_IMAGES = 10_000   # evenly spaced training images the covariance is estimated from
MIN_IMAGES = 8        # fewer decodable images than this: stay the identity
ESTIMATE_IMAGES = 256  # images timed at the start of a budgeted run to reserve the fit's time


def fit_images(cfg: Any, max_images: int = FIT_IMAGES) -> Dataset:
    """Up to ``max_images`` of the run's training data, evenly spaced, through the eval transform."""
    source = cfg.data.source.strip()
    transform = model_transform(cfg)
    if source.startswith("shards:"):
        limit = min(max_images, cfg.data.limit) if cfg.data.limit else max_images
        return open_shards(source, transform=transform, limit=limit, max_pixels=cfg.data.max_image_pixels)
    ds = build_dataset(source, split=cfg.data.split, limit=cfg.data.limit, transform=transform,
                       max_pixels=cfg.data.max_image_pixels)
    return evenly_spaced_subset(ds, max_images)


def _embeddings(encode: Any, dataset: Dataset, device: torch.device, num_workers: int) -> Tensor:
    """``encode`` over ``dataset`` (labels, if any, dropped); nothing decodable gives [0, 0]."""
    try:
        return extract_features(encode, dataset, batch_size=256, device=device, num_workers=num_workers)[0]
    except ValueError:  # no samples at all
        return torch.empty(0, 0)


def fit_model(model: nn.Module, dataset: Dataset, device: torch.device, num_workers: int = 0) -> dict[str, Any]:
    """Fit ``model.whiten`` on the model's unwhitened embedding of ``dataset``; returns what was done.

    A model without whitening, or too few decodable images, leaves the model as it was. ``num_workers``
    decode in parallel (a GPU run's 10,000 full-size images would otherwise decode on one core).
    """
    whiten = getattr(model, "whiten", None)
    if whiten is None:
        return {"fitted": False, "reason": "model.whitening=off"}
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        feats = _embeddings(model.unwhitened_features, dataset, device, num_workers)
    finally:
        model.train(was_training)
    if feats.shape[0] < MIN_IMAGES:
        log.warning("embedding whitening not fitted: %d decodable images (need %d)", feats.shape[0], MIN_IMAGES)
        return {"fitted": False, "reason": f"{feats.shape[0]} decodable images", "images": int(feats.shape[0])}
    mean, proj = fit_pca(feats)
    whiten.load_fit(mean, proj, int(feats.shape[0]))
    seconds = time.perf_counter() - t0
    log.info("embedding whitening fitted on %d training images in %.1f s", feats.shape[0], seconds)
    return {"fitted": True, "images": int(feats.shape[0]), "dim": int(feats.shape[1]), "seconds": round(seconds, 2),
            "shrink": SHRINK}


def estimate_fit_seconds(model: nn.Module, cfg: Any, device: torch.device, num_workers: int = 0,
                         sample: int = ESTIMATE_IMAGES) -> float:
    """Seconds :func:`fit_model` on ``fit_images(cfg)`` will take at the end of the run, from a timed pass over
    ``sample`` of those images, scaled to their number: a budgeted run reserves it (excb.training.budget.calibrate).
    0 for a model without whitening; the model is left as it was."""
    if getattr(model, "whiten", None) is None:
        return 0.0
    images = fit_images(cfg)
    part = fit_images(cfg, sample) if isinstance(images, IterableDataset) else evenly_spaced_subset(images, sample)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        feats = _embeddings(model.unwhitened_features, part, device, num_workers)
    finally:
        model.train(was_training)
    embed = time.perf_counter() - started
    if feats.shape[0] < MIN_IMAGES:
        return embed
    started = time.perf_counter()
    fit_pca(feats)
    # why the ignore below: torch's Dataset declares no __len__; the sets here are map-style
    return embed * len(images) / feats.shape[0] + (time.perf_counter() - started)  # type: ignore[arg-type]


__all__ = ["ESTIMATE_IMAGES", "FIT_IMAGES", "MIN_IMAGES", "estimate_fit_seconds", "fit_images", "fit_model"]
