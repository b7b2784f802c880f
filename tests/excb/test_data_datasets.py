"""Data sets (folder, list, Fashion-MNIST IDX, digits) and the training loader (skip-and-count, rank split)."""

from __future__ import annotations

import gzip
import io
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from excb.config import AugmentConfig, resolve
from excb.data.augment import MultiCropTransform
from excb.data.datasets import FASHION_MNIST_DEFAULT_ROOT, EmptyDatasetError, build_dataset, read_idx
from excb.data.loader import MultiCropBatch, build_train_loader, collate_multicrop, dataloader_settings

TINY_AUG = AugmentConfig(global_size=16, local_size=8, num_local_crops=2, global_scale_min_start=0.5,
                         global_scale_min_end=0.3, local_scale_min=0.1)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _png(colour: int, size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (colour, 255 - colour, 7)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(size: int = 64) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _make_folder(root: Path) -> dict[str, int]:
    """9 good images in 3 classes (one nested deeper, odd extensions), 3 broken ones, and non-images."""
    good = {"cat/a.png": 10, "cat/b.PNG": 20, "cat/deep/c.png": 30, "dog/a.png": 40, "dog/b.jpeg": 50,
            "dog/c.webp": 60, "eel/a.bmp": 70, "eel/b.tif": 80, "eel/c.JPG": 90}
    for rel, colour in good.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = {".png": "PNG", ".jpeg": "JPEG", ".jpg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
               ".tif": "TIFF"}[path.suffix.lower()]
        Image.new("RGB", (20, 20), (colour, 255 - colour, 7)).save(path, fmt)
    (root / "cat/truncated.jpg").write_bytes(_jpeg()[:400])
    (root / "dog/text.png").write_text("not an image at all")
    (root / "eel/empty.jpg").write_bytes(b"")
    (root / "eel/readme.txt").write_text("ignored: not an image extension")
    (root / ".hidden").mkdir()
    (root / ".hidden/x.png").write_bytes(_png(1))
    (root / "cat/._resource.png").write_bytes(b"\x00\x05\x16\x07")
    return good


def test_folder_dataset_order_labels_and_limit(tmp_path):
    good = _make_folder(tmp_path)
    ds = build_dataset(str(tmp_path), labelled=True)
    assert len(ds) == 12 and ds.classes == ("cat", "dog", "eel") and ds.num_classes == 3
    names = [Path(ds.path(i)).relative_to(tmp_path).as_posix() for i in range(len(ds))]
    assert names == sorted(names) and "cat/deep/c.png" in names and not any(".hidden" in n for n in names)
    img, label = ds[names.index("dog/b.jpeg")]
    assert img.mode == "RGB" and img.size == (20, 20) and label == 1
    assert ds[names.index("cat/truncated.jpg")] is None and ds.skipped == 1
    assert len(build_dataset(str(tmp_path), limit=5)) == 5
    first5 = build_dataset(str(tmp_path), limit=5)
    assert [first5.path(i) for i in range(5)] == [ds.path(i) for i in range(5)]
    assert len([n for n in names if n in good]) == 9


def test_folder_split_subfolders(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            path = tmp_path / split / "k" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_png(i))
    assert len(build_dataset(str(tmp_path), split="train")) == 3
    assert len(build_dataset(str(tmp_path), split="test", labelled=True)) == 2
    assert len(build_dataset(str(tmp_path), split="all")) == 5


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(EmptyDatasetError, match="empty"):
        build_dataset(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="list file"):
        build_dataset(f"list:{tmp_path / 'missing.txt'}")
    with pytest.raises(ValueError, match="data.split"):
        build_dataset("digits", split="validation")


def test_list_dataset_relative_paths_and_labels(tmp_path):
    _make_folder(tmp_path / "imgs")
    outside = tmp_path / "abs.png"
    outside.write_bytes(_png(5))
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text(f"# comment\n../imgs/cat/a.png\tfeline\n\n../imgs/dog/text.png\tcanine\n{outside}\tfeline\n")
    ds = build_dataset(f"list:{lst}", labelled=True)
    assert len(ds) == 3 and ds.classes == ("canine", "feline")
    assert ds[0][1] == 1 and ds[1] is None and ds[2][0].size == (20, 20)
    assert len(build_dataset(f"list:{lst}")) == 3
    lst.write_text("../imgs/cat/a.png\n")
    with pytest.raises(ValueError, match="no label"):
        build_dataset(f"list:{lst}", labelled=True)


def test_folder_with_corrupt_files_trains_through_worker_processes(tmp_path):
    _make_folder(tmp_path)
    transform = MultiCropTransform(TINY_AUG)
    ds = build_dataset(str(tmp_path), transform=transform)
    cfg = resolve(overrides=["batch_size=4", "epochs=3", "data.num_workers=1", "device=cpu"])
    loader = build_train_loader(cfg, ds, rank=0, world_size=1, seed=0, epoch=1)
    batches = list(loader)
    assert len(batches) == 3 and all(isinstance(b, MultiCropBatch) for b in batches)
    assert sum(b.skipped for b in batches) == 3  # counted in the workers, reported through the collate
    assert sum(b.size for b in batches) == 9
    for b in batches:
        assert b.globals.shape[:2] == (2, b.size) and b.globals.shape[2:] == (3, 16, 16)
        assert b.locals is not None and b.locals.shape == (2, b.size, 3, 8, 8)
    assert ds.skipped == 0  # the parent never decoded anything: the count only exists in the batches


def test_collate_all_skipped_and_labelled():
    empty = collate_multicrop([None, None])
    assert empty.size == 0 and empty.skipped == 2 and empty.locals is None
    g = [torch.zeros(3, 4, 4), torch.ones(3, 4, 4)]
    batch = collate_multicrop([((g, []), 3), None, ((g, []), 5)])
    assert batch.globals.shape == (2, 2, 3, 4, 4) and batch.locals is None and batch.skipped == 1
    assert batch.labels.tolist() == [3, 5] and float(batch.globals[1].min()) == 1.0


def test_digits_shapes_labels_and_split():
    train = build_dataset("digits", split="train", labelled=True)
    test = build_dataset("digits", split="test", labelled=True)
    everything = build_dataset("digits", split="all")
    assert (len(train), len(test), len(everything)) == (1438, 359, 1797)
    img, label = train[0]
    assert img.mode == "L" and img.size == (8, 8) and 0 <= label <= 9 and train.num_classes == 10
    assert everything.images.max() == 255 and everything.images.min() == 0
    both = np.concatenate([train.images, test.images]).reshape(len(everything), -1)
    assert len(np.unique(both, axis=0)) == len(np.unique(everything.images.reshape(1797, -1), axis=0))
    assert np.array_equal(build_dataset("digits", split="train").images, train.images)  # deterministic
    assert set(np.unique(train.labels)) == set(range(10))


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_idx_parser_and_env_root(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setenv("EXCB_FASHION_MNIST_ROOT", str(tmp_path))
    ds = build_dataset("fashion-mnist", split="test", labelled=True)
    assert len(ds) == 5 and ds[3][1] == 3 and ds[3][0].size == (28, 28)
    assert len(build_dataset("fashion-mnist", split="all")) == 17
    assert len(build_dataset(f"fashion-mnist:{tmp_path}", limit=4)) == 4
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x08\x01\x00\x00\x00\x05abcde"))
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        build_dataset(f"fashion-mnist:{tmp_path / 'nowhere'}")


@pytest.mark.skipif(not os.path.exists(f"{FASHION_MNIST_DEFAULT_ROOT}/t10k-images-idx3-ubyte.gz"),
                    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_debian_package(monkeypatch):
    monkeypatch.delenv("EXCB_FASHION_MNIST_ROOT", raising=False)
    train = build_dataset("fashion-mnist", split="train", labelled=True)
    test = build_dataset("fashion-mnist", split="test", labelled=True)
    assert (len(train), len(test)) == (60000, 10000) and train.num_classes == 10
    img, label = train[0]
    assert img.mode == "L" and img.size == (28, 28) and label == 9  # the first training image is an ankle boot
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.classes[9] == "Ankle boot"


class _IndexItems(torch.utils.data.Dataset):
    """Items carry their own index and the crop scale the (worker's copy of the) transform holds."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.transform = MultiCropTransform(TINY_AUG)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.tensor([[[float(i), self.transform.scale_min]]])
        return ([g, g], []), i


def test_loader_splits_two_ranks_without_overlap_and_applies_epoch():
    cfg = resolve(overrides=["batch_size=8", "epochs=4", "data.num_workers=0", "device=cpu"])
    data = _IndexItems(50)
    seen = {}
    for rank in (0, 1):
        batches = list(build_train_loader(cfg, data, rank=rank, world_size=2, seed=3, epoch=2))
        assert all(b.size == 4 for b in batches)
        seen[rank] = [int(i) for b in batches for i in b.labels]
    assert len(seen[0]) == len(seen[1]) == 24 and not set(seen[0]) & set(seen[1])
    again = [int(i) for b in build_train_loader(cfg, data, 0, 2, seed=3, epoch=2) for i in b.labels]
    other_epoch = [int(i) for b in build_train_loader(cfg, data, 0, 2, seed=3, epoch=3) for i in b.labels]
    assert again == seen[0] and other_epoch != seen[0]


def test_epoch_scale_reaches_worker_processes():
    cfg = resolve(overrides=["batch_size=4", "epochs=4", "data.num_workers=1", "device=cpu"])
    data = _IndexItems(8)
    scales = {}
    for epoch in (0, 4):
        data.transform.set_epoch(epoch, cfg.epochs)  # in the parent, as TrainData.batches does, before the fork
        batch = next(iter(build_train_loader(cfg, data, 0, 1, seed=0, epoch=epoch)))
        scales[epoch] = float(batch.globals[0, 0, 0, 0, 1])
    assert scales[0] == pytest.approx(0.5) and scales[4] == pytest.approx(0.3)


def test_too_small_dataset_names_batch_size_and_settings():
    cfg = resolve(overrides=["batch_size=64", "device=cpu"])
    with pytest.raises(ValueError, match="batch_size"):
        build_train_loader(cfg, _IndexItems(10), 0, 1, seed=0, epoch=0)
    opts = dataloader_settings("cpu")
    assert opts["num_workers"] >= 0 and opts["pin_memory"] is False and opts["persistent_workers"] is False
    assert dataloader_settings("cpu", num_workers=3)["num_workers"] == 3
