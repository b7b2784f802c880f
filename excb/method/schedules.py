"""Per-step schedules (method.md §4.2–4.4): lr warm-up + cosine, weight decay, centroid wd factor, EMA."""

from __future__ import annotations

import math


def cosine(start: float, end: float, step: int, total: int) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total``); clamps outside the range."""
    if total <= 0:
        return end
    t = min(max(step, 0), total) / total
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def learning_rate(step: int, total: int, base: float, warmup_steps: int, min_factor: float) -> float:
    """Linear warm-up from ``base/warmup`` then cosine to ``base*min_factor``.

    The reference increments its counter before use, so the first step already uses ``1/warmup`` of
    the base rate rather than zero (a zero-lr first step would be wasted work).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    return cosine(base, base * min_factor, step - warmup_steps, max(total - warmup_steps, 1))


def weight_decay(step: int, total: int, base: float, end_factor: float) -> float:
    """Cosine from ``base`` to ``base*end_factor`` (constant when the factor is 1)."""
    return base if end_factor == 1.0 else cosine(base, base * end_factor, step, total)


def centroid_wd_factor(step: int, total: int, start_factor: float) -> float:
    """Multiplier on the centroid group's wd: cosine from ``start_factor`` down to 1 (reference ``wdx10c1``)."""
    return cosine(start_factor, 1.0, step, total)


def ema_momentum(step: int, total: int, start: float, end: float) -> float:
    """Teacher EMA momentum, cosine from ``start`` (0.996) to ``end`` (1.0) over all steps."""
    return cosine(start, end, step, total)


def crop_scale_min(epoch: int, epochs: int, start: float, end: float) -> float:
    """Per-epoch global crop minimum scale (method.md §4.6)."""
    return cosine(start, end, epoch, epochs)
