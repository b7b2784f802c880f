"""Cluster-balance statistics: the one place that defines them, for training and serving alike.

Inputs are either raw assignment *counts* (a histogram) or *sizes* (relative frequencies such as the
ExCB size estimate ``s``). Everything here is plain NumPy so the embedding service can use it without
touching torch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
# An EMA estimate is never exactly zero; below this relative size (K*s) a cluster counts as empty.
EMPTY_RELATIVE_SIZE = 0.01


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("balance statistics need at least one cluster")
    if np.any(arr < 0) or not np.all(np.isfinite(arr)):
        raise ValueError("cluster sizes must be finite and non-negative")
    return arr


def shares(x: Any) -> np.ndarray:
    """Normalise counts or sizes to shares summing to 1 (uniform when everything is zero)."""
    arr = _as_array(x)
    total = arr.sum()
    if total <= 0:
        return np.full_like(arr, 1.0 / arr.size)
    return arr / total


def relative_sizes(x: Any) -> np.ndarray:
    """``K * share``: 1 means exactly uniform (the paper's ``K s_k``)."""
    p = shares(x)
    return p * p.size


def entropy(p: np.ndarray) -> float:
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def gini(p: np.ndarray) -> float:
    """Gini coefficient of the shares: 0 = perfectly balanced, ->1 = everything in one cluster."""
    k = p.size
    if k == 1:
        return 0.0
    sorted_p = np.sort(p)
    idx = np.arange(1, k + 1)
    return float((2.0 * (idx * sorted_p).sum()) / (k * sorted_p.sum()) - (k + 1) / k)


def balance_stats(x: Any, kind: str = "counts", empty_threshold: float = EMPTY_RELATIVE_SIZE) -> dict[str, float]:
    """All balance statistics of one distribution over K clusters.

    ``kind="counts"``: a cluster is empty when its count is zero. ``kind="sizes"``: when its relative size
    ``K*s`` is below ``empty_threshold`` (an EMA never reaches exactly zero).
    """
    if kind not in ("counts", "sizes"):
        raise ValueError("kind must be 'counts' or 'sizes'")
    arr = _as_array(x)
    k = arr.size
    p = shares(arr)
    rel = p * k
    h = entropy(p)
    log_k = math.log(k) if k > 1 else 1.0
    empty = (arr == 0) if kind == "counts" else (rel < empty_threshold)
    out: dict[str, float] = {
        "num_clusters": float(k),
        "total": float(arr.sum()),
        "entropy": h,
        "normalized_entropy": h / log_k if k > 1 else 1.0,
        "effective_clusters": math.exp(h),
        "empty_fraction": float(empty.mean()),
        "max_share": float(p.max()),
        "min_share": float(p.min()),
        "gini": gini(p),
        "kl_to_uniform": (log_k - h) if k > 1 else 0.0,
        "below_0.1_fraction": float((rel < 0.1).mean()),
    }
    for q, v in zip(QUANTILES, np.quantile(rel, QUANTILES)):
        out[f"rel_size_p{int(round(q * 100)):02d}"] = float(v)
    return out


def sorted_curve(x: Any, max_points: int = 256) -> dict[str, list[float]]:
    """The paper's Figure-5 curve: relative sizes K*s sorted descending, downsampled for plotting.

    Returns ``{"rank": [...], "relative_size": [...]}`` where ``rank`` is the fraction of clusters (0..1)
    so curves with different K overlay. Zero sizes are kept (the dashboard marks them as empty).
    """
    rel = np.sort(relative_sizes(x))[::-1]
    k = rel.size
    if k <= max_points:
        idx = np.arange(k)
    else:
        idx = np.unique(np.linspace(0, k - 1, max_points).round().astype(int))
    return {"rank": [float(i / max(k - 1, 1)) for i in idx], "relative_size": [float(rel[i]) for i in idx]}


def drift(served: Any, reference: Any, eps: float = 1e-6) -> dict[str, float]:
    """How far served-traffic shares are from the training distribution (same K).

    ``kl`` is KL(served || reference) with additive smoothing, ``js`` the Jensen-Shannon divergence (nats,
    bounded by log 2), ``tv`` the total-variation distance.
    """
    p = shares(served)
    q = shares(reference)
    if p.size != q.size:
        raise ValueError(f"cluster count mismatch: served {p.size} vs reference {q.size}")
    ps = (p + eps) / (1 + eps * p.size)
    qs = (q + eps) / (1 + eps * q.size)
    m = 0.5 * (ps + qs)
    kl = float((ps * np.log(ps / qs)).sum())
    js = float(0.5 * (ps * np.log(ps / m)).sum() + 0.5 * (qs * np.log(qs / m)).sum())
    tv = float(0.5 * np.abs(p - q).sum())
    return {"kl": kl, "js": js, "tv": tv}
