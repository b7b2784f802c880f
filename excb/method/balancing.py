"""The ExCB balancing operator B(z; s), the cluster-size estimate s, and the baselines.

``balance`` is the pure operator (method.md §2.2). ``Balancer`` owns the persistent state (the size
estimate ``s`` in fp32, or DINO's centre) and turns teacher cosine similarities into targets, so that
``excb``, ``dino-centering`` and ``none`` share one code path and can be compared fairly.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

Mode = Literal["paper", "reference"]
BOOST = 1.01
ZERO_GUARD = 1e-3


def relative_sizes(s: Tensor) -> Tensor:
    """``c = K * s / ||s||_1``: 1 means exactly uniform. The renormalisation absorbs rounding drift."""
    s = s.float()
    return s.numel() * s / s.sum().clamp_min(torch.finfo(torch.float32).tiny)


def balance_factors(s: Tensor) -> tuple[Tensor, Tensor]:
    """The per-cluster factors of B(z; s): ``lo = min(K s_k, 1)`` scales the cosine distance of under-sized
    clusters, ``hi = min(1 / (K s_k), 1)`` the ``1 + z`` of over-sized ones (1 where a factor does not apply).
    Serving computes them once per model (``excb.inference.assign``)."""
    c = relative_sizes(s)
    lo = c.clamp(max=1.0)  # < 1 only for under-sized clusters
    hi = torch.where(c > 0, 1.0 / c, torch.ones_like(c)).clamp(max=1.0)  # < 1 only for over-sized ones
    return lo, hi


def balance(z: Tensor, s: Tensor, mode: Mode = "paper", generator: torch.Generator | None = None) -> Tensor:
    """Apply B(z; s) to cosine similarities ``z`` [N, K] given relative sizes ``s`` [K] (summing to 1).

    ``paper``: the piecewise formula — under-sized clusters (K s_k < 1) shrink the cosine distance
    ``1 - z`` by ``K s_k``; over-sized ones divide ``1 + z`` by ``K s_k``. ``reference`` adds what the
    reference code does: a tiny random factor where a factor is exactly zero, a x1.01 boost of each row's
    top entry, and a clamp to [-1, 1]. Always computed in fp32.
    """
    if mode not in ("paper", "reference"):
        raise ValueError(f"mode must be 'paper' or 'reference', got {mode!r}")
    if z.dim() != 2 or s.dim() != 1 or z.shape[1] != s.shape[0]:
        raise ValueError(f"expected z [N, K] and s [K], got {tuple(z.shape)} and {tuple(s.shape)}")
    z = z.float()
    lo, hi = balance_factors(s)
    if mode == "reference":
        lo = _guard_zero(lo, generator)
        hi = _guard_zero(hi, generator)
    out = 1.0 - (1.0 - z) * lo
    out = (1.0 + out) * hi - 1.0
    if mode == "reference":
        top = out.argmax(dim=1, keepdim=True)
        out = out.scatter(1, top, out.gather(1, top) * BOOST)
        out = out.clamp(-1.0, 1.0)
    return out


def _guard_zero(factor: Tensor, generator: torch.Generator | None) -> Tensor:
    """Replace exact zeros by U(0, 1e-3) so a dead cluster does not map every sample to similarity 1."""
    zero = factor == 0
    if not bool(zero.any()):
        return factor
    noise = torch.rand(factor.shape, generator=generator, device=factor.device) * ZERO_GUARD
    return torch.where(zero, noise, factor)


def _all_reduce_mean(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def _all_reduce_sum(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


class Balancer(nn.Module):
    """Teacher-target construction and the state behind it.

    The size estimate ``s`` is tracked for every method (so balance statistics are comparable), but only
    ``excb`` feeds it back into the targets. State lives in buffers, so it is saved in checkpoints.
    """

    sizes: Tensor          # buffers (typed here: register_buffer hides them from type checkers)
    cluster_count: Tensor
    center: Tensor

    def __init__(self, num_clusters: int, method: str = "excb", mode: Mode = "reference",
                 size_momentum: float = 0.999, teacher_temp: float = 0.04, center_momentum: float = 0.9) -> None:
        super().__init__()
        if method not in ("excb", "dino-centering", "none"):
            raise ValueError(f"unknown balancing method {method!r}")
        self.num_clusters = num_clusters
        self.method = method
        self.mode: Mode = mode
        self.size_momentum = size_momentum
        self.teacher_temp = teacher_temp
        self.center_momentum = center_momentum
        self.register_buffer("sizes", torch.full((num_clusters,), 1.0 / num_clusters, dtype=torch.float32))
        self.register_buffer("cluster_count", torch.zeros(num_clusters, dtype=torch.float64))
        self.register_buffer("center", torch.zeros(num_clusters, dtype=torch.float32))

    @torch.no_grad()
    def teacher_probs(self, z: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Targets ``P_T`` [N, K] from teacher cosines ``z``, plus the balancer's metrics as 0-d tensors.

        Metrics stay on the device so a training step does not synchronise with the host for them.
        """
        z = z.float()
        metrics: dict[str, Tensor] = {}
        if self.method == "excb":
            zb = balance(z, self.sizes, self.mode, generator)
            metrics["changed_labels"] = (zb.argmax(1) != z.argmax(1)).float().mean()
            c = relative_sizes(self.sizes)
            metrics["llb_min"] = c.clamp(max=1.0).min()
            metrics["lhb_min"] = (1.0 / c.clamp_min(1e-12)).clamp(max=1.0).min()
            logits = zb / self.teacher_temp
        elif self.method == "dino-centering":
            logits = (z - self.center) / self.teacher_temp
            metrics["changed_labels"] = (logits.argmax(1) != z.argmax(1)).float().mean()
        else:
            logits = z / self.teacher_temp
            metrics["changed_labels"] = z.new_zeros(())
        return torch.softmax(logits, dim=1), metrics

    @torch.no_grad()
    def update(self, teacher_probs: Tensor, z: Tensor | None = None) -> Tensor:
        """EMA update after the loss was computed with the previous state. Returns the global counts.

        ``s <- m s + (1 - m) f`` where ``f`` is the frequency of the hard (argmax) assignments of the
        final teacher targets, averaged across ranks (every rank has the same local batch size).
        """
        labels = teacher_probs.argmax(dim=1)
        counts = torch.bincount(labels, minlength=self.num_clusters).to(torch.float32)
        freq = _all_reduce_mean(counts / labels.numel())
        self.sizes.mul_(self.size_momentum).add_(freq, alpha=1.0 - self.size_momentum)
        global_counts = _all_reduce_sum(counts)
        self.cluster_count.add_(global_counts.double())
        if self.method == "dino-centering" and z is not None:
            batch_center = _all_reduce_mean(z.float().mean(dim=0))
            self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)
        return global_counts

    def reset_epoch_counts(self) -> None:
        self.cluster_count.zero_()
