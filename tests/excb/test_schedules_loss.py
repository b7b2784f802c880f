"""Schedules (method.md §4.2-4.4) and the loss pairing (§3)."""

import math

import pytest
import torch

from excb.method import schedules
from excb.method.loss import excb_loss, pair_count, reference_loss


def test_lr_warmup_then_cosine() -> None:
    total, warm, base = 100, 10, 0.6
    lrs = [schedules.learning_rate(s, total, base, warm, 1e-4) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(base / warm)  # counter incremented before use
    assert lrs[9] == pytest.approx(base)
    assert lrs[10] == pytest.approx(base)
    assert lrs[100] == pytest.approx(base * 1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_wd_and_centroid_factor() -> None:
    assert schedules.weight_decay(50, 100, 0.04, 10.0) == pytest.approx(0.22)
    assert schedules.weight_decay(77, 100, 1e-4, 1.0) == 1e-4
    assert schedules.centroid_wd_factor(0, 100, 10.0) == pytest.approx(10.0)
    assert schedules.centroid_wd_factor(100, 100, 10.0) == pytest.approx(1.0)
    # ViT: base wd rising 0.04->0.4 times the factor falling 10->1 gives 0.40, ~1.21, 0.40 (method.md §4.3)
    def prod(s: int) -> float:
        return schedules.weight_decay(s, 100, 0.04, 10) * schedules.centroid_wd_factor(s, 100, 10)

    assert prod(0) == pytest.approx(0.4) and prod(50) == pytest.approx(1.21) and prod(100) == pytest.approx(0.4)


def test_ema_and_crop_scale() -> None:
    assert schedules.ema_momentum(0, 10, 0.996, 1.0) == pytest.approx(0.996)
    assert schedules.ema_momentum(10, 10, 0.996, 1.0) == pytest.approx(1.0)
    assert schedules.crop_scale_min(0, 10, 0.26, 0.14) == pytest.approx(0.26)
    assert schedules.crop_scale_min(10, 10, 0.26, 0.14) == pytest.approx(0.14)


def test_loss_equals_literal_pairing() -> None:
    g = torch.Generator().manual_seed(0)
    b, k, v = 5, 12, 8
    t = torch.softmax(torch.randn(2, b, k, generator=g) * 4, -1)
    proj = torch.randn(2, b, k, generator=g, requires_grad=True)
    pred = torch.randn(v, b, k, generator=g, requires_grad=True)
    loss, metrics = excb_loss(t, proj, pred)
    ref = reference_loss(t, proj, pred)
    assert pair_count(v) == 18
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    ga = torch.autograd.grad(loss, [proj, pred])
    gb = torch.autograd.grad(ref, [proj, pred])
    assert all(torch.allclose(a, c, atol=1e-7) for a, c in zip(ga, gb))
    assert 0.0 <= float(metrics["acc"]) <= 1.0


def test_cross_view_projection_pairing() -> None:
    """Teacher view 0 pairs with the projection of view 1 (not its own)."""
    k = 4
    t = torch.zeros(2, 1, k)
    t[0, 0, 0] = 1.0
    t[1, 0, 1] = 1.0
    proj = torch.zeros(2, 1, k, requires_grad=True)
    pred = torch.zeros(2, 1, k)
    loss, _ = excb_loss(t, proj, pred)
    (gproj,) = torch.autograd.grad(loss, [proj])
    # gradient on proj[1] pushes class 0 (teacher view 0's target), on proj[0] class 1.
    assert gproj[1, 0, 0] < 0 and gproj[0, 0, 1] < 0
    assert gproj[1, 0, 1] > 0 and gproj[0, 0, 0] > 0
    assert loss.item() == pytest.approx(math.log(k))
