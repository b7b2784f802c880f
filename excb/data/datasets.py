"""Image data sets: a folder, a file list, Fashion-MNIST (IDX files) and scikit-learn's digits (data.md).

Every data set yields a ``PIL.Image`` passed through ``transform`` (``(x, label)`` when ``labelled``).
Files that cannot be decoded are skipped, never fatal: ``__getitem__`` returns ``None`` and the loader's
collate counts them (DataLoader workers are separate processes, so a counter on the data set object only
sees what the main process decoded; ``.skipped`` is that local count).
"""

from __future__ import annotations

import functools
import gzip
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from excb.config import ConfigError
from excb.data.decode import DEFAULT_FORMATS, ImageDecodeError, load_image
from excb.data.shards import INDEX_NAME, read_index
from excb.errors import EmptyDatasetError, UndecodableDataError  # re-exported under their old module

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "EXCB_FASHION_MNIST_ROOT"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN_FRACTION = 0.8
# Training reads local files, so the byte cap is generous; the pixel cap comes from DataConfig.
TRAIN_MAX_BYTES = 200_000_000
TRAIN_MAX_PIXELS = 64_000_000
# Fewest decodable images a run accepts: the fitted recipe's smallest batch (16). Below it no batch is full, and
# k-means (>= 4 images per centroid, K >= 2) and the whitening fit (8 images) have too little to work on.
MIN_DECODABLE_IMAGES = 16

Transform = Callable[[Image.Image], Any]


@dataclass
class DecodeTally:
    """How many of the files a check tried decoded, and why the first one that did not failed."""

    source: str
    files: int                      # files in the source
    tried: int = 0
    decoded: int = 0
    first_error: str | None = None

    def add(self, path: str, error: Exception | None) -> None:
        self.tried += 1
        if error is None:
            self.decoded += 1
        elif self.first_error is None:
            self.first_error = f"{path}: {error}"

    @property
    def estimated(self) -> int:
        """Decodable images in the whole source, scaled up from the sample."""
        return self.decoded if self.tried >= self.files else round(self.decoded * self.files / max(self.tried, 1))

    def check(self, minimum: int = MIN_DECODABLE_IMAGES) -> None:
        """Raise :class:`UndecodableDataError` when the source has fewer than ``minimum`` decodable images."""
        if self.estimated >= minimum:
            return
        counted = (f"{self.decoded} of {self.files} files decode" if self.tried >= self.files
                   else f"{self.decoded} of {self.tried} sampled files (of {self.files}) decode")
        counted = counted.replace("of 1 files decode", "of 1 file decodes")
        short = f", fewer than the {minimum} images a run needs" if self.decoded else ""
        error = f" (first error: {self.first_error})" if self.first_error else ""
        raise UndecodableDataError(f"data source {self.source!r}: {counted} as images{short}{error}")


class _PathTable:
    """Paths packed into one byte buffer: no per-item Python objects, so forked workers share pages."""

    def __init__(self, paths: Sequence[str]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._buf = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self._buf[self._offsets[i]: self._offsets[i + 1]].tobytes())


class SourceDataset(Dataset):
    """Shared item plumbing: transform, optional label, class names. What :func:`build_dataset` returns."""

    source: str
    classes: tuple[str, ...] = ()
    labels: np.ndarray  # int64 [N], -1 where unlabelled
    holdout: dict[str, Any] | None = None  # set by excb.evaluation.splits.labelled_splits on a held-out split

    def __init__(self, source: str, transform: Transform | None, labelled: bool) -> None:
        self.source = source
        self.transform = transform
        self.labelled = labelled

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _finish(self, image: Image.Image, label: int) -> Any:
        x = self.transform(image) if self.transform is not None else image
        return (x, label) if self.labelled else x


