"""Owns every seed of a run: one ``derive_seed`` for the data order, augmentations and generators.

Exact resume needs each random draw to be a pure function of the run seed and where it happens (epoch,
rank, batch, item). Hashing the parts keeps distinct streams apart; a weighted sum of them (what this
replaced) made e.g. item ``i + 7919`` of one epoch share a seed with item ``i`` of the next.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Iterator

import torch

SEED_MAX = 2**63 - 1


def derive_seed(*parts: int | str) -> int:
    """A seed in ``[0, 2**63 - 1)`` that is a pure function of ``parts`` (name the stream with a string)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") % SEED_MAX


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU RNG and ``random`` seeded, then restore both (torchvision draws there)."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: torch.manual_seed also queues a lazy CUDA seeding, which on a CUDA build
        # without a GPU captures a traceback per call (10% of a CPU training loop that seeds every item).
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def seed_everything(seed: int) -> None:
    """Seed torch, ``random`` and NumPy for the draws that are not derived (model init, k-means)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass
