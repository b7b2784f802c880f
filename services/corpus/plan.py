"""Split a data source into chunks once, so every worker and every re-run agree on which item is in which chunk.

- A folder or ``list:FILE``: the sorted, de-duplicated file listing (``listing.txt`` in the corpus dir, written
  once) cut into ranges of ``chunk_size`` lines. Sorting makes the split independent of the file system's order.
- ``shards:DIR``: one chunk per shard (its samples in tar order), as the shard index lists them.
- A built-in data set (``digits``, ``fashion-mnist``): index ranges of its ``all`` split.

The plan is stored in the manifest (``chunks[i].start/stop``, ``chunks[i].shard``) the first time a job runs and
read back by every later attempt: a re-run never re-lists, so a file added meanwhile cannot shift the ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from services.common.paths import BUILTIN_SOURCES
from services.corpus.parts import part_name

LISTING = "listing.txt"
DEFAULT_CHUNK_SIZE = 1000
MAX_CHUNK_SIZE = 100_000


@dataclass(frozen=True)
class Item:
    """One item of a chunk: its name in the output (``path``) and how to read it (a file, or bytes/an image)."""

    path: str
    file: str | None = None
    data: bytes | None = None
    image: Any = None


def source_kind(source: str) -> str:
    """``files``, ``shards`` or ``builtin``."""
    if source.startswith("shards:"):
        return "shards"
    if source in BUILTIN_SOURCES or source.startswith("fashion-mnist:"):
        return "builtin"
    return "files"


def plan_chunks(source: str, chunk_size: int, root: Path) -> list[dict[str, Any]]:
    """The chunk list of ``source`` (manifest form, every chunk ``pending``); files sources also write
    ``root/listing.txt``. Raises ValueError/OSError for a source that cannot be listed or holds nothing."""
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size: must be between 1 and {MAX_CHUNK_SIZE}, got {chunk_size}")
    kind = source_kind(source)
    ranges: list[dict[str, Any]]
    if kind == "shards":
        from excb.data.shards import read_index

        index = read_index(source[len("shards:"):])
        ranges = [{"shard": loc, "start": 0, "stop": int(n)} for loc, n in zip(index.shards, index.counts) if n]
    else:
        total = _write_listing(source, root) if kind == "files" else _builtin_len(source)
        ranges = [{"start": s, "stop": min(s + chunk_size, total)} for s in range(0, total, chunk_size)]
    if not ranges:
        raise ValueError(f"data source {source!r} holds no images")
    return [{"index": i, "part": part_name(i), "items": r["stop"] - r["start"], "errors": 0, "status": "pending",
             **r} for i, r in enumerate(ranges)]


def _write_listing(source: str, root: Path) -> int:
    """Sorted unique absolute paths of the images ``source`` names, one per line, committed atomically."""
    from excb.data.datasets import ImageFileDataset, build_dataset

    ds = build_dataset(source, split="all", labelled=False)
    assert isinstance(ds, ImageFileDataset)
    paths = sorted({ds.path(i) for i in range(len(ds))})
    bad = [p for p in paths if "\n" in p or "\r" in p]
    if bad:
        raise ValueError(f"data source {source!r}: file name with a line break: {bad[0]!r}")
    from services.corpus.parts import write_text

    write_text(root / LISTING, "".join(p + "\n" for p in paths))
    return len(paths)


def _builtin_len(source: str) -> int:
    from excb.data.datasets import build_dataset

    return len(build_dataset(source, split="all", labelled=False))


def chunk_items(source: str, chunk: dict[str, Any], root: Path) -> Iterator[Item]:
    """The items of one chunk, read lazily (one file's bytes or one image at a time)."""
    start, stop = int(chunk["start"]), int(chunk["stop"])
    kind = source_kind(source)
    if kind == "shards":
        from excb.data.shards import _shard_samples

        for i, sample in _shard_samples(str(chunk["shard"]), start, stop):
            data = sample.get("jpg") or sample.get("jpeg") or sample.get("png") or b""
            yield Item(path=f"{chunk['shard']}#{i}", data=data)
    elif kind == "builtin":
        from excb.data.datasets import build_dataset

        ds = build_dataset(source, split="all", labelled=False)
        for i in range(start, stop):
            yield Item(path=f"{source}#{i}", image=ds[i])
    else:
        with (root / LISTING).open(encoding="utf-8") as fh:
            for n, line in enumerate(fh):
                if n >= stop:
                    break
                if n >= start:
                    path = line.rstrip("\n")
                    yield Item(path=path, file=path)