class ImageFileDataset(SourceDataset):
    """Image files on disk (folder or list); undecodable files are skipped (``None``) and counted.

    ``decode_min_side``: 0 (training) decodes every image whole; inference that is about to shrink the images
    sets it to ``OrtEmbedder.decode_min_side`` so large JPEGs are decoded drafted, as the embed service does."""

    def __init__(self, source: str, paths: Sequence[str], labels: Sequence[int] | None, classes: Sequence[str],
                 transform: Transform | None, labelled: bool, max_pixels: int = TRAIN_MAX_PIXELS) -> None:
        super().__init__(source, transform, labelled)
        self.paths = _PathTable(paths)
        self.labels = np.asarray(labels if labels is not None else [-1] * len(paths), dtype=np.int64)
        self.classes = tuple(classes)
        self.max_pixels = max_pixels
        self.decode_min_side = 0
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        return self.paths[index]

    def decode(self, index: int) -> Image.Image:
        """The image of item ``index`` (no transform); raises :class:`ImageDecodeError`."""
        return load_image(self.paths[index], max_bytes=TRAIN_MAX_BYTES, max_pixels=self.max_pixels,
                          allowed_formats=DEFAULT_FORMATS, min_side=self.decode_min_side)

    def __getitem__(self, index: int) -> Any:
        try:
            image = self.decode(index)
        except ImageDecodeError as exc:
            self.skipped += 1
            logger.warning("skipping %s: %s", self.paths[index], exc)
            return None
        return self._finish(image, int(self.labels[index]))

    def decoded_sample(self, k: int, tally: DecodeTally) -> Iterator[Image.Image]:
        """The images among ``k`` evenly spaced files that decode, one at a time; ``tally`` counts every try."""
        for i in evenly_spaced(len(self), k):
            try:
                image = self.decode(i)
            except ImageDecodeError as exc:
                tally.add(self.paths[i], exc)
                continue
            tally.add(self.paths[i], None)
            yield image


class ArrayDataset(SourceDataset):
    """In-memory uint8 grey images [N, H, W] (Fashion-MNIST, digits) returned as mode-L PIL images."""

    def __init__(self, source: str, images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                 transform: Transform | None, labelled: bool) -> None:
        super().__init__(source, transform, labelled)
        if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"{source}: expected uint8 images [N, H, W] and N labels")
        self.images = images
        self.labels = labels.astype(np.int64)
        self.classes = tuple(classes)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        return self._finish(Image.fromarray(self.images[index], mode="L"), int(self.labels[index]))


# ------------------------------------------------------------------------------------------- folders / lists
def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_folder(root: Path) -> list[str]:
    """All image files under ``root`` (recursive, hidden entries skipped) as sorted relative POSIX paths."""
    found: list[str] = []
    seen: set[str] = set()  # real paths already walked: symlinked folders are followed, cycles are not
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in filenames if _is_image_name(f))
    return sorted(found)


def _folder_dataset(source: str, split: str, transform: Transform | None, labelled: bool,
                    max_pixels: int) -> ImageFileDataset:
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data source {source!r}: folder does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"data source {source!r}: not a folder (use list:FILE for a file list)")
    if split in ("train", "test") and (root / split).is_dir():
        root = root / split  # ROOT/train and ROOT/test layouts pick the requested split
    rel = _scan_folder(root)
    if labelled:
        rel = [r for r in rel if "/" in r]  # files directly under the root have no class folder
        classes = sorted({r.split("/", 1)[0] for r in rel})
        index = {c: i for i, c in enumerate(classes)}
        labels: list[int] | None = [index[r.split("/", 1)[0]] for r in rel]
    else:
        classes, labels = [], None
    paths = [str(root / r) for r in rel]
    return ImageFileDataset(source, paths, labels, classes, transform, labelled, max_pixels)


def _read_list(list_file: Path) -> list[tuple[str, str | None]]:
    """``path`` or ``path<TAB>label`` per line; blank lines and ``#`` comments ignored."""
    entries: list[tuple[str, str | None]] = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, _, label = line.partition("\t")
        entries.append((path.strip(), label.strip() or None))
    return entries


def _list_dataset(source: str, list_path: str, transform: Transform | None, labelled: bool,
                  max_pixels: int) -> ImageFileDataset:
    list_file = Path(list_path).expanduser()
    if not list_path:
        raise ConfigError("data.source", f"{source!r}: expected list:FILE")
    if not list_file.is_file():
        raise FileNotFoundError(f"data source {source!r}: list file {str(list_file)!r} does not exist")
    entries = _read_list(list_file)
    base = list_file.resolve().parent
    paths = [str(p if Path(p).is_absolute() else base / p) for p, _ in entries]
    if not labelled:
        return ImageFileDataset(source, paths, None, [], transform, labelled, max_pixels)
    missing = [i for i, (_, label) in enumerate(entries) if label is None]
    if missing:
        raise ValueError(f"data source {source!r}: labelled use needs 'path<TAB>label' on every line; "
                         f"entry {missing[0] + 1} ({entries[missing[0]][0]!r}) has no label")
    classes = sorted({label for _, label in entries if label is not None})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[label] for _, label in entries if label is not None]
    return ImageFileDataset(source, paths, labels, classes, transform, labelled, max_pixels)


