"""Spherical k-means: recovery, empty-cluster re-seeding, determinism and distributed equivalence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from excb.method.kmeans import spherical_kmeans


def _blobs(num: int, per: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(num, dim, generator=g), dim=1)
    labels = torch.arange(num).repeat_interleave(per)
    x = F.normalize(centers[labels] + noise * torch.randn(num * per, dim, generator=g), dim=1)
    perm = torch.randperm(num * per, generator=g)
    return x[perm], labels[perm]


def _purity(assign: torch.Tensor, truth: torch.Tensor) -> float:
    """Fraction of points whose k-means cluster's majority true label equals their own."""
    hits = 0
    for c in assign.unique():
        members = truth[assign == c]
        hits += int(torch.bincount(members).max())
    return hits / truth.numel()


def _objective(x: torch.Tensor, res) -> float:
    return float((x * res.centroids[res.assignments]).sum())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_recovers_separated_clusters() -> None:
    x, truth = _blobs(num=5, per=80, dim=16, noise=0.05, seed=0)
    runs = [spherical_kmeans(x, 5, iterations=20, generator=_gen(s)) for s in range(8)]
    best = max(runs, key=lambda r: _objective(x, r))
    assert _purity(best.assignments, truth) == 1.0
    assert sorted(best.counts.tolist()) == [80] * 5
    # a correct solution: every centroid sits on one true blob, so the assignment is a relabelling
    assert len({(int(a), int(t)) for a, t in zip(best.assignments, truth)}) == 5
    for r in runs:
        assert torch.allclose(r.centroids.norm(dim=1), torch.ones(5), atol=1e-5)
        assert int(r.counts.sum()) == x.shape[0]


def test_overclustering_is_pure_and_means_match_assignment() -> None:
    x, truth = _blobs(num=4, per=60, dim=12, noise=0.05, seed=1)
    res = spherical_kmeans(x, 12, iterations=30, generator=_gen(0))
    assert _purity(res.assignments, truth) == 1.0
    for c in range(12):
        members = x[res.assignments == c]
        assert members.shape[0] == int(res.counts[c]) > 0
        assert torch.allclose(res.means[c], members.mean(0), atol=1e-6)
        assert torch.allclose(res.centroids[c], F.normalize(members.mean(0), dim=0), atol=1e-5)


def test_empty_clusters_are_reseeded_with_duplicates() -> None:
    base = F.normalize(torch.randn(12, 8, generator=_gen(5)), dim=1)
    x = base.repeat(10, 1)  # 120 points, only 12 distinct directions, k = 12: seeds collide
    res = spherical_kmeans(x, 12, iterations=10, generator=_gen(3))
    assert res.empty_reseeded > 0
    assert (res.counts == 10).all()
    assert res.assignments.unique().numel() == 12


def test_k_close_to_n_ends_without_empty_cluster() -> None:
    x = F.normalize(torch.randn(40, 6, generator=_gen(7)), dim=1)
    x = torch.cat([x, x[:5]])  # 45 points, 40 distinct, k = 38
    res = spherical_kmeans(x, 38, iterations=15, generator=_gen(0))
    assert (res.counts > 0).all()
    assert int(res.counts.sum()) == 45


def test_deterministic_given_generator_and_chunking_invariant() -> None:
    x, _ = _blobs(num=6, per=50, dim=10, noise=0.3, seed=2)
    a = spherical_kmeans(x, 9, iterations=10, generator=_gen(11))
    b = spherical_kmeans(x, 9, iterations=10, generator=_gen(11), chunk_size=7)
    c = spherical_kmeans(x, 9, iterations=10, generator=_gen(12))
    assert torch.equal(a.assignments, b.assignments)
    assert torch.allclose(a.centroids, b.centroids, atol=1e-6)
    assert not torch.equal(a.centroids, c.centroids)


def test_bad_input_is_rejected() -> None:
    x = F.normalize(torch.randn(5, 4), dim=1)
    with pytest.raises(ValueError, match="k: cannot form 6 clusters from only 5 points"):
        spherical_kmeans(x, 6)
    with pytest.raises(ValueError, match="x:"):
        spherical_kmeans(x[0], 2)
    with pytest.raises(ValueError, match="k:"):
        spherical_kmeans(x, 0)


# ----------------------------------------------------------------------------- distributed (gloo)

def _shared_data() -> dict[str, tuple[torch.Tensor, int, int]]:
    """name -> (global data, k, iterations): one well-separated case, one that needs re-seeding."""
    blobs, _ = _blobs(num=7, per=30, dim=8, noise=0.2, seed=4)
    dup = F.normalize(torch.randn(11, 5, generator=_gen(9)), dim=1).repeat(6, 1)
    return {"blobs": (blobs, 7, 15), "dup": (dup, 11, 8)}


def _split(n: int, world: int) -> list[int]:
    """Uneven shard sizes (the last rank gets the remainder) so offsets really matter."""
    sizes = [n // world + (3 if r == 0 else 0) for r in range(world)]
    sizes[-1] = n - sum(sizes[:-1])
    return sizes


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name, (x, k, iters) in _shared_data().items():
            sizes = _split(x.shape[0], world)
            start = sum(sizes[:rank])
            shard = x[start:start + sizes[rank]]
            # every rank seeds its generator differently: only rank 0's stream may matter
            res = spherical_kmeans(shard, k, iterations=iters, generator=_gen(100 + 1000 * rank))
            results[name] = {"centroids": res.centroids, "means": res.means, "counts": res.counts,
                             "assignments": res.assignments, "reseeded": res.empty_reseeded}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])  # k = 7 and 11: neither divisible by 2 or 3
def test_distributed_matches_single_process(world: int, tmp_path: Path) -> None:
    # fork: the children need no fresh interpreter (saves seconds of re-importing torch)
    mp.start_processes(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                       join=True, start_method="fork")
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, (x, k, iters) in _shared_data().items():
        ref = spherical_kmeans(x, k, iterations=iters, generator=_gen(100))
        assign = torch.cat([per_rank[r][name]["assignments"] for r in range(world)])
        assert torch.equal(assign, ref.assignments), name
        for r in range(world):
            got = per_rank[r][name]
            assert torch.allclose(got["centroids"], ref.centroids, atol=1e-6), name
            assert torch.allclose(got["means"], ref.means, atol=1e-6), name
            assert torch.equal(got["counts"], ref.counts), name
            assert got["reseeded"] == ref.empty_reseeded, name
    assert per_rank[0]["dup"]["reseeded"] > 0
    assert (per_rank[0]["dup"]["counts"] > 0).all()
