"""The on-disk form of an embedded corpus: the contract between the corpus jobs that write it and whatever
reads it (search index, curation). Nothing else in a corpus directory is part of the contract.

Layout (``corpus_dir(settings, job_id)`` = ``<runs_dir>/<job_id>/corpus/``; the job's run dir, so deleting the
job deletes its corpus and a corpus is owned exactly as its job is)::

    manifest.json           {"job_id", "model_id", "owner", "source", "embed_dim", "num_clusters",
                             "chunks": [{"index", "part", "items", "errors", "status"}], "status", "created", ...}
    parts/part-NNNNN.parquet one per chunk (NNNNN = chunk index), columns :data:`COLUMNS`

``manifest.status``: ``running`` while chunks are written, then ``succeeded``, ``failed`` or ``cancelled``. A chunk
``status`` is ``pending`` or ``done``; ``part`` is its path relative to the corpus dir, ``items`` its rows (images
tried), ``errors`` its rows that did not decode. Every item of the source is in exactly one part exactly once: a
part is written to a temporary name and ``os.replace``-d into place (all or nothing), and a chunk done twice (a
redelivered task, a worker killed after the commit) writes the same rows to the same name.

Also in the manifest (informative, not needed to read the parts): ``model_sha256``, ``chunk_size``, ``batch_size``,
``images`` and ``errors`` (totals), ``updated``; per chunk the plan (``start``/``stop`` into ``listing.txt``, or
``shard``). While the job runs the coordinator rewrites the manifest whenever chunks complete, so a running
corpus lists its committed chunks as ``done`` too.

Columns: ``similarity`` is the cosine to the centroid of ``balanced_cluster`` (as the sample index stores it). An
``embedding`` is L2-normalised; a network output of exactly zero stays the zero vector.

Readers should go through :func:`read_parts`: it yields only committed parts of ``done`` chunks, in chunk order.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

MANIFEST = "manifest.json"
PARTS_DIR = "parts"
PART_PATTERN = "part-{:05d}.parquet"
# Column order of every part; ``embedding`` is fixed_size_list<float32>[embed_dim], L2-normalised, null on error.
COLUMNS = ("path", "embedding", "cluster", "balanced_cluster", "similarity", "error")


def corpus_dir(settings: Any, job_id: str) -> Path:
    """Where job ``job_id``'s corpus lives: ``corpus/`` inside its run dir (``Settings.runs_dir / job_id``)."""
    return Path(settings.runs_dir).expanduser().resolve() / job_id / "corpus"


def part_name(index: int) -> str:
    """A chunk's part path relative to the corpus dir."""
    return f"{PARTS_DIR}/{PART_PATTERN.format(index)}"


def schema(embed_dim: int) -> Any:
    """The Arrow schema of a part (``embed_dim`` fixes the embedding list size)."""
    import pyarrow as pa

    return pa.schema([
        pa.field("path", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), embed_dim)),
        pa.field("cluster", pa.int32()),
        pa.field("balanced_cluster", pa.int32()),
        pa.field("similarity", pa.float32()),  # cosine to the centroid of balanced_cluster
        pa.field("error", pa.string()),
    ])


def part_table(embed_dim: int, paths: Sequence[str], embeddings: np.ndarray, cluster: np.ndarray,
               balanced: np.ndarray, similarity: np.ndarray, errors: Sequence[str | None]) -> Any:
    """One part's rows. Arrays have one row per item; rows with an ``errors`` entry get nulls in every result
    column (their values in the arrays are ignored)."""
    import pyarrow as pa

    n = len(paths)
    if not (len(embeddings) == len(cluster) == len(balanced) == len(similarity) == len(errors) == n):
        raise ValueError("part_table: every column needs one entry per path")
    bad = np.array([e is not None for e in errors], dtype=bool)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(n, embed_dim)
    flat = pa.array(emb.reshape(-1), pa.float32())
    embedding = pa.FixedSizeListArray.from_arrays(flat, embed_dim, mask=pa.array(bad) if n else None)
    return pa.table({
        "path": pa.array(list(paths), pa.string()),
        "embedding": embedding,
        "cluster": pa.array(np.asarray(cluster, dtype=np.int32), pa.int32(), mask=bad),
        "balanced_cluster": pa.array(np.asarray(balanced, dtype=np.int32), pa.int32(), mask=bad),
        "similarity": pa.array(np.asarray(similarity, dtype=np.float32), pa.float32(), mask=bad),
        "error": pa.array(list(errors), pa.string()),
    }, schema=schema(embed_dim))


def write_part(root: Path, index: int, table: Any) -> Path:
    """Commit chunk ``index``'s part atomically: write a temporary file beside it, fsync, ``os.replace``.
    Writing a chunk again (a duplicate delivery) replaces the part with the same rows; readers never see a
    partial file."""
    import pyarrow.parquet as pq

    final = root / part_name(index)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        pq.write_table(table, tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def write_text(path: Path, text: str) -> None:
    """A text file replaced atomically (readers see the old or the new file, never a partial one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """A JSON file replaced atomically (the manifest, a chunk's completion record)."""
    write_text(path, json.dumps(doc, indent=1))


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The corpus's manifest, or None when there is none (yet)."""
    try:
        doc = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    return doc if isinstance(doc, dict) else None


def read_parts(root: str | os.PathLike[str], columns: Sequence[str] | None = None) -> Iterator[Any]:
    """The committed parts of a corpus as pyarrow Tables, in chunk order (only chunks the manifest marks
    ``done``); ``columns`` selects columns (e.g. ``["path", "embedding"]``)."""
    import pyarrow.parquet as pq

    base = Path(root)
    manifest = read_manifest(base)
    if manifest is None:
        raise FileNotFoundError(f"{base}: no {MANIFEST} (not a corpus directory)")
    for chunk in sorted(manifest.get("chunks", []), key=lambda c: int(c["index"])):
        if chunk.get("status") == "done":
            yield pq.read_table(base / chunk["part"], columns=list(columns) if columns else None)
