"""Owns the training batches: "this rank's batches of epoch e from step s" for folders and shards alike.

:class:`TrainData` is what the trainer (and the budget's timing) iterates; for a folder or file list it opens
:func:`build_train_loader`, this rank's map-style loader of one epoch, each epoch. Exact resume: the order is a
seeded permutation that can start mid-epoch, and every augmentation is a function of (seed, epoch, index)
(excb.seeds.derive_seed).

Undecodable files come out of the data set as ``None``; :func:`collate_multicrop` drops them and reports
how many in ``MultiCropBatch.skipped`` (workers are separate processes, so the count has to travel with
the batch). Workers are not persistent: a new iterator per epoch re-forks them, which is how the epoch's
crop scale (set on the transform in the parent) reaches them (method.md §4.6).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from excb.config import ConfigError, TrainConfig
from excb.data.augment import MultiCropTransform
from excb.data.datasets import ImageFileDataset, build_dataset
from excb.data.gpu_augment import GpuMultiCrop, ToUint8Tensor, augment_batch, collate_raw
from excb.data.item_cache import ItemCache
from excb.data.shards import open_shards
from excb.seeds import derive_seed, seeded

log = logging.getLogger("excb.data")


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


class SeededItems(Dataset):
    """Makes each item's augmentation a pure function of (seed, epoch, index).

    torchvision's transforms draw from the global torch RNG; seeding it per item keeps the data identical
    whether the run was interrupted or not, and whatever the number of loader workers.
    """

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; the sets here are map-style

    def __getitem__(self, index: int) -> Any:
        with seeded(derive_seed(self.seed, "item", self.epoch, index)):
            return self.base[index]


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch permutation, split across ranks without overlap, able to start mid-epoch."""

    def __init__(self, n: int, local_batch: int, rank: int, world: int, seed: int) -> None:
        self.n, self.local_batch, self.rank, self.world, self.seed = n, local_batch, rank, world, seed
        self.epoch = 0
        self.start_batch = 0

    def batches_per_epoch(self) -> int:
        return (self.n // self.world) // self.local_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.local_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        perm = torch.randperm(self.n, generator=g)
        per_rank = self.batches_per_epoch() * self.local_batch
        mine = perm[self.rank :: self.world][:per_rank]
        return iter(mine[self.start_batch * self.local_batch :].tolist())


def _map_loader(items: SeededItems, sampler: ResumableSampler, cfg: TrainConfig, device: str | torch.device,
                collate: Callable[[list[Any]], Any]) -> DataLoader:
    """The epoch's loader over ``items`` in ``sampler``'s order (never consumes the global RNG)."""
    opts = dataloader_settings(device, cfg.data.num_workers)
    return DataLoader(
        items,
        batch_size=sampler.local_batch,
        sampler=sampler,
        num_workers=opts["num_workers"],
        collate_fn=collate,
        pin_memory=opts["pin_memory"],
        drop_last=True,
        persistent_workers=False,  # re-created per epoch so the crop-scale schedule takes effect
        prefetch_factor=opts["prefetch_factor"],
        worker_init_fn=_seed_worker if opts["num_workers"] > 0 else None,
        generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "loader", sampler.rank, sampler.epoch)),
    )


def _stream_loader(stream: Any, cfg: TrainConfig, device: str | torch.device) -> DataLoader:
    """Shards: the stream batches and collates itself (equal full batches per rank); workers split it."""
    opts = dataloader_settings(device, cfg.data.num_workers)
    return DataLoader(stream, batch_size=None, num_workers=opts["num_workers"], pin_memory=opts["pin_memory"],
                      persistent_workers=False, prefetch_factor=opts["prefetch_factor"])


def _local_batch(batch_size: int, world_size: int) -> int:
    if world_size < 1 or batch_size // world_size < 1 or batch_size % world_size:
        raise ValueError(f"batch_size: {batch_size} is not divisible by world size {world_size}")
    return batch_size // world_size


