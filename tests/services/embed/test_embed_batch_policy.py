"""The adaptive batch limit: merges only where runs got cheaper per image, within the latency budget."""

from __future__ import annotations

import time

import numpy as np

from services.embed.batch_policy import BatchPolicy
from services.embed.batcher import MicroBatcher


def test_limit_follows_the_cheapest_size_and_the_budget() -> None:
    p = BatchPolicy(32, budget_s=1.0)
    assert p.limit() == 32  # nothing seen: as configured
    p.observe(1, 0.010)
    assert p.limit() == 2  # one size up is tried while unseen
    p.observe(2, 0.020)  # no cheaper per image (CPU-like)
    assert p.limit() == 1
    gpu = BatchPolicy(32, budget_s=1.0)
    for n in (1, 2, 4, 8, 16, 32):
        gpu.observe(n, 0.010 + 0.001 * n)  # fixed cost dominates (GPU-like)
    assert gpu.limit() == 32
    tight = BatchPolicy(32, budget_s=0.012)
    for n in (1, 2, 4, 8, 16, 32):
        tight.observe(n, 0.010 + 0.001 * n)
    assert tight.limit() == 2  # 2 images ~ 0.012 s fit, 4 (0.014 s) do not


def test_probes_one_size_up_periodically() -> None:
    p = BatchPolicy(8, budget_s=1.0, probe_every=4)
    p.observe(1, 0.01)
    p.observe(2, 0.03)
    limits = []
    for _ in range(8):
        limits.append(p.limit())
        p.observe(1, 0.01)
    assert limits.count(2) == 2 and limits.count(1) == 6


def test_batcher_stops_merging_when_merged_runs_cost_more_per_image() -> None:
    sizes: list[int] = []

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sizes.append(len(x))
        time.sleep(0.003 * len(x) ** 2)  # merged runs cost more per image (as on a contended CPU)
        return x, x

    b = MicroBatcher(run, max_batch=8, max_delay_ms=20, queue_size=1000, latency_budget_ms=1000)
    for _ in range(12):
        futs = [b.submit(np.ones((1, 1), np.float32)) for _ in range(8)]
        [f.result(5) for f in futs]
    assert sizes[:2] == [1, 2] or max(sizes[:4]) > 1  # it tried merging
    tail = sizes[-16:]
    assert tail.count(1) >= 12, sizes  # then runs alone, bar the periodic probe
    b.close()
