"""Balance statistics shared by training and serving."""

import math

import numpy as np
import pytest
import torch

from excb.method import stats


def test_uniform_counts() -> None:
    st = stats.balance_stats(np.full(100, 7))
    assert st["entropy"] == pytest.approx(math.log(100))
    assert st["normalized_entropy"] == pytest.approx(1.0)
    assert st["effective_clusters"] == pytest.approx(100)
    assert st["empty_fraction"] == 0.0
    assert st["gini"] == pytest.approx(0.0, abs=1e-12)
    assert st["kl_to_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert st["rel_size_p50"] == pytest.approx(1.0)


def test_collapse_is_obvious() -> None:
    counts = np.zeros(50)
    counts[3] = 1000
    st = stats.balance_stats(counts)
    assert st["effective_clusters"] == pytest.approx(1.0)
    assert st["empty_fraction"] == pytest.approx(49 / 50)
    assert st["max_share"] == 1.0
    assert st["gini"] == pytest.approx(1 - 1 / 50)
    assert st["kl_to_uniform"] == pytest.approx(math.log(50))


def test_sizes_kind_uses_threshold_and_accepts_tensors() -> None:
    s = torch.tensor([0.5, 0.4999, 0.0001])
    st = stats.balance_stats(s, kind="sizes")
    assert st["empty_fraction"] == pytest.approx(1 / 3)  # K*s = 0.0003 < 0.01
    assert st["num_clusters"] == 3


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        stats.balance_stats([])
    with pytest.raises(ValueError):
        stats.balance_stats([1, -1])
    with pytest.raises(ValueError):
        stats.balance_stats([1, 2], kind="nope")


def test_sorted_curve_downsamples_and_sorts() -> None:
    c = stats.sorted_curve(np.arange(1000), max_points=100)
    assert len(c["rank"]) <= 100 and c["rank"][0] == 0.0 and c["rank"][-1] == 1.0
    assert all(a >= b for a, b in zip(c["relative_size"], c["relative_size"][1:]))
    assert c["relative_size"][-1] == 0.0


def test_drift() -> None:
    same = stats.drift([1, 2, 3], [2, 4, 6])
    assert same["kl"] == pytest.approx(0, abs=1e-9) and same["tv"] == pytest.approx(0, abs=1e-12)
    far = stats.drift([1, 0, 0], [0, 0, 1])
    assert far["tv"] == pytest.approx(1.0) and far["js"] == pytest.approx(math.log(2), rel=1e-3)
    with pytest.raises(ValueError):
        stats.drift([1, 2], [1, 2, 3])
