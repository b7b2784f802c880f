"""The search index of a corpus: every embedded row of its parts in one faiss index, kept in the corpus directory.

A corpus (``services/corpus``: ``manifest.json`` + ``parts/part-NNNNN.parquet``, one row per image with its
``path``, L2-normalised ``embedding`` or null, ``cluster``, ``balanced_cluster``, ``similarity``) can hold
millions of images, where the model's sample index (``services/index``, at most 200,000) stops. Which index:

- up to :data:`EXACT_MAX` vectors, exact (``IndexFlatIP``): built in well under a second, recall 1.0, and a
  query scans 100,000 x 384-d in 64 ms (p50, two loaded cores), so ~30 ms at the bound; small corpora are built
  on their first search.
- above it, ``IndexIVFFlat`` (inverted lists over a k-means of the vectors; ``nlist`` ~ sqrt(N), a power of two;
  ``nprobe`` lists scanned per query). Not HNSW, although the sample index uses it: at 100k x 384-d HNSW took 103 s
  to build on two loaded cores against IVF's 6 s, and IVF builds 1M in 75 s; IVF holds just the vectors (no graph),
  and its inverted lists make curation's near-duplicate pass a set of matrix products. Recall@10 and latency
  against exact at 1M (0.987 at :data:`NPROBE` = 32, p50 6 ms) are in benchmarks/RESULTS.md ("Corpus search and
  curation", ``benchmarks/corpus_index_bench.py``).

Layout: ``<corpus>/index/CURRENT`` names ``v-<stamp>/`` holding ``vectors.faiss``, ``rows.npy`` (the corpus row
of each faiss id: failed rows have no vector) and ``meta.json`` (type, count, the parts it was built from). A
rebuild writes a new version and flips ``CURRENT``, so a reader never sees half an index.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from services.corpus.parts import read_manifest
from services.index.store import publish_version, read_current

INDEX_DIR = "index"
FORMAT = "excb-corpus-index/1"
EXACT_MAX = 50_000
NPROBE = 32
TRAIN_PER_LIST = 64      # k-means training points per inverted list (faiss warns below 39)


class CorpusIndexNotFound(LookupError):
    """The corpus has no built index (or no parts to build one from)."""


@dataclass
class CorpusColumns:
    """The per-row columns search and curation read (row i of each array is corpus row i, over all parts)."""

    paths: Any                   # pyarrow StringArray (compact at millions of rows, unlike a list of str)
    cluster: np.ndarray          # [N] int32 (-1 where the row failed)
    balanced_cluster: np.ndarray # [N] int32 (-1 where the row failed)
    similarity: np.ndarray       # [N] float32 (nan where the row failed)
    ok: np.ndarray               # [N] bool: the row has an embedding

    @property
    def count(self) -> int:
        return int(self.ok.shape[0])

    def path(self, row: int) -> str:
        return str(self.paths[int(row)].as_py())


def part_files(corpus_dir: Path) -> list[Path]:
    """The committed parts of the corpus in row order: those of chunks the manifest marks ``done``
    (``services.corpus.parts``, the contract); a corpus still being written is searched as far as it got."""
    manifest = read_manifest(Path(corpus_dir))
    if manifest is None:
        raise CorpusIndexNotFound(f"{corpus_dir}: not a corpus (no manifest)")
    chunks = sorted((c for c in manifest.get("chunks", []) if c.get("status") == "done"), key=lambda c: int(c["index"]))
    return [Path(corpus_dir) / str(c["part"]) for c in chunks]


def parts_fingerprint(corpus_dir: Path) -> list[list[Any]]:
    """Name, size and mtime of every committed part: an index built from other parts is stale."""
    out = []
    for p in part_files(corpus_dir):
        st = p.stat()
        out.append([p.name, int(st.st_size), int(st.st_mtime_ns)])
    return out


def _tables(corpus_dir: Path, columns: list[str]) -> Iterator[Any]:
    import pyarrow.parquet as pq

    for f in part_files(corpus_dir):
        yield pq.read_table(f, columns=columns)


def read_columns(corpus_dir: Path) -> CorpusColumns:
    """Every row's path, clusters and similarity (not the embeddings: those live in the index)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tables = list(_tables(corpus_dir, ["path", "cluster", "balanced_cluster", "similarity", "error"]))
    if not tables:
        raise CorpusIndexNotFound(f"{corpus_dir}: no committed parts")
    paths = pa.chunked_array([t.column("path").combine_chunks() for t in tables]).combine_chunks()
    ok = np.concatenate([pc.is_null(t.column("error")).to_numpy(zero_copy_only=False) for t in tables])

    def col(name: str, dtype: Any, fill: Any) -> np.ndarray:
        parts = [t.column(name).fill_null(fill).to_numpy() for t in tables]
        return np.concatenate(parts).astype(dtype, copy=False)

    return CorpusColumns(paths=paths, cluster=col("cluster", np.int32, -1),
                         balanced_cluster=col("balanced_cluster", np.int32, -1),
                         similarity=col("similarity", np.float32, float("nan")), ok=ok.astype(bool))


