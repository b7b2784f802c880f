"""DataLoader construction for training: skip-and-count collate, rank split, worker seeding (method.md §4.6).

Undecodable files come out of the data set as ``None``; :func:`collate_multicrop` drops them and reports
how many in ``MultiCropBatch.skipped`` (workers are separate processes, so the count has to travel with
the batch). Workers are not persistent: a new iterator per epoch re-forks them, which is how the epoch's
crop scale (set on the transform in the parent) reaches them.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from torch.utils.data import default_collate

from excb.config import TrainConfig


@dataclass
class MultiCropBatch:
    """``globals`` [2, B, C, H, W]; ``locals`` [L, B, C, h, w] or None; ``skipped`` = dropped items."""

    globals: Tensor
    locals: Tensor | None
    skipped: int = 0
    labels: Tensor | None = None

    @property
    def size(self) -> int:
        """Images in the batch (0 when every item was skipped)."""
        return int(self.globals.shape[1])

    def pin_memory(self) -> "MultiCropBatch":
        """Called by the DataLoader's pin-memory thread (custom batch types must pin themselves)."""
        return replace(self, globals=self.globals.pin_memory(),
                       locals=self.locals.pin_memory() if self.locals is not None else None,
                       labels=self.labels.pin_memory() if self.labels is not None else None)


def _split_item(item: Any) -> tuple[tuple[Sequence[Tensor], Sequence[Tensor]], int | None]:
    """An item is ``(globals, locals)`` or ``((globals, locals), label)`` for labelled data sets."""
    label = item[1] if len(item) == 2 else None
    if isinstance(label, (int, np.integer)) or (isinstance(label, Tensor) and label.ndim == 0):
        return item[0], int(label)
    return item, None


def collate_multicrop(batch: Sequence[Any]) -> MultiCropBatch:
    """Stack multi-crop items view-major; ``None`` items (unreadable files) are dropped and counted."""
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return MultiCropBatch(globals=torch.empty(2, 0, 0, 0, 0), locals=None, skipped=skipped)
    split = [_split_item(item) for item in kept]
    views = [views for views, _ in split]
    globals_ = torch.stack([torch.stack([g[v] for g, _ in views]) for v in range(len(views[0][0]))])
    n_local = len(views[0][1])
    locals_ = torch.stack([torch.stack([loc[v] for _, loc in views]) for v in range(n_local)]) if n_local else None
    labels = [label for _, label in split]
    label_tensor = torch.tensor(labels, dtype=torch.long) if all(lb is not None for lb in labels) else None
    return MultiCropBatch(globals=globals_, locals=locals_, skipped=skipped, labels=label_tensor)


def collate_skipping(batch: Sequence[Any]) -> tuple[Any, int]:
    """For evaluation loaders: ``(default_collate(kept) or None, number of skipped items)``."""
    kept = [item for item in batch if item is not None]
    return (default_collate(kept) if kept else None), len(batch) - len(kept)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _device_type(device: str | torch.device) -> str:
    text = str(device)
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(text).type


def dataloader_settings(device: str | torch.device, num_workers: int | None = None) -> dict[str, Any]:
    """Worker count, pinning and prefetch chosen for this machine (logged by the trainer).

    On CUDA the GPU waits for the CPU, so use up to 8 workers (one core left for the main process).
    On CPU the training step itself wants the cores: with <= 2 cores, loading in the main process
    measured as fast as one worker (no spare core to overlap with); with more cores, a quarter of them.
    """
    kind = _device_type(device)
    cores = _cpu_count()
    if num_workers is None:
        if kind == "cuda":
            num_workers = max(0, min(8, cores - 1))
        else:
            num_workers = 0 if cores <= 2 else min(8, max(1, cores // 4))
    return {
        "num_workers": int(num_workers),
        "pin_memory": kind == "cuda" and torch.cuda.is_available(),
        "persistent_workers": False,
        "prefetch_factor": 4 if num_workers > 0 else None,
        "cpu_count": cores,
        "device": kind,
    }


def _seed_worker(worker_id: int) -> None:
    """Each worker's torch seed is already distinct (loader generator + worker id); mirror it to numpy/random."""
    seed = torch.initial_seed() % (2**32)
    random.seed(seed)
    np.random.seed(seed)


def loader_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of the loader's generator: different per rank and per epoch, reproducible from the run seed."""
    return (seed * 1_000_003 + rank * 7_919 + epoch * 104_729) % (2**63 - 1)


def _apply_epoch(dataset: Dataset, epoch: int, epochs: int) -> None:
    """Move the transform's crop scale to this epoch (before the workers are forked)."""
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_epoch"):
        transform.set_epoch(epoch, epochs)


def build_train_loader(cfg: TrainConfig, dataset: Dataset, rank: int = 0, world_size: int = 1, seed: int | None = None,
                       epoch: int = 0) -> DataLoader:
    """A loader for one epoch: this rank's disjoint share, per-rank batch ``cfg.batch_size // world_size``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size} is not a valid distributed setting")
    seed = cfg.seed if seed is None else seed
    per_rank = cfg.batch_size // world_size
    if per_rank < 1:
        raise ValueError(f"batch_size: {cfg.batch_size} is smaller than the world size {world_size}")
    n = len(dataset)  # type: ignore[arg-type]
    if n // world_size < per_rank:
        raise ValueError(f"batch_size: the data set has {n} images, fewer than one batch "
                         f"({per_rank} per rank x {world_size} ranks, batch_size={cfg.batch_size})")
    _apply_epoch(dataset, epoch, cfg.epochs)
    generator = torch.Generator().manual_seed(loader_seed(seed, rank, epoch))
    if world_size > 1:
        sampler: Any = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(loader_seed(seed, 0, epoch) + 1))
    opts = dataloader_settings(cfg.device, cfg.data.num_workers)
    workers = opts["num_workers"]
    return DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_multicrop,
        pin_memory=opts["pin_memory"],
        drop_last=True,
        persistent_workers=False,
        prefetch_factor=opts["prefetch_factor"],
        worker_init_fn=_seed_worker if workers > 0 else None,
        generator=generator,
    )
