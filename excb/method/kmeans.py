"""Vectorised spherical k-means for the centroid initialisation (method.md §4.9), local or distributed.

Why a rewrite of the reference routine (method.md §10.8):
  * it works with any world size: seeds are drawn from the *global* index space, so K need not divide W;
  * the M-step uses ``index_add_``/``bincount`` instead of a Python loop over K;
  * empty clusters are re-seeded with the points farthest from their centroid instead of restarting the
    whole run in an unbounded loop.

Equivalence: ranks hold contiguous slices of one virtual global array (rank 0 first). Seeds and re-seeds are
chosen by global index with rank 0's generator, so a W-process run equals the single-process run on the
concatenated data up to the summation order of the all-reduce (sums are accumulated in float64 so that the
difference vanishes after the cast back to the feature dtype in practice).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

# Upper bound on the elements of one [chunk, K] similarity block (1 GiB of fp32): with K = 65536 the
# reference chunk of 25k rows alone would need 6.5 GB.
_MAX_BLOCK_ELEMENTS = 1 << 28


@dataclass
class KMeansResult:
    """Outcome of :func:`spherical_kmeans`.

    centroids: [k, D] L2-normalised centroids of the last M-step (teacher init).
    means: [k, D] un-normalised means of the points under the final assignment (student init, as in the
        reference); a cluster that is still empty falls back to its centroid so the row is never zero.
    assignments: [N_local] cluster index of every local point (final E-step).
    counts: [k] global cluster sizes of the final assignment.
    empty_reseeded: how many times a cluster was re-seeded because it was empty.
    """

    centroids: Tensor
    means: Tensor
    assignments: Tensor
    counts: Tensor
    empty_reseeded: int


class _Comm:
    """The few collectives k-means needs; a no-op on one process."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.group = group
        self.world = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if self.active else 0

    def all_reduce(self, t: Tensor) -> Tensor:
        if self.active and self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def broadcast(self, t: Tensor) -> Tensor:
        if self.active and self.world > 1:
            src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            dist.broadcast(t, src=src, group=self.group)
        return t

    def all_gather(self, t: Tensor) -> list[Tensor]:
        if not (self.active and self.world > 1):
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return out


def _check_input(x: Tensor, k: int, iterations: int, chunk_size: int, max_reseeds: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x: expected a [N, D] matrix, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected floating-point features, got {x.dtype}")
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if iterations < 0:
        raise ValueError(f"iterations: must be >= 0, got {iterations}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    if max_reseeds < 0:
        raise ValueError(f"max_reseeds: must be >= 0, got {max_reseeds}")


def _global_layout(n_local: int, device: torch.device, comm: _Comm) -> tuple[int, int]:
    """(offset of this rank's slice in the global index space, global N)."""
    sizes = comm.all_gather(torch.tensor([n_local], dtype=torch.long, device=device))
    sizes_list = [int(s.item()) for s in sizes]
    return sum(sizes_list[: comm.rank]), sum(sizes_list)


def _rows_by_global_index(x: Tensor, gidx: Tensor, offset: int, comm: _Comm) -> Tensor:
    """The rows ``gidx`` of the virtual global array, on every rank (owners fill, all-reduce sums)."""
    rows = torch.zeros(gidx.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    local = gidx - offset
    mine = (local >= 0) & (local < x.shape[0])
    rows[mine] = x[local[mine]]
    return comm.all_reduce(rows)


def _draw_seeds(x: Tensor, k: int, n_total: int, offset: int, generator: torch.Generator | None,
                comm: _Comm) -> Tensor:
    """k distinct points drawn uniformly from the global pool with rank 0's generator."""
    gidx = torch.empty(k, dtype=torch.long, device=x.device)
    if comm.rank == 0:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        gidx.copy_(torch.randperm(n_total, generator=generator, device=gen_device)[:k])
    comm.broadcast(gidx)
    return _rows_by_global_index(x, gidx, offset, comm)


def _block_rows(chunk_size: int, k: int) -> int:
    return max(1, min(chunk_size, _MAX_BLOCK_ELEMENTS // max(k, 1)))


@torch.no_grad()
def _assign(x: Tensor, centroids: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """E-step: (index of the most similar centroid, that similarity) for every local point."""
    n = x.shape[0]
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    best = torch.empty(n, dtype=x.dtype, device=x.device)
    ct = centroids.t().contiguous()
    for start in range(0, n, rows):
        sim = x[start:start + rows] @ ct
        best[start:start + rows], labels[start:start + rows] = sim.max(dim=1)
    return labels, best


@torch.no_grad()
def _cluster_sums(x: Tensor, labels: Tensor, k: int, rows: int, comm: _Comm) -> tuple[Tensor, Tensor]:
    """M-step statistics: global per-cluster sums (float64) and counts."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], rows):
        sums.index_add_(0, labels[start:start + rows], x[start:start + rows].double())
    counts = torch.bincount(labels, minlength=k)
    return comm.all_reduce(sums), comm.all_reduce(counts)


def _farthest_points(best: Tensor, count: int, offset: int, comm: _Comm) -> Tensor:
    """Global indices of the ``count`` points least similar to their centroid (ties: lowest index).

    Every rank proposes its own ``count`` worst points; the gathered lists are merged identically everywhere.
    """
    order = torch.argsort(best, stable=True)[:count]
    vals = torch.full((count,), float("inf"), dtype=torch.float64, device=best.device)
    idx = torch.full((count,), -1, dtype=torch.long, device=best.device)
    vals[: order.numel()] = best[order].double()
    idx[: order.numel()] = order + offset
    all_vals = torch.cat(comm.all_gather(vals))
    all_idx = torch.cat(comm.all_gather(idx))
    pick = torch.argsort(all_vals, stable=True)[:count]
    return all_idx[pick]


def _reseed_empty(x: Tensor, centroids: Tensor, counts: Tensor, best: Tensor, offset: int,
                  comm: _Comm) -> int:
    """Move every empty cluster onto one of the points farthest from its centroid (in place)."""
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel() == 0:
        return 0
    gidx = _farthest_points(best, int(empty.numel()), offset, comm)
    centroids[empty] = _rows_by_global_index(x, gidx, offset, comm)
    return int(empty.numel())


def _normalised_means(sums: Tensor, counts: Tensor, previous: Tensor) -> Tensor:
    """Normalised cluster means; clusters that are empty or whose mean vanishes keep their previous centroid."""
    norms = sums.norm(dim=1, keepdim=True)
    ok = (counts > 0) & (norms.squeeze(1) > 1e-12)
    out = previous.clone()
    out[ok] = (sums[ok] / norms[ok]).to(previous.dtype)
    return out


@torch.no_grad()
def spherical_kmeans(x: Tensor, k: int, iterations: int = 50, generator: torch.Generator | None = None,
                     chunk_size: int = 25_000, max_reseeds: int = 10,
                     group: dist.ProcessGroup | None = None) -> KMeansResult:
    """Spherical k-means on L2-normalised rows, on one process or across an initialised process group.

    Every rank passes its own shard ``x`` ([N_local, D]); the result's centroids, means and counts are
    identical on every rank. ``chunk_size`` bounds the rows of one similarity block (further capped so a
    block stays under 2^28 elements). Empty clusters are re-seeded in every M-step; if any are still empty
    after the final E-step, up to ``max_reseeds`` repair rounds (re-seed + E-step) follow. Deterministic
    given ``generator`` (only rank 0's generator is used).
    """
    _check_input(x, k, iterations, chunk_size, max_reseeds)
    comm = _Comm(group)
    x = x.contiguous()
    offset, n_total = _global_layout(x.shape[0], x.device, comm)
    if n_total < k:
        raise ValueError(f"k: cannot form {k} clusters from only {n_total} points (all ranks together)")
    rows = _block_rows(chunk_size, k)
    centroids = _draw_seeds(x, k, n_total, offset, generator, comm)
    reseeded = 0
    for _ in range(iterations):
        labels, best = _assign(x, centroids, rows)
        sums, counts = _cluster_sums(x, labels, k, rows, comm)
        centroids = _normalised_means(sums, counts, centroids)
        reseeded += _reseed_empty(x, centroids, counts, best, offset, comm)
    labels, best = _assign(x, centroids, rows)
    sums, counts = _cluster_sums(x, labels, k, rows, comm)
    for _ in range(max_reseeds):
        if bool((counts > 0).all()):
            break
        reseeded += _reseed_empty(x, centroids, counts, best, offset, comm)
        labels, best = _assign(x, centroids, rows)
        sums, counts = _cluster_sums(x, labels, k, rows, comm)
    empty = int((counts == 0).sum())
    if empty:
        warnings.warn(f"spherical_kmeans: {empty} of {k} clusters are still empty (duplicate points?)",
                      RuntimeWarning, stacklevel=2)
    means = (sums / counts.clamp(min=1).unsqueeze(1).double()).to(x.dtype)
    means[counts == 0] = centroids[counts == 0]
    return KMeansResult(centroids=centroids, means=means, assignments=labels, counts=counts,
                        empty_reseeded=reseeded)