def iter_embeddings(corpus_dir: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(corpus rows, embeddings [n, D] float32) of the rows that have one, one part at a time (a part is one
    chunk of the job, so memory beside the index stays one chunk's)."""
    import pyarrow.compute as pc

    start = 0
    for table in _tables(corpus_dir, ["embedding"]):
        col = table.column("embedding").combine_chunks()
        valid = pc.is_valid(col).to_numpy(zero_copy_only=False).astype(bool)
        rows = start + np.flatnonzero(valid)
        start += len(col)
        if not rows.size:
            continue
        kept = col.filter(pc.is_valid(col))
        dim = kept.type.list_size
        vecs = kept.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
        yield rows.astype(np.int64), vecs


def nlist_for(n: int) -> int:
    """Inverted lists for n vectors: ~sqrt(n), a power of two, and at least 39 training points per list."""
    target = min(2 ** round(math.log2(max(1.0, math.sqrt(n)))), max(1, n // 39))
    return int(2 ** math.floor(math.log2(target)))


def _embedded_count(corpus_dir: Path) -> int:
    """Rows with an embedding, from the small ``error`` column (the contract: embedding null exactly when set)."""
    return sum(int(t.column("error").null_count) for t in _tables(corpus_dir, ["error"]))


def _trained_ivf(corpus_dir: Path, n: int, d: int, nprobe: int, seed: int) -> Any:
    """An empty IVF-Flat index whose coarse quantizer is trained on a uniform sample of the corpus's vectors
    (read part by part: only the sample is held)."""
    import faiss

    nlist = nlist_for(n)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(n, nlist * TRAIN_PER_LIST), replace=False))
    sample, offset = [], 0
    for _, vecs in iter_embeddings(corpus_dir):
        here = pick[(pick >= offset) & (pick < offset + len(vecs))] - offset
        sample.append(vecs[here])
        offset += len(vecs)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    ivf.train(np.ascontiguousarray(np.concatenate(sample), dtype=np.float32))
    ivf.nprobe = min(nprobe, nlist)
    return ivf


def index_root(corpus_dir: Path) -> Path:
    return Path(corpus_dir) / INDEX_DIR


def build_corpus_index(corpus_dir: Path, *, exact_max: int = EXACT_MAX, nprobe: int = NPROBE,
                       seed: int = 0) -> dict[str, Any]:
    """Index every embedding of the corpus's committed parts and make that version current; returns its meta."""
    import faiss

    t0 = time.perf_counter()
    fingerprint = parts_fingerprint(corpus_dir)
    if not fingerprint:
        raise CorpusIndexNotFound(f"{corpus_dir}: no parts to index")
    n = _embedded_count(corpus_dir)
    manifest = read_manifest(Path(corpus_dir)) or {}
    d = int(manifest.get("embed_dim") or 0)
    if n == 0 or d <= 0:
        raise ValueError(f"{corpus_dir}: no row has an embedding (every image failed)")
    # Exact up to exact_max, IVF-Flat above (module docstring); either way the vectors are added a part at a time,
    # so a build holds the index and one part (at 1M x 384-d: 1.5 GB, not three copies of it).
    index = faiss.IndexFlatIP(d) if n <= exact_max else _trained_ivf(corpus_dir, n, d, nprobe, seed)
    t_train = time.perf_counter() - t0
    rows_l = []
    for rows, vecs in iter_embeddings(corpus_dir):
        index.add(np.ascontiguousarray(vecs, dtype=np.float32))
        rows_l.append(rows)
    rows = np.concatenate(rows_l)
    t_add = time.perf_counter() - t0 - t_train
    meta: dict[str, Any] = {
        "format": FORMAT, "count": int(len(rows)), "dim": d, "index_type": type(index).__name__,
        "nlist": int(getattr(index, "nlist", 0)), "nprobe": int(getattr(index, "nprobe", 0)),
        "exact_max": int(exact_max), "library": f"faiss-cpu {faiss.__version__}",
        "metric": "inner product of L2-normalised embeddings (cosine)", "parts": fingerprint,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": {"train": round(t_train, 3), "add": round(t_add, 3)},
    }
    _write_version(index_root(corpus_dir), index, rows, meta)
    return meta


def _write_version(root: Path, index: Any, rows: np.ndarray, meta: dict[str, Any]) -> Path:
    import faiss

    def fill(tmp: Path, version: str) -> None:
        faiss.write_index(index, str(tmp / "vectors.faiss"))
        np.save(tmp / "rows.npy", rows.astype(np.int64))
        (tmp / "meta.json").write_text(json.dumps({**meta, "version": version}, indent=1))

    return publish_version(root, fill)


def current_version(corpus_dir: Path) -> str | None:
    return read_current(index_root(corpus_dir))


class CorpusIndex:
    """One loaded index version with the corpus's columns: search by vector, vectors by row, paths by row."""

    def __init__(self, corpus_dir: Path, version: str) -> None:
        import faiss

        directory = index_root(corpus_dir) / version
        self.corpus_dir = Path(corpus_dir)
        self.version = version
        self.meta: dict[str, Any] = json.loads((directory / "meta.json").read_text())
        self.faiss = faiss.read_index(str(directory / "vectors.faiss"))
        if isinstance(self.faiss, faiss.IndexIVF):  # reconstruct(id) for queries by row and curation
            self.faiss.make_direct_map()
            self.faiss.nprobe = int(self.meta.get("nprobe") or NPROBE)
        self.rows = np.load(directory / "rows.npy", allow_pickle=False)
        self.columns = read_columns(corpus_dir)
        self._id_of = np.full(self.columns.count, -1, dtype=np.int64)  # corpus row -> faiss id (-1: no vector)
        self._id_of[self.rows] = np.arange(len(self.rows))

    @property
    def count(self) -> int:
        """Vectors in the index (rows that failed to decode have none)."""
        return int(len(self.rows))

    def stale(self) -> bool:
        return self.meta.get("parts") != parts_fingerprint(self.corpus_dir)

    def faiss_id(self, row: int) -> int:
        """The faiss id of corpus row ``row``, or -1 (out of range, or the row has no embedding)."""
        return int(self._id_of[row]) if 0 <= row < len(self._id_of) else -1

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of faiss ids (not corpus rows)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return np.zeros((0, int(self.faiss.d)), dtype=np.float32)
        return np.asarray(self.faiss.reconstruct_batch(ids), dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], corpus rows [Q, k]); -1 rows where fewer than k were found."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        scores, ids = self.faiss.search(q, min(k, self.count))
        rows = np.where(ids >= 0, self.rows[np.maximum(ids, 0)], -1)
        return scores, rows


class CorpusIndexCache:
    """Loaded corpus indexes by directory, reloaded when ``CURRENT`` names another version; small, as each
    holds its vectors (1M x 384-d is 1.5 GB)."""

    def __init__(self, max_loaded: int = 2) -> None:
        self.max_loaded = max_loaded
        self._loaded: dict[Path, CorpusIndex] = {}
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()

    def get(self, corpus_dir: Path, *, build_up_to: int = EXACT_MAX) -> CorpusIndex:
        """The current index; one missing or stale is (re)built here when the corpus has at most
        ``build_up_to`` rows (seconds), else :class:`CorpusIndexNotFound` (build it with ``excb corpus index``)."""
        key = Path(corpus_dir)
        version = current_version(key)
        with self._lock:
            hit = self._loaded.get(key)
        if hit is not None and hit.version == version and not hit.stale():
            return hit
        loaded = CorpusIndex(key, version) if version is not None else None
        if loaded is None or loaded.stale():
            with self._build_lock:
                loaded = self._rebuild(key, build_up_to)
        with self._lock:
            self._loaded[key] = loaded
            while len(self._loaded) > self.max_loaded:
                self._loaded.pop(next(iter(self._loaded)))
        return loaded

    @staticmethod
    def _rebuild(key: Path, build_up_to: int) -> CorpusIndex:
        version = current_version(key)  # another request may have built it while this one waited
        if version is not None:
            loaded = CorpusIndex(key, version)
            if not loaded.stale():
                return loaded
        rows = sum(_part_rows(p) for p in part_files(key))
        if rows == 0:
            raise CorpusIndexNotFound(f"{key}: no parts")
        if rows > build_up_to:
            raise CorpusIndexNotFound(f"{key}: {rows} rows and no current index")
        build_corpus_index(key)
        version = current_version(key)
        assert version is not None
        return CorpusIndex(key, version)


def _part_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)
