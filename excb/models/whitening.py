"""PCA whitening of the served embedding, fitted on the run's own training images when training ends.

Why: a self-supervised embedding after a short run is anisotropic. A few directions carry most of its variance,
and a cosine between two embeddings is then mostly a comparison along those directions. Rotating onto the
principal axes and dividing each by its standard deviation lets every direction count. This is the PCA
whitening of image retrieval (Jégou & Chum, ECCV 2012). On the quality suite it moved kNN on every set, measured
on the same trained teachers (benchmarks/RESULTS.md, "PCA whitening of the served embedding"): Fashion-MNIST
85.8 -> 89.6 %, icons 47.0 -> 53.0 %.

The whitening is a fixed linear map ``x -> (x - mean) @ proj``. It is part of the model (buffers of
:class:`Whitening`, in the teacher's state dict), so the checkpoint, ``excb eval``, the ONNX bundle and
everything that serves or indexes it agree. Until it is fitted it is the identity.

Shrinkage: each eigenvalue gets ``SHRINK`` x the mean eigenvalue added before the inverse square root. Without
it, directions of tiny variance are blown up to unit variance; with a few hundred images, those directions are
mostly noise (icons: 51.0 % kNN unshrunk, 53.0 % at 0.1). With it, a fit on far fewer images than dimensions is
still safe: fitted on 16 images, kNN was +2.6 (icons) and +1.0 (Fashion-MNIST) over no whitening, and 0.6 below
on openclipart, inside that set's noise (RESULTS.md, "how many images the whitening needs").
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

log = logging.getLogger("excb.whitening")

SHRINK = 0.1          # added to every eigenvalue, as a fraction of their mean (ridge shrinkage)
FIT_IMAGES = 10_000   # evenly spaced training images the covariance is estimated from
MIN_IMAGES = 8        # fewer decodable images than this: stay the identity
ESTIMATE_IMAGES = 256  # images timed at the start of a budgeted run to reserve the fit's time


class Whitening(nn.Module):
    """``x -> (x - mean) @ proj``; the identity until :meth:`load_fit` gives it a fit."""

    mean: Tensor    # buffers, typed for the type checker
    proj: Tensor
    images: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("proj", torch.eye(dim))
        self.register_buffer("images", torch.zeros((), dtype=torch.long))  # 0: never fitted

    @classmethod
    def fitted_on(cls, features: Tensor, shrink: float = SHRINK) -> "Whitening":
        """A whitening fitted on ``features`` [N, D] (the baselines whiten raw pixels with it)."""
        whiten = cls(features.shape[1])
        whiten.load_fit(*fit_pca(features, shrink), features.shape[0])
        return whiten

    @property
    def fitted(self) -> bool:
        return int(self.images) > 0

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() - self.mean) @ self.proj

    @torch.no_grad()
    def load_fit(self, mean: Tensor, proj: Tensor, images: int) -> None:
        """Take a fit from :func:`fit_pca` (copied into the existing buffers, on their device)."""
        self.mean.copy_(mean)
        self.proj.copy_(proj)
        self.images.fill_(images)


def whitening_meta(whiten: Whitening | None) -> dict[str, Any]:
    """Whether an embedding is PCA-whitened, and on how many training images: the ONNX bundle's model.json and
    the fine-tuning weights' backbone.json say it in the same words."""
    if whiten is None:
        return {"kind": "off"}
    return {"kind": "pca", "fitted": whiten.fitted, "images": int(whiten.images)}


def fit_pca(features: Tensor, shrink: float = SHRINK) -> tuple[Tensor, Tensor]:
    """``(mean [D], proj [D, D])`` whitening ``features`` [N, D]; columns ordered by decreasing variance.

    The covariance is taken in float64, so a few thousand rows of a 2048-d feature stay well conditioned.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected [N >= 2, D], got {tuple(features.shape)}")
    x = features.double()
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / (x.shape[0] - 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    eigvals, eigvecs = eigvals.flip(0).clamp_min(0.0), eigvecs.flip(1)
    total = float(eigvals.mean())
    floor = max(shrink, 1e-6) * total if total > 0 else 1.0  # constant features: centring maps them to 0
    proj = eigvecs * (eigvals + floor).rsqrt()
    return mean.float(), proj.float()


def fit_images(cfg: Any, max_images: int = FIT_IMAGES) -> Dataset:
    """Up to ``max_images`` of the run's training data, evenly spaced, through the eval transform."""
    from excb.evaluation.runs import model_transform

    source = cfg.data.source.strip()
    transform = model_transform(cfg)
    if source.startswith("shards:"):
        from excb.data.shards import open_shards

        limit = min(max_images, cfg.data.limit) if cfg.data.limit else max_images
        return open_shards(source, transform=transform, limit=limit, max_pixels=cfg.data.max_image_pixels)
    from excb.data.datasets import build_dataset, evenly_spaced_subset

    ds = build_dataset(source, split=cfg.data.split, limit=cfg.data.limit, transform=transform,
                       max_pixels=cfg.data.max_image_pixels)
    return evenly_spaced_subset(ds, max_images)


def _embeddings(encode: Any, dataset: Dataset, device: torch.device, num_workers: int) -> Tensor:
    """``encode`` over ``dataset`` (labels, if any, dropped); nothing decodable gives [0, 0]."""
    from excb.evaluation.runs import extract_features

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
    from torch.utils.data import IterableDataset

    from excb.data.datasets import evenly_spaced_subset

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


__all__ = ["FIT_IMAGES", "SHRINK", "Whitening", "estimate_fit_seconds", "fit_images", "fit_model", "fit_pca",
           "whitening_meta"]
