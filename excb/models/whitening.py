"""PCA whitening of the served embedding, fitted on the run's own training images when training ends.

Why: a self-supervised embedding after a short run is anisotropic. A few directions carry most of its variance,
and a cosine between two embeddings is then mostly a comparison along those directions. Rotating onto the
principal axes and dividing each by its standard deviation lets every direction count. This is the PCA
whitening of image retrieval (Jégou & Chum, ECCV 2012). On the quality suite it moved kNN on every set, measured
on the same trained teachers (benchmarks/RESULTS.md, "PCA whitening of the served embedding"): Fashion-MNIST
85.8 -> 89.6 %, icons 47.0 -> 53.0 %.

The whitening is a fixed linear map ``x -> (x - mean) @ proj``. It is part of the model (buffers of
:class:`Whitening`, in the teacher's state dict), so the checkpoint, ``excb eval``, the ONNX bundle and
everything that serves or indexes it agree. Until it is fitted it is the identity. Fitting it on a run's images
is excb.evaluation.whitening_fit.

Shrinkage: each eigenvalue gets ``SHRINK`` x the mean eigenvalue added before the inverse square root. Without
it, directions of tiny variance are blown up to unit variance; with a few hundred images, those directions are
mostly noise (icons: 51.0 % kNN unshrunk, 53.0 % at 0.1). With it, a fit on far fewer images than dimensions is
still safe: fitted on 16 images, kNN was +2.6 (icons) and +1.0 (Fashion-MNIST) over no whitening, and 0.6 below
on openclipart, inside that set's noise (RESULTS.md, "how many images the whitening needs").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

SHRINK = 0.1          # added to every eigenvalue, as a fraction of their mean (ridge shrinkage)


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


__all__ = ["SHRINK", "Whitening", "fit_pca", "whitening_meta"]
