"""The balancing operator B(z; s) and the size estimate (method.md §2)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from excb.method.balancing import Balancer, _guard_zero, balance, relative_sizes

torch.set_num_threads(1)


def sizes_from_relative(c: list[float]) -> torch.Tensor:
    t = torch.tensor(c, dtype=torch.float32)
    return t / t.sum()


def test_worked_examples_from_the_spec() -> None:
    # c = (0.5, 1.5): K=2 so s = (0.25, 0.75). Spec §2.2: c=0.5, z=0.2 -> 0.6 ; c=2, z=0.2 -> -0.4.
    s = sizes_from_relative([0.5, 1.5])
    out = balance(torch.tensor([[0.2, 0.2]]), s, mode="paper")
    assert out[0, 0].item() == pytest.approx(0.6, abs=1e-6)
    assert out[0, 1].item() == pytest.approx(1.2 / 1.5 - 1.0, abs=1e-6)
    s2 = sizes_from_relative([2.0, 0.5, 0.5, 1.0])  # K=4, c exactly (2, .5, .5, 1)
    out2 = balance(torch.tensor([[0.2, 0.2, -0.3, 0.7]]), s2, mode="paper")
    assert out2[0].tolist() == pytest.approx([-0.4, 0.6, 1 - 1.3 * 0.5, 0.7], abs=1e-6)


def test_identity_where_uniform() -> None:
    k = 64
    z = torch.rand(32, k) * 2 - 1
    s = torch.full((k,), 1.0 / k)
    assert torch.allclose(balance(z, s, "paper"), z, atol=1e-6)
    ref = balance(z, s, "reference")
    expected = z.clone()
    top = z.argmax(1)
    expected[torch.arange(32), top] = (z[torch.arange(32), top] * 1.01).clamp(-1, 1)
    assert torch.allclose(ref, expected, atol=1e-6)


def test_monotone_and_range_kept() -> None:
    g = torch.Generator().manual_seed(0)
    k = 16
    s = torch.rand(k, generator=g) ** 3
    s = s / s.sum()
    z = torch.linspace(-1, 1, 201).unsqueeze(1).repeat(1, k)
    for mode in ("paper", "reference"):
        out = balance(z, s, mode)
        assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6
    paper = balance(z, s, "paper")
    assert torch.all(paper[1:] - paper[:-1] >= -1e-7), "B must be monotone in z for every cluster"


def test_moves_small_clusters_up_and_large_down() -> None:
    s = sizes_from_relative([0.25, 1.0, 1.75])
    z = torch.full((1, 3), 0.1)
    out = balance(z, s, "paper")[0]
    assert out[0] > 0.1 and out[1] == pytest.approx(0.1) and out[2] < 0.1


def test_paper_and_reference_agree_off_the_top_entry() -> None:
    g = torch.Generator().manual_seed(1)
    k = 32
    s = torch.rand(k, generator=g) + 0.05
    s = s / s.sum()
    z = torch.rand(50, k, generator=g) * 1.6 - 0.8
    p, r = balance(z, s, "paper"), balance(z, s, "reference")
    top = p.argmax(1)
    mask = torch.ones_like(p, dtype=torch.bool)
    mask[torch.arange(50), top] = False
    assert torch.allclose(p[mask], r[mask], atol=1e-6)
    assert torch.equal(r.argmax(1), top)
    assert torch.allclose(r[torch.arange(50), top], (p[torch.arange(50), top] * 1.01).clamp(-1, 1), atol=1e-6)


def test_zero_size_guard_only_in_reference_mode() -> None:
    s = torch.tensor([0.0, 0.5, 0.5])
    z = torch.tensor([[-0.9, 0.5, 0.1]])
    assert balance(z, s, "paper")[0, 0].item() == pytest.approx(1.0)  # a dead cluster captures everything
    factor = _guard_zero(torch.tensor([0.0, 0.5, 0.0, 1.0]), torch.Generator().manual_seed(0))
    assert torch.all(factor > 0) and torch.all(factor[[0, 2]] <= 1e-3)
    assert factor[1] == 0.5 and factor[3] == 1.0


def test_fp32_even_for_half_inputs() -> None:
    z = (torch.rand(4, 8) * 2 - 1).to(torch.bfloat16)
    s = torch.full((8,), 1 / 8, dtype=torch.float16)
    assert balance(z, s).dtype == torch.float32


def test_bad_shapes_rejected() -> None:
    with pytest.raises(ValueError):
        balance(torch.zeros(3, 4), torch.ones(5) / 5)
    with pytest.raises(ValueError):
        balance(torch.zeros(3, 4), torch.ones(4) / 4, mode="nope")  # type: ignore[arg-type]


def test_size_estimate_ema_of_hard_assignments() -> None:
    b = Balancer(4, size_momentum=0.5)
    probs = torch.tensor([[0.9, 0.1, 0, 0], [0.8, 0.2, 0, 0], [0, 0, 1, 0], [0, 0, 0.3, 0.7]])
    counts = b.update(probs)
    assert counts.tolist() == [2, 0, 1, 1]
    assert b.sizes.tolist() == pytest.approx([0.5 * 0.25 + 0.5 * 0.5, 0.125, 0.5 * 0.25 + 0.5 * 0.25, 0.25])
    assert b.sizes.dtype == torch.float32
    assert float(b.sizes.sum()) == pytest.approx(1.0)
    assert relative_sizes(b.sizes).sum().item() == pytest.approx(4.0)


def test_methods_share_one_path_and_metrics() -> None:
    z = torch.rand(10, 6) * 2 - 1
    for method in ("excb", "dino-centering", "none"):
        b = Balancer(6, method=method)
        p, m = b.teacher_probs(z)
        assert p.shape == (10, 6) and torch.allclose(p.sum(1), torch.ones(10))
        assert "changed_labels" in m
        b.update(p, z)
        assert float(b.sizes.sum()) == pytest.approx(1.0)  # s is tracked for every method


def test_dino_center_moves_and_excb_reports_llb() -> None:
    z = torch.rand(10, 6) * 2 - 1
    d = Balancer(6, method="dino-centering", center_momentum=0.5)
    d.update(d.teacher_probs(z)[0], z)
    assert torch.allclose(d.center, 0.5 * z.mean(0))
    e = Balancer(6, method="excb")
    e.sizes.copy_(torch.tensor([0.05, 0.15, 0.2, 0.2, 0.2, 0.2]))
    _, m = e.teacher_probs(z)
    assert float(m["llb_min"]) == pytest.approx(0.3, abs=1e-5)
    assert float(m["lhb_min"]) == pytest.approx(1 / 1.2, abs=1e-5)


def _dist_worker(rank: int, world: int, port: int, probs: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = Balancer(probs.shape[1], size_momentum=0.9)
    local = probs.chunk(world)[rank]
    b.update(local)
    out[rank] = (b.sizes.clone(), b.cluster_count.clone())
    dist.destroy_process_group()


def test_two_process_gloo_update_equals_single_process() -> None:
    """The size estimate after a step is the same whether the global batch sits on 1 or 2 processes."""
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(64, 10, generator=g) * 3, 1)
    single = Balancer(10, size_momentum=0.9)
    single.update(probs)
    manager = mp.Manager()
    out = manager.dict()
    port = 29500 + os.getpid() % 1000
    mp.spawn(_dist_worker, args=(2, port, probs, out), nprocs=2, join=True)
    for rank in (0, 1):
        sizes, counts = out[rank]
        assert torch.allclose(sizes, single.sizes, atol=1e-7)
        assert torch.equal(counts, single.cluster_count)
