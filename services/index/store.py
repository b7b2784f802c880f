"""On-disk image index of one model, written atomically and read by every service that shares the models volume.

Layout, next to the bundle but outside it (hidden, so the embed registry's rescan and ``GET .../bundle`` never
see it): ``<models_dir>/.indexes/<model_id>/<name>/``

- ``CURRENT``: JSON ``{"version": "v-..."}``, replaced with ``os.replace``; readers open the version it names.
- ``v-<stamp>/``: one complete build: ``vectors.faiss`` (L2-normalised embeddings, inner product),
  ``items.npz`` (per image: raw + balance-adjusted cluster and the similarity to each centroid, label, source,
  thumbnail offsets), ``thumbs.bin`` (the JPEG thumbnails, concatenated), ``meta.json``.
- ``status.json``: the last build request's state (queued, running, failed + why) for builds run elsewhere.

A rebuild writes a new version directory, flips ``CURRENT`` and then removes older versions, so a reader never
sees half an index; a reader that already opened the old version keeps its open arrays (they are read into memory).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from excb.fileio import atomic_write

INDEXES_DIR = ".indexes"
CURRENT_FILE = "CURRENT"
VERSION_PREFIX = "v-"  # every version directory's name starts so; readers and the pruning go by it
STATUS_FILE = "status.json"
DEFAULT_NAME = "default"
FORMAT = "excb-index/1"
STALE_TMP_SECONDS = 86400.0  # a temp dir this old belongs to a build that died; a younger one may be writing
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class IndexNotFound(LookupError):
    """No (complete) index with this model id and name."""


def valid_name(name: str) -> bool:
    """Index names and model ids become directory names: a strict alphabet, no dots first, no separators."""
    return bool(_NAME_RE.fullmatch(name))


def index_root(models_dir: Path, model_id: str, name: str = DEFAULT_NAME) -> Path:
    """Directory of one named index of one model (not created)."""
    if not _ID_RE.fullmatch(model_id) or not valid_name(name):
        raise ValueError(f"invalid model id or index name: {model_id!r}, {name!r}")
    return Path(models_dir) / INDEXES_DIR / model_id / name


@dataclass
class IndexData:
    """What a build produces, in memory: row i of every array is image i."""

    vectors: np.ndarray           # [N, D] float32, L2-normalised
    raw_cluster: np.ndarray       # [N] int32: argmax of the centroid similarities
    raw_similarity: np.ndarray    # [N] float32: similarity to that centroid
    cluster: np.ndarray           # [N] int32: balance-adjusted cluster (what the service reports as the cluster)
    similarity: np.ndarray        # [N] float32: similarity to the balance-adjusted cluster's centroid
    labels: list[str | None]      # class name when the source has one (sub-folder, digits), else None
    sources: list[str]            # where the image came from (path relative to the folder, or "digits:17")
    thumbs: list[bytes]           # JPEG thumbnails
    meta: dict[str, Any] = field(default_factory=dict)


def write_index(root: Path, data: IndexData, faiss_index: Any) -> Path:
    """Write a complete version under ``root`` and make it current; returns the version directory."""
    import faiss

    def fill(tmp: Path, version: str) -> None:
        faiss.write_index(faiss_index, str(tmp / "vectors.faiss"))
        offsets = np.zeros(len(data.thumbs) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in data.thumbs], out=offsets[1:])
        with open(tmp / "thumbs.bin", "wb") as fh:
            for t in data.thumbs:
                fh.write(t)
        np.savez(tmp / "items.npz", raw_cluster=data.raw_cluster.astype(np.int32),
                 raw_similarity=data.raw_similarity.astype(np.float32), cluster=data.cluster.astype(np.int32),
                 similarity=data.similarity.astype(np.float32), thumb_offsets=offsets,
                 labels=np.array([lab if lab is not None else "" for lab in data.labels], dtype=np.str_),
                 has_label=np.array([lab is not None for lab in data.labels], dtype=bool),
                 sources=np.array(data.sources, dtype=np.str_))
        meta = {**data.meta, "format": FORMAT, "version": version, "count": int(len(data.sources))}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    return publish_version(root, fill)


def read_current(root: Path) -> str | None:
    """The version directory ``root/CURRENT`` names, or None when there is none yet or it names something that
    is not a version directory's name (a reader then answers "no index", never opens a path it was handed)."""
    try:
        version = json.loads((root / CURRENT_FILE).read_text())["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return version if isinstance(version, str) and version.startswith(VERSION_PREFIX) and valid_name(version) else None


def publish_version(root: Path, fill: Callable[[Path, str], None]) -> Path:
    """**The** versioned write of an index directory (the sample index's and a corpus's): ``fill(tmp, version)``
    writes the files into a temp directory, which is fsynced, renamed to ``root/version`` and named by
    ``CURRENT``; older versions (and temp directories abandoned for ``STALE_TMP_SECONDS``) are removed after."""
    root.mkdir(parents=True, exist_ok=True)
    version = f"{VERSION_PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    tmp = root / f".{version}.tmp"
    tmp.mkdir()
    try:
        fill(tmp, version)
        _fsync_dir_files(tmp)
        final = root / version
        os.replace(tmp, final)
        _atomic_json(root / CURRENT_FILE, {"version": version})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in root.iterdir():  # older versions: readers hold their arrays in memory, the files can go
        stale_tmp = old.name.startswith(f".{VERSION_PREFIX}") and time.time() - old.stat().st_mtime > STALE_TMP_SECONDS
        if old.is_dir() and old.name != version and (old.name.startswith(VERSION_PREFIX) or stale_tmp):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir_files(d: Path) -> None:
    for p in d.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())


