"""Tar shards in the WebDataset layout, their index, and a streaming data set split exactly across consumers.

Layout of a shard set (``excb data pack`` writes it)::

    SHARDS/index.json           {"format": "excb-shards/1", "total": N, "classes": [...], "shards": [{"name", "count"}]}
    SHARDS/shard-000000.tar     members 000000.jpg, 000000.cls, 000001.jpg, 000001.cls, ...

Every sample is a JPEG (``.jpg``) plus its class index as text (``.cls``; -1 when the source had no class
folder). Packing stores JPEG inputs byte for byte and re-encodes every other format to JPEG quality 95, so
one decoder (PIL on the CPU, nvJPEG through ``torchvision.io.decode_jpeg`` on a GPU) reads every sample.

Streaming: each epoch the shards are permuted (seed, epoch) and concatenated into one sequence of N
samples. Rank r takes the contiguous range ``[r N / W, (r+1) N / W)``; inside it, DataLoader worker k takes
a contiguous run of whole ``block``-sized pieces (the last worker also takes the tail). Contiguous ranges
keep reads sequential (whole shards, at most two partial ones per consumer) and the union over all
(rank, worker) pairs is every sample exactly once. A shuffle buffer then mixes each consumer's stream.
With ``batch_size`` set the data set yields whole batches, so every rank sees the same number of full
batches per epoch whatever the worker count (DDP needs equal step counts).

Paths may be local or any fsspec URL (``s3://``, ``gs://``, ``memory://`` ...); fsspec is imported only for
URLs. Augmentation randomness is a pure function of (seed, epoch, sample id), so it does not depend on the
number of workers. Exact mid-epoch resume is not offered: a resumed run restarts the current epoch's stream.
"""

from __future__ import annotations

import io
import json
import posixpath
import random
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from excb.data.decode import DEFAULT_FORMATS, ImageDecodeError, decode_image
from excb.errors import EmptyDatasetError
from excb.seeds import derive_seed, seeded

INDEX_NAME = "index.json"
INDEX_FORMAT = "excb-shards/1"
SHARD_PATTERN = "shard-{:06d}.tar"
KEY_DIGITS = 6


class ShardFormatError(ValueError):
    """The shard set is missing, malformed, or disagrees with its index."""


# ------------------------------------------------------------------------------------------ locations
def is_url(location: str) -> bool:
    return "://" in location


def join(base: str, name: str) -> str:
    """Join a folder and a file name for local paths and URLs alike."""
    return posixpath.join(base, name) if is_url(base) else str(Path(base) / name)


def open_binary(location: str, mode: str = "rb") -> IO[bytes]:
    """A binary file object for a local path (no fsspec needed) or an fsspec URL."""
    if not is_url(location):
        if "w" in mode:
            Path(location).parent.mkdir(parents=True, exist_ok=True)
        return open(Path(location).expanduser(), mode)
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec is a dependency
        raise ImportError(f"{location!r} is a URL; reading it needs the 'fsspec' package") from exc
    return fsspec.open(location, mode).open()


def _index_location(source: str) -> tuple[str, str]:
    """``(folder, index path)`` for a folder or an explicit ``.../index.json``."""
    if source.endswith(".json"):
        return (posixpath.dirname(source) if is_url(source) else str(Path(source).parent)), source
    return source, join(source, INDEX_NAME)


# ---------------------------------------------------------------------------------------------- index
@dataclass(frozen=True)
class ShardIndex:
    """What ``index.json`` says: shard locations, per-shard sample counts, class names."""

    root: str
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    classes: tuple[str, ...]
    skipped: int = 0

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    def limited(self, limit: int | None) -> "ShardIndex":
        """The first ``limit`` samples in index order (shards past it dropped, the last one clipped)."""
        if limit is None or limit >= self.total:
            return self
        counts, left = [], limit
        for c in self.counts:
            counts.append(min(c, left))
            left -= counts[-1]
        keep = [i for i, c in enumerate(counts) if c > 0]
        return ShardIndex(self.root, tuple(self.shards[i] for i in keep), tuple(counts[i] for i in keep),
                          self.classes, self.skipped)