# --------------------------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed): big-endian header, then uint8 data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: unsupported IDX element type 0x{data[2]:02x} (only uint8)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header says {dims} ({expected} bytes) but {len(data) - header} follow")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}.gz not found in {root}; install the Debian package dataset-fashion-mnist "
        f"or point {FASHION_MNIST_ENV} / 'fashion-mnist:ROOT' at a folder holding the IDX files")


def fashion_mnist_root(explicit: str | None = None) -> Path:
    """Explicit ``fashion-mnist:ROOT`` > ``$EXCB_FASHION_MNIST_ROOT`` > Debian's location."""
    return Path(explicit or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_ROOT).expanduser()


def load_fashion_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 28, 28] uint8 and labels [N] for ``train``, ``test`` or ``all`` (train then test)."""
    stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.glob("*idx*")))
    parts = [_fashion_mnist_part(str(root), prefix, stamp)
             for prefix in {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}[split]]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


@functools.lru_cache(maxsize=4)
def _fashion_mnist_part(root_text: str, prefix: str, stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Decompressing 60k images takes ~0.4 s; training and evaluation ask for the same (read-only) arrays."""
    root = Path(root_text)
    x = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"))
    y = read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte"))
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"Fashion-MNIST {prefix}: images {x.shape} and labels {y.shape} do not match")
    return x, y