def _atomic_json(path: Path, value: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(value), mode=0o644)  # as the version directory's other files


def write_status(root: Path, state: str, **extra: Any) -> None:
    """Record a build's state (queued / running / succeeded / failed) for ``GET /v1/models/{id}/index``."""
    root.mkdir(parents=True, exist_ok=True)
    _atomic_json(root / STATUS_FILE, {"state": state, "updated_at": time.time(), **extra})


def read_status(root: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((root / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class LoadedIndex:
    """A read-only, in-memory copy of one index version: the faiss index, the per-image arrays, the thumbnails."""

    def __init__(self, directory: Path) -> None:
        import faiss

        self.directory = directory
        self.meta: dict[str, Any] = json.loads((directory / "meta.json").read_text())
        self.faiss = faiss.read_index(str(directory / "vectors.faiss"))
        with np.load(directory / "items.npz", allow_pickle=False) as z:
            self.raw_cluster = z["raw_cluster"]
            self.raw_similarity = z["raw_similarity"]
            self.cluster = z["cluster"]
            self.similarity = z["similarity"]
            self.thumb_offsets = z["thumb_offsets"]
            self._labels = z["labels"]
            self._has_label = z["has_label"]
            self._sources = z["sources"]
        self.thumbs = (directory / "thumbs.bin").read_bytes()

    @property
    def count(self) -> int:
        return int(self.cluster.shape[0])

    @property
    def version(self) -> str:
        return str(self.meta.get("version", self.directory.name))

    def label(self, i: int) -> str | None:
        return str(self._labels[i]) if bool(self._has_label[i]) else None

    def source(self, i: int) -> str:
        return str(self._sources[i])

    def thumbnail(self, i: int) -> bytes:
        return self.thumbs[int(self.thumb_offsets[i]):int(self.thumb_offsets[i + 1])]

    def vector(self, i: int) -> np.ndarray:
        return np.asarray(self.faiss.reconstruct(int(i)), dtype=np.float32).reshape(1, -1)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], ids [Q, k]); ids of -1 (fewer than k images) are dropped by the caller."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return self.faiss.search(q, min(k, self.count))


class IndexCache:
    """Loaded indexes by (model id, name), reloaded when ``CURRENT`` names another version.

    Checking costs one small file read per request, which is what lets a rebuild done by a worker in another
    container appear without a restart.
    """

    def __init__(self, models_dir: Path, max_loaded: int = 8) -> None:
        self.models_dir = Path(models_dir)
        self.max_loaded = max_loaded
        self._loaded: dict[tuple[str, str], LoadedIndex] = {}
        self._lock = threading.Lock()

    def get(self, model_id: str, name: str = DEFAULT_NAME) -> LoadedIndex:
        try:
            root = index_root(self.models_dir, model_id, name)
        except ValueError as exc:
            raise IndexNotFound(f"{model_id}/{name}") from exc
        version = read_current(root)
        if version is None:
            raise IndexNotFound(f"{model_id}/{name}")
        key = (model_id, name)
        with self._lock:
            hit = self._loaded.get(key)
            if hit is not None and hit.version == version:
                return hit
        directory = root / version
        if not (directory / "meta.json").is_file():
            raise IndexNotFound(f"{model_id}/{name}")
        loaded = LoadedIndex(directory)
        with self._lock:
            self._loaded[key] = loaded
            while len(self._loaded) > self.max_loaded:
                self._loaded.pop(next(iter(self._loaded)))
        return loaded