def build_train_loader(cfg: TrainConfig, dataset: Dataset, rank: int = 0, world_size: int = 1, seed: int | None = None,
                       epoch: int = 0, start_batch: int = 0, *, device: str | torch.device | None = None,
                       collate: Callable[[list[Any]], Any] = collate_multicrop) -> DataLoader:
    """This rank's loader of ``epoch`` from ``start_batch`` on: its disjoint share of a seeded permutation, per-rank
    batch ``cfg.batch_size // world_size``, each item augmented as a function of (seed, epoch, index).

    The transform's crop scale is the caller's to set before the call (``TrainData.batches``; on its own,
    ``dataset.transform.set_epoch``): the loader forks its workers afterwards, so they see it.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size} is not a valid distributed setting")
    per_rank = cfg.batch_size // world_size
    if per_rank < 1:
        raise ValueError(f"batch_size: {cfg.batch_size} is smaller than the world size {world_size}")
    n = len(dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; the sets here are map-style
    if n // world_size < per_rank:
        raise ValueError(f"batch_size: the data set has {n} images, fewer than one batch "
                         f"({per_rank} per rank x {world_size} ranks, batch_size={cfg.batch_size})")
    seed = cfg.seed if seed is None else seed
    items = SeededItems(dataset, seed)
    sampler = ResumableSampler(n, per_rank, rank, world_size, seed)
    items.epoch = sampler.epoch = epoch
    sampler.start_batch = start_batch
    return _map_loader(items, sampler, cfg, cfg.device if device is None else device, collate)


def use_gpu_augment(cfg: TrainConfig, device: torch.device) -> bool:
    """``data.gpu_augment``: auto = decode and augment on the device when it is a GPU."""
    mode = cfg.data.gpu_augment
    return mode == "on" or (mode == "auto" and device.type == "cuda")


class TrainData:
    """This rank's training data: the source opened once, batches per (epoch, start step), views on the device.

    Map-style sets go through :class:`SeededItems` + :class:`ResumableSampler` (exact resume mid-epoch);
    ``shards:`` sources stream (an epoch restarts the same stream and skips nothing: the caller stops after the
    remaining steps). On the GPU path (``data.gpu_augment``) the loader yields undecoded JPEG bytes (shards)
    or uint8 images, and :meth:`device_views` decodes and multi-crops them on the device.
    """

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, device: torch.device) -> None:
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.gpu_augment = use_gpu_augment(cfg, device)
        self.transform: Any = GpuMultiCrop(cfg.augment) if self.gpu_augment else MultiCropTransform(cfg.augment)
        self.collate = collate_raw if self.gpu_augment else collate_multicrop
        local_batch = _local_batch(cfg.batch_size, world_size)
        self.stream: Any = None
        self.dataset: Dataset | None = None
        if cfg.data.source.strip().startswith("shards:"):
            self.stream = self._open_stream(local_batch, world_size)
            self.num_images = len(self.stream)
        else:
            self.dataset = self._open_dataset()
            # why the ignore below: torch's Dataset declares no __len__; the sets here are map-style
            self.num_images = len(self.dataset)  # type: ignore[arg-type]
        self.steps_per_epoch = (self.num_images // world_size) // local_batch
        if self.steps_per_epoch < 1:
            raise ConfigError("batch_size", f"{cfg.batch_size} is larger than the data set ({self.num_images} images "
                              f"from {cfg.data.source!r}); set a smaller batch_size")
        cached = f", items kept in memory up to {cfg.data.cache_mb} MiB" if isinstance(self.dataset, ItemCache) else ""
        log.info("data: %d images, %s augmentation%s, loader %s", self.num_images,
                 "device" if self.gpu_augment else "CPU", cached, dataloader_settings(device, cfg.data.num_workers))

    def _open_stream(self, local_batch: int, world_size: int) -> Any:
        cfg = self.cfg
        return open_shards(cfg.data.source.strip(), transform=None if self.gpu_augment else self.transform,
                           mode="raw" if self.gpu_augment else "pil", seed=cfg.seed, rank=self.rank,
                           world_size=world_size, batch_size=local_batch, collate=self.collate,
                           shuffle_buffer=cfg.data.shuffle_buffer, limit=cfg.data.limit,
                           max_pixels=cfg.data.max_image_pixels)

    def _open_dataset(self) -> Dataset:
        cfg = self.cfg
        item_transform = ToUint8Tensor(4 * cfg.augment.global_size) if self.gpu_augment else self.transform
        ds = build_dataset(cfg.data.source, split=cfg.data.split, limit=cfg.data.limit, transform=item_transform,
                           max_pixels=cfg.data.max_image_pixels)
        if self.gpu_augment and cfg.data.cache_mb > 0 and isinstance(ds, ImageFileDataset):
            return ItemCache(ds, cfg.data.cache_mb << 20)  # deterministic items: decode each file once
        return ds

    def batches(self, epoch: int, start_batch: int, total_epochs: int,
                schedule_epoch: int | None = None) -> Iterator[Any]:
        """Loader batches of ``epoch`` from ``start_batch`` on (at most the epoch's remaining steps), with the
        crop scale of ``schedule_epoch`` (default ``epoch``) out of ``total_epochs``."""
        self.transform.set_epoch(epoch if schedule_epoch is None else schedule_epoch, max(total_epochs, 1))
        if self.stream is not None:
            self.stream.set_epoch(epoch)
            loader = _stream_loader(self.stream, self.cfg, self.device)
        else:
            assert self.dataset is not None
            loader = build_train_loader(self.cfg, self.dataset, self.rank, self.world_size, self.cfg.seed, epoch,
                                        start_batch, device=self.device, collate=self.collate)
        return itertools.islice(loader, max(self.steps_per_epoch - start_batch, 0))

    def device_views(self, batch: Any, epoch: int, index: int) -> tuple[Tensor, Tensor | None, int]:
        """``(globals, locals, skipped)`` on the device; the GPU path decodes and multi-crops here, with draws
        that are a function of (seed, rank, epoch, batch) so a resume replays them."""
        if self.gpu_augment:
            gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "gpu-augment", self.rank, epoch, index))
            return augment_batch(batch, self.transform, self.device, gen)
        g = batch.globals.to(self.device, non_blocking=True)
        l = batch.locals.to(self.device, non_blocking=True) if batch.locals is not None else None
        return g, l, batch.skipped