# -------------------------------------------------------------------------------------------------- digits
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images.setflags(write=False)  # shared by every caller in the process
    labels = bunch.target.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 0-255; a fixed permutation gives a deterministic 80/20 split."""
    images, labels = _digits_arrays()
    if split == "all":
        return images, labels
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
    cut = int(round(len(images) * DIGITS_TRAIN_FRACTION))
    chosen = np.sort(perm[:cut] if split == "train" else perm[cut:])
    return images[chosen], labels[chosen]


# ------------------------------------------------------------------------------------------ containment
def source_paths(source: str) -> list[Path]:
    """Every local file ``source`` makes a reader open (all splits), unresolved; ``[]`` for built-ins.

    A service checks each one's real path against its data roots: checking only the top-level path let a
    symlink inside a root, or a ``list:`` line with an absolute or ``../`` path, reach files outside it.
    URL shard sources raise ValueError (they are not files).
    """
    source = source.strip()
    if source == "digits" or source == "fashion-mnist":
        return []  # packaged or from the machine's own install, never a user path
    if source.startswith("fashion-mnist:"):
        root = fashion_mnist_root(source.partition(":")[2])
        return [root] + sorted(p for p in root.glob("*idx*") if p.is_file() or p.is_symlink())
    if source.startswith("list:"):
        list_file = Path(source[len("list:"):]).expanduser()
        base = list_file.resolve().parent
        return [list_file] + [Path(p) if Path(p).is_absolute() else base / p for p, _ in _read_list(list_file)]
    if source.startswith("shards:"):
        if "://" in source:
            raise ValueError(f"data source {source!r}: not a local path")
        index = read_index(source[len("shards:"):])
        return [Path(index.root), Path(index.root) / INDEX_NAME] + [Path(s) for s in index.shards]
    root = Path(source).expanduser()
    return [root] + [root / r for r in _scan_folder(root)]


# -------------------------------------------------------------------------------------------------- entry
def evenly_spaced(n: int, k: int) -> list[int]:
    """At most ``k`` indices spread evenly over ``range(n)``, ascending (folders are sorted by class: a prefix
    would see one class). All of them when ``n <= k``."""
    take = min(n, k)
    return [int(i * n / take) for i in range(take)]


def evenly_spaced_subset(ds: Dataset, k: int) -> Dataset:
    """At most ``k`` items of ``ds`` at :func:`evenly_spaced` indices; ``ds`` itself when it has no more."""
    # why the ignore below: torch's Dataset declares no __len__; the sets here are map-style
    return ds if len(ds) <= k else Subset(ds, evenly_spaced(len(ds), k))  # type: ignore[arg-type]


def _check_split(split: str) -> None:
    if split not in ("train", "test", "all"):
        raise ValueError(f"data.split: {split!r} is not one of train, test, all")


def apply_limit(ds: Dataset, limit: int | None) -> None:
    """Keep only the first ``limit`` items (None: all)."""
    if limit is None:
        return
    if limit < 1:
        raise ValueError(f"data.limit: must be >= 1, got {limit}")
    if isinstance(ds, ImageFileDataset):
        _keep(ds, np.arange(min(limit, len(ds))))
    elif isinstance(ds, ArrayDataset):
        ds.images, ds.labels = ds.images[:limit], ds.labels[:limit]


def same_files(a: Dataset, b: Dataset) -> bool:
    """Whether two file data sets hold the same images (a labelled folder without ``train/``/``test/``, or one
    list for both splits): scoring one against the other would find every image as its own neighbour."""
    if not isinstance(a, ImageFileDataset) or not isinstance(b, ImageFileDataset) or len(a) != len(b):
        return False
    return all(a.paths[i] == b.paths[i] for i in range(len(a)))


def holdout_split(train: ImageFileDataset, test: ImageFileDataset, fraction: float,
                  seed: int) -> tuple[ImageFileDataset, ImageFileDataset]:
    """Split one labelled file set into disjoint (train, test) parts, stratified per class and seeded.

    Each class with at least two images gives ``ceil(fraction * n)`` of them (at most ``n - 1``) to the test
    part, so every class the test part scores also has neighbours to find in the train part."""
    gen = torch.Generator().manual_seed(seed)
    test_idx: list[int] = []
    for c in np.unique(train.labels):
        members = np.flatnonzero(train.labels == c)
        if len(members) < 2:
            continue
        take = min(len(members) - 1, math.ceil(fraction * len(members)))
        order = torch.randperm(len(members), generator=gen).numpy()
        test_idx.extend(int(i) for i in members[order[:take]])
    held = np.zeros(len(train), dtype=bool)
    held[test_idx] = True
    _keep(train, np.flatnonzero(~held))
    _keep(test, np.flatnonzero(held))
    return train, test


def _keep(ds: ImageFileDataset, indices: np.ndarray) -> None:
    """Narrow a file data set to ``indices`` (in order)."""
    ds.paths = _PathTable([ds.paths[int(i)] for i in indices])
    ds.labels = ds.labels[indices]


def build_dataset(source: str, split: str = "train", limit: int | None = None, transform: Transform | None = None,
                  labelled: bool = False, *, max_pixels: int = TRAIN_MAX_PIXELS) -> SourceDataset:
    """Open ``source`` (folder, ``list:FILE``, ``fashion-mnist[:ROOT]``, ``digits``) as a map-style data set."""
    _check_split(split)
    if not isinstance(source, str) or not source.strip():
        raise ConfigError("data.source", "empty; use a folder, list:FILE, fashion-mnist[:ROOT] or digits")
    source = source.strip()
    ds: SourceDataset
    if source == "digits":
        images, labels = load_digits_split(split)
        ds = ArrayDataset(source, images, labels, [str(i) for i in range(10)], transform, labelled)
    elif source == "fashion-mnist" or source.startswith("fashion-mnist:"):
        root = fashion_mnist_root(source.partition(":")[2] or None)
        images, labels = load_fashion_mnist(root, split)
        ds = ArrayDataset(source, images, labels, FASHION_MNIST_CLASSES, transform, labelled)
    elif source.startswith("list:"):
        ds = _list_dataset(source, source[len("list:"):], transform, labelled, max_pixels)
    else:
        ds = _folder_dataset(source, split, transform, labelled, max_pixels)
    apply_limit(ds, limit)
    if len(ds) == 0:
        raise EmptyDatasetError(f"data source {source!r} (split {split!r}) yields no images"
                                + ("; labelled use needs class sub-folders" if labelled else "")
                                + f"; image files need one of the extensions {', '.join(IMAGE_EXTENSIONS)}")
    return ds
