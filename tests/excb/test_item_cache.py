"""The in-memory item cache of small image-file training sets (excb/data/item_cache.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from excb.data.datasets import build_dataset
from excb.data.gpu_augment import ToUint8Tensor
from excb.data.item_cache import ItemCache, item_bytes
from excb.data.loader import TrainData
from excb.training.checkpoint import load_checkpoint
from excb.training.trainer import train
from support.training import image_folder, tiny


def _cached(folder: Path, max_bytes: int = 1 << 20) -> ItemCache:
    return ItemCache(build_dataset(str(folder), transform=ToUint8Tensor(64)), max_bytes)


def test_an_item_is_decoded_once_and_then_read_from_memory(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "imgs", 4)
    cache = _cached(folder)
    first = cache[0]
    for path in folder.iterdir():
        path.unlink()  # a second read that went to the file would now fail
    assert torch.equal(cache[0], first) and cache.bytes == item_bytes(first)
    assert cache[1] is None and cache.base.skipped == 1  # never read, now gone: skipped and counted, not kept


def test_the_cache_keeps_items_only_up_to_its_byte_cap(tmp_path: Path) -> None:
    cache = _cached(image_folder(tmp_path / "imgs", 6), max_bytes=1)
    assert all(cache[i] is not None for i in range(6))
    one = item_bytes(cache[0])
    assert not cache.items and cache.bytes == 0
    capped = _cached(image_folder(tmp_path / "more", 6), max_bytes=2 * one)
    for i in range(6):
        capped[i]
    assert sorted(capped.items) == [0, 1] and capped.bytes == 2 * one


def test_an_undecodable_file_is_skipped_and_counted_every_epoch(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "imgs", 3)
    (folder / "broken.png").write_bytes(b"not a png")
    cache = _cached(folder)
    broken = [i for i in range(len(cache)) if cache.base.path(i).endswith("broken.png")][0]
    for _ in range(2):
        assert cache[broken] is None
    assert cache.base.skipped == 2 and broken not in cache.items


def test_a_loader_worker_keeps_nothing(tmp_path: Path) -> None:
    """A worker's copy of the cache would end with the worker at the end of its epoch: it does not fill one."""
    cache = _cached(image_folder(tmp_path / "imgs", 4))
    got = list(DataLoader(cache, batch_size=None, num_workers=1))
    assert len(got) == 4 and not cache.items


def test_training_reads_files_once_and_trains_exactly_as_without_the_cache(tmp_path: Path) -> None:
    """Same seed, same folder: weights after 6 steps (3 epochs) are identical with and without the cache."""
    folder = image_folder(tmp_path / "imgs", 64)
    common = (f"data={folder}", "data.gpu_augment=on", "max_steps=6", "data.num_workers=0")
    assert isinstance(TrainData(tiny(tmp_path / "probe", *common), 0, 1, torch.device("cpu")).dataset, ItemCache)
    off = TrainData(tiny(tmp_path / "probe", *common, "data.cache_mb=0"), 0, 1, torch.device("cpu")).dataset
    assert not isinstance(off, ItemCache)
    runs = {}
    for name, extra in (("cached", ()), ("uncached", ("data.cache_mb=0",))):
        train(tiny(tmp_path / name, *common, *extra))
        runs[name] = load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")["student"]
    assert runs["cached"].keys() == runs["uncached"].keys()
    assert all(torch.equal(runs["cached"][k], runs["uncached"][k]) for k in runs["cached"])
