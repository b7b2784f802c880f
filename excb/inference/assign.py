"""Cluster assignment of a batch of embeddings, shared by the embed service and ``excb embed``.

One call turns the model's outputs (embedding [N, D], cosines to the K centroids [N, K]) into what both
report: the (optionally L2-normalised) embedding, the raw assignment (argmax cosine), the balanced one
(``excb.method.balancing.balance`` in ``paper`` mode with the bundle's final size estimate ``s``) and the top-k
nearest clusters.

Why NumPy and not a call to the torch operator: on the serving path the torch call cost ~50-150 us per
request for a handful of float operations. The per-cluster factors come from the training code
(``balance_factors``, computed once per model), and the two lines that apply them repeat the operator's
float32 operations in the same order, so the result is bit-identical (tests/excb/test_assign.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_ONE = np.float32(1.0)


@dataclass(frozen=True)
class Assignment:
    """Per-image results, row i for image i; ``top_ids``/``top_sims`` are None when top-k was not asked for."""

    embeddings: np.ndarray  # [N, D] float32
    cluster: np.ndarray  # [N] argmax of the cosines
    similarity: np.ndarray  # [N] its cosine
    balanced_cluster: np.ndarray  # [N] argmax of the balanced scores
    balanced_similarity: np.ndarray  # [N] the cosine of that cluster
    balanced_score: np.ndarray  # [N] its balanced score
    top_ids: np.ndarray | None = None  # [N, k], most similar first
    top_sims: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.cluster)


class Assigner:
    """Assignments for one model: holds the balance factors of its size estimate ``s`` [K]."""

    def __init__(self, sizes: np.ndarray) -> None:
        # lazy: torch only to derive the factors once per model; the per-request path is NumPy
        import torch

        from excb.method.balancing import balance_factors

        lo, hi = balance_factors(torch.from_numpy(np.ascontiguousarray(sizes, dtype=np.float32)))
        self.lo = lo.numpy().astype(np.float32, copy=True)
        self.hi = hi.numpy().astype(np.float32, copy=True)

    def balanced(self, sims: np.ndarray) -> np.ndarray:
        """B(z; s) in ``paper`` mode: ``excb.method.balancing.balance``'s float32 operations, in its order."""
        z = np.asarray(sims, dtype=np.float32)
        out = _ONE - (_ONE - z) * self.lo
        return (_ONE + out) * self.hi - _ONE

    def __call__(self, emb: np.ndarray, sims: np.ndarray, *, top_k: int = 0, normalize: bool = True) -> Assignment:
        sims = np.asarray(sims, dtype=np.float32)
        rows = np.arange(len(sims))
        raw = sims.argmax(1)
        scores = self.balanced(sims)
        bal = scores.argmax(1)
        ids, vals = nearest(sims, top_k) if top_k > 0 else (None, None)
        vectors = l2_normalize(emb) if normalize else np.asarray(emb, dtype=np.float32)
        return Assignment(vectors, raw, sims[rows, raw], bal, sims[rows, bal], scores[rows, bal], ids, vals)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32, copy=False)


def nearest(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` largest entries per row, sorted descending (ties: lower index first)."""
    k = max(1, min(int(k), sims.shape[1]))
    if k == sims.shape[1]:
        idx = np.argsort(-sims, axis=1, kind="stable")
    else:
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
        idx = np.take_along_axis(part, order, axis=1)
    return idx, np.take_along_axis(sims, idx, axis=1)


__all__ = ["Assigner", "Assignment", "l2_normalize", "nearest"]