def write_index(out: str, names: Sequence[str], counts: Sequence[int], classes: Sequence[str], skipped: int,
                source: str) -> str:
    doc = {"format": INDEX_FORMAT, "total": int(sum(counts)), "classes": list(classes), "skipped": int(skipped),
           "source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "shards": [{"name": n, "count": int(c)} for n, c in zip(names, counts)]}
    path = join(out, INDEX_NAME)
    with open_binary(path, "wb") as fh:
        fh.write(json.dumps(doc, indent=1).encode())
    return path


def read_index(source: str) -> ShardIndex:
    """Parse and check ``index.json``; shard names are resolved against its folder."""
    root, path = _index_location(source)
    try:
        with open_binary(path) as fh:
            doc = json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"data source 'shards:{source}': no {INDEX_NAME} at {path!r} "
                                f"(create one with 'excb data pack FOLDER --out SHARDS')") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardFormatError(f"{path}: not a JSON shard index ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT or not isinstance(doc.get("shards"), list):
        raise ShardFormatError(f"{path}: expected format {INDEX_FORMAT!r} with a 'shards' list")
    names, counts = [], []
    for entry in doc["shards"]:
        name, count = entry.get("name"), entry.get("count")
        if not isinstance(name, str) or "/" in name or not isinstance(count, int) or count < 0:
            raise ShardFormatError(f"{path}: bad shard entry {entry!r}")
        names.append(join(root, name))
        counts.append(count)
    return ShardIndex(root, tuple(names), tuple(counts), tuple(doc.get("classes", [])), int(doc.get("skipped", 0)))


# --------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Writes samples into numbered tar shards of at most ``max_count`` samples each."""

    def __init__(self, out: str, max_count: int = 1000) -> None:
        if max_count < 1:
            raise ValueError(f"--shard-size: must be >= 1, got {max_count}")
        self.out, self.max_count = out, max_count
        self.names: list[str] = []
        self.counts: list[int] = []
        self._fh: IO[bytes] | None = None
        self._tar: tarfile.TarFile | None = None
        self.written = 0

    def _roll(self) -> None:
        self.close()
        name = SHARD_PATTERN.format(len(self.names))
        self._fh = open_binary(join(self.out, name), "wb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
        self.names.append(name)
        self.counts.append(0)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, jpeg: bytes, label: int) -> None:
        if self._tar is None or self.counts[-1] >= self.max_count:
            self._roll()
        key = f"{self.written:0{KEY_DIGITS}d}"
        self._add(f"{key}.jpg", jpeg)
        self._add(f"{key}.cls", str(int(label)).encode())
        self.counts[-1] += 1
        self.written += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# --------------------------------------------------------------------------------------------- reading
def _shard_samples(location: str, start: int, stop: int) -> Iterator[tuple[int, dict[str, bytes]]]:
    """Samples ``start <= i < stop`` of one shard as ``(i, {ext: bytes})``; members grouped by key."""
    with open_binary(location) as fh:
        tar = tarfile.open(fileobj=fh, mode="r:")  # seekable: skipped members' data is seeked over, not read
        index, key = -1, None
        sample: dict[str, bytes] = {}
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = member.name.rpartition("/")[2].partition(".")
            if stem != key:
                if key is not None and start <= index:
                    yield index, sample
                index, key, sample = index + 1, stem, {}
                if index >= stop:
                    return
            if start <= index:
                data = tar.extractfile(member)
                sample[ext] = data.read() if data is not None else b""
        if key is not None and start <= index < stop:
            yield index, sample


def plan_epoch(counts: Sequence[int], epoch: int, seed: int, rank: int, world: int, worker: int, num_workers: int,
               block: int = 1) -> list[tuple[int, int, int]]:
    """This consumer's segments ``(shard, start, stop)`` for the epoch (see the module docstring).

    Pure and cheap, so every consumer computes the same global plan with no communication.
    """
    if not 0 <= rank < world or not 0 <= worker < num_workers or block < 1:
        raise ValueError(f"bad consumer rank={rank}/{world} worker={worker}/{num_workers} block={block}")
    order = np.random.default_rng(derive_seed(seed, "shard-order", epoch)).permutation(len(counts))
    total = int(sum(counts))
    lo, hi = rank * total // world, (rank + 1) * total // world
    blocks = (hi - lo) // block
    a = lo + (worker * blocks // num_workers) * block
    b = hi if worker == num_workers - 1 else lo + ((worker + 1) * blocks // num_workers) * block
    segments: list[tuple[int, int, int]] = []
    pos = 0
    for shard in order.tolist():
        n = int(counts[shard])
        s, e = max(a, pos), min(b, pos + n)
        if s < e:
            segments.append((shard, s - pos, e - pos))
        pos += n
    return segments


def shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A shuffle buffer: hold ``size`` items, emit a random one as each new one arrives."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


@dataclass
class RawSample:
    """A sample read but not decoded: JPEG bytes as a uint8 tensor (what batched GPU decode takes)."""

    key: int
    data: torch.Tensor
    label: int


class ShardStream(IterableDataset):
    """Streams a shard set; see the module docstring for the split and the item formats.

    ``mode="pil"``: defensive decode to PIL -> ``transform`` -> item (``(item, label)`` when ``labelled``),
    ``None`` for undecodable samples (the collate counts them), the same items as the map-style sets.
    ``mode="raw"``: :class:`RawSample` with the JPEG bytes, for batched decode on the GPU.
    ``batch_size``: yield ``collate(list of batch_size items)`` instead of single items.
    """

    def __init__(self, source: str | ShardIndex, *, transform: Callable[[Any], Any] | None = None,
                 labelled: bool = False, mode: str = "pil", seed: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: int | None = None, collate: Callable[[list[Any]], Any] | None = None,
                 shuffle_buffer: int = 1000, limit: int | None = None, max_pixels: int = 64_000_000) -> None:
        super().__init__()
        if mode not in ("pil", "raw"):
            raise ValueError(f"mode: {mode!r} is not 'pil' or 'raw'")
        if batch_size is not None and (batch_size < 1 or collate is None):
            raise ValueError("batch_size needs to be >= 1 and comes with a collate function")
        index = source if isinstance(source, ShardIndex) else read_index(source)
        self.index = index.limited(limit)
        self.source = index.root
        self.classes = self.index.classes
        self.transform, self.labelled, self.mode = transform, labelled, mode
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size, self.collate = batch_size, collate
        self.shuffle_buffer, self.max_pixels = shuffle_buffer, max_pixels
        self.epoch = 0
        self._starts = np.concatenate([[0], np.cumsum(self.index.counts)]).astype(np.int64)

    def __len__(self) -> int:
        return self.index.total

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's shard order, shuffle and augmentation draws (call before iterating)."""
        self.epoch = int(epoch)

    def _consumer(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _raw(self, worker: int, workers: int) -> Iterator[tuple[int, dict[str, bytes]]]:
        """This consumer's ``(global key, members)`` in plan order."""
        plan = plan_epoch(self.index.counts, self.epoch, self.seed, self.rank, self.world_size, worker, workers,
                          self.batch_size or 1)
        for shard, start, stop in plan:
            got = start
            for i, sample in _shard_samples(self.index.shards[shard], start, stop):
                yield int(self._starts[shard]) + i, sample
                got = i + 1
            if got != stop:
                raise ShardFormatError(f"{self.index.shards[shard]}: has {got} samples, the index says "
                                       f"{self.index.counts[shard]}")

    def _label(self, sample: dict[str, bytes]) -> int:
        try:
            return int(sample.get("cls", b"-1").decode().strip() or -1)
        except ValueError:
            return -1

    def _item(self, key: int, sample: dict[str, bytes]) -> Any:
        image_bytes = sample.get("jpg") or sample.get("jpeg") or sample.get("png") or b""
        label = self._label(sample)
        if self.mode == "raw":
            data = (torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8) if image_bytes
                    else torch.empty(0, dtype=torch.uint8))
            return RawSample(key, data, label)
        try:
            image = decode_image(image_bytes, max_bytes=max(len(image_bytes), 1), max_pixels=self.max_pixels,
                                 allowed_formats=DEFAULT_FORMATS)
        except ImageDecodeError:
            return None
        if self.transform is not None:
            with seeded(derive_seed(self.seed, "item", self.epoch, key)):  # whatever worker reads it
                image = self.transform(image)
        return (image, label) if self.labelled else image

    def __iter__(self) -> Iterator[Any]:
        worker, workers = self._consumer()
        rng = random.Random(derive_seed(self.seed, "shuffle", self.epoch, self.rank, worker))
        items = (self._item(k, s) for k, s in shuffled(self._raw(worker, workers), self.shuffle_buffer, rng))
        if self.batch_size is None:
            yield from items
            return
        assert self.collate is not None
        batch: list[Any] = []
        for item in items:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
        if batch:
            yield self.collate(batch)


def open_shards(source: str, **kwargs: Any) -> ShardStream:
    """``shards:PATH_OR_URL`` (the ``shards:`` prefix optional) as a :class:`ShardStream`."""
    location = source[len("shards:"):] if source.startswith("shards:") else source
    if not location:
        raise ValueError("data.source: expected shards:PATH_OR_URL")
    stream = ShardStream(location, **kwargs)
    if len(stream) == 0:
        raise EmptyDatasetError(f"data source {source!r}: the shard index lists no samples")
    return stream
