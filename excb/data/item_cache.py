"""A small training set's items kept in memory after their first epoch.

On a 2-core CPU the loader runs in the training process (``excb.data.loader.dataloader_settings``), so the step
waits while every file is decoded again each epoch by the safe decoder (``excb.data.decode``: size checks, a
format allow-list, EXIF, RGB). The device-augmentation path's item transform (``ToUint8Tensor``) is deterministic,
so its output is the same every epoch and can be kept: epochs after the first read memory instead of files.
Items are kept only in the process that trains (a loader worker's copy ends with the worker at the end of its
epoch) and only up to a byte cap; an undecodable file is not kept, so it is skipped and
counted again each epoch, as without the cache. Measured: 1.08x the steps of a 10-minute budget on 3,200 20x20 px
PNGs, one thread (benchmarks/RESULTS.md, "Decoded items kept in memory").
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

ITEM_OVERHEAD_BYTES = 256  # a tensor object and its dict entry, beside its pixels


def item_bytes(item: Any) -> int:
    """Memory an item holds: its tensors' pixels plus a fixed overhead."""
    parts = item if isinstance(item, tuple) else (item,)
    return ITEM_OVERHEAD_BYTES + sum(p.untyped_storage().nbytes() for p in parts if isinstance(p, Tensor))


class ItemCache(Dataset):
    """``base``'s items, each kept after its first read while the kept items hold at most ``max_bytes``."""

    def __init__(self, base: Dataset, max_bytes: int) -> None:
        self.base = base
        self.max_bytes = max_bytes
        self.items: dict[int, Any] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; map-style here

    def __getitem__(self, index: int) -> Any:
        kept = self.items.get(index)
        if kept is not None:
            return kept
        item = self.base[index]
        if item is not None and get_worker_info() is None:
            size = item_bytes(item)
            if self.bytes + size <= self.max_bytes:
                self.items[index] = item
                self.bytes += size
        return item
