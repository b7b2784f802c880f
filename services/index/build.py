"""Build a model's image index: embed a (bounded, seeded) sample of a data source with the exported bundle,
keep per image its embedding, raw and balance-adjusted cluster, centroid similarity and a JPEG thumbnail,
and put the embeddings in a faiss index.

Why a sample: an index is for looking (gallery, "more like this"), not a second copy of the data set; the cap
(``DEFAULT_SAMPLE`` = 10,000 images, at most ``MAX_SAMPLE``) keeps a build to minutes on a CPU and the files to a
few tens of MB. Which images: a uniform sample without replacement drawn with ``seed`` (default 0), so the same
source, cap and seed always index the same images.

The embedding path is the service's: the same defensive decoder (through ``excb.data``), the same eval
preprocessing and the same verified ONNX bundle (``excb.inference.onnx_runtime``), so an indexed image and the same
image sent to ``POST /v1/embed`` have the same vector and cluster.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from excb.inference.onnx_runtime import OrtEmbedder, balance_paper, l2_normalize, load_bundle
from services.index.store import IndexData, write_index, write_status

log = logging.getLogger("excb.index")

DEFAULT_SAMPLE = 10_000
MAX_SAMPLE = 200_000
THUMB_SIZE = 64
# Up to this many vectors the index is exact (faiss IndexFlatIP): it builds instantly, has nothing to tune and
# recall 1.0, and one query scans 10k x 128-d vectors in 0.2 ms and 100k in 12 ms on one shared core
# (benchmarks/RESULTS.md, "Vector index"), so ~6 ms at this bound. Above it, HNSW (M=32, efSearch=128):
# 0.4 ms per query at 100k with recall 0.9999, for a build of minutes instead of milliseconds.
EXACT_MAX = 50_000


def sample_indices(n: int, cap: int, seed: int) -> np.ndarray:
    """Sorted indices of a uniform sample of ``min(n, cap)`` of ``n`` items (all of them when n <= cap)."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


def make_faiss(vectors: np.ndarray, exact_max: int = EXACT_MAX) -> Any:
    """Inner-product index over L2-normalised vectors (cosine similarity)."""
    import faiss

    d = int(vectors.shape[1])
    index: faiss.Index
    if len(vectors) <= exact_max:
        index = faiss.IndexFlatIP(d)
    else:
        hnsw = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 80
        hnsw.hnsw.efSearch = 128
        index = hnsw
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def thumbnail(image: Any, size: int = THUMB_SIZE) -> bytes:
    """A JPEG of at most ``size`` px per side; tiny images (digits are 8x8) are enlarged without blur."""
    from PIL import Image

    img = image.convert("RGB")
    longest = max(img.size)
    if longest < size:
        factor = max(1, size // longest)
        img = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


class _Source:
    """A data source opened as a dataset, with a name and an optional class label for each item."""

    def __init__(self, source: str, split: str, limit: int | None, decode_min_side: int = 0) -> None:
        from excb.data.datasets import ArrayDataset, ImageFileDataset, build_dataset

        self.source = source
        self.ds = build_dataset(source, split=split, limit=limit, labelled=False)
        self.kind = "array" if isinstance(self.ds, ArrayDataset) else "files"
        self._file_ds = self.ds if isinstance(self.ds, ImageFileDataset) else None
        self._files = self._file_ds is not None
        if self._file_ds is not None:  # large JPEGs decoded drafted, as the queries the embed service answers
            self._file_ds.decode_min_side = decode_min_side
        self._root = Path(source).expanduser().resolve() if self._files and Path(source).is_dir() else None
        self._split = split

    def __len__(self) -> int:
        return len(self.ds)

    def name(self, i: int) -> str:
        if self._file_ds is not None:
            path = Path(self._file_ds.path(i))
            if self._root is not None:
                try:
                    return path.resolve().relative_to(self._root).as_posix()
                except ValueError:
                    return path.name
            return path.name
        return f"{self.source}:{self._split}:{i}"

    def label(self, i: int) -> str | None:
        """Class of item i: the data set's class for built-ins, the first sub-folder for a folder, else None."""
        if not self._files:
            classes = getattr(self.ds, "classes", ())
            y = int(self.ds.labels[i])
            return str(classes[y]) if 0 <= y < len(classes) else str(y)
        rel = self.name(i)
        return rel.split("/", 1)[0] if "/" in rel else None

    def image(self, i: int) -> Any:
        """The decoded PIL image, or None when it could not be decoded (skipped, counted)."""
        return self.ds[i]


def _batches(idx: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(idx), size):
        yield idx[start:start + size]


def build_index(bundle_dir: str | Path, source: str, root: Path, *, model_id: str, split: str = "all",
                limit: int | None = None, sample: int = DEFAULT_SAMPLE, seed: int = 0, batch_size: int = 64,
                threads: int | None = None, providers: Sequence[str] | None = None,
                origin: str = "folder") -> dict[str, Any]:
    """Embed up to ``sample`` images of ``source`` and write the index under ``root``; returns its meta."""
    if not 1 <= sample <= MAX_SAMPLE:
        raise ValueError(f"sample: must be between 1 and {MAX_SAMPLE}, got {sample}")
    t0 = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    embedder = OrtEmbedder(bundle, providers, threads)
    src = _Source(source, split, limit, embedder.decode_min_side)
    chosen = sample_indices(len(src), sample, seed)
    vecs: list[np.ndarray] = []
    sims_all: list[np.ndarray] = []
    labels: list[str | None] = []
    names: list[str] = []
    thumbs: list[bytes] = []
    skipped = 0
    for chunk in _batches(chosen, batch_size):
        xs = []
        for i in chunk:
            image = src.image(int(i))
            if image is None:
                skipped += 1
                continue
            xs.append(embedder.preprocess(image))
            thumbs.append(thumbnail(image))
            labels.append(src.label(int(i)))
            names.append(src.name(int(i)))
        if xs:
            emb, sims = embedder.run(np.stack(xs))
            vecs.append(l2_normalize(emb).astype(np.float32))
            sims_all.append(sims.astype(np.float32))
    if not vecs:
        raise ValueError(f"{source!r}: no image could be decoded ({skipped} skipped)")
    vectors = np.concatenate(vecs)
    sims = np.concatenate(sims_all)
    rows = np.arange(len(vectors))
    raw = sims.argmax(1)
    bal = balance_paper(sims, bundle.sizes).argmax(1)
    t_embed = time.perf_counter() - t0
    import faiss

    index = make_faiss(vectors)
    meta: dict[str, Any] = {
        "model_id": model_id, "model_sha256": bundle.sha256, "embed_dim": bundle.embed_dim,
        "num_clusters": bundle.num_clusters, "source": source, "origin": origin, "split": split,
        "available": int(len(src)), "sample_cap": int(sample), "seed": int(seed), "skipped": skipped,
        "library": f"faiss-cpu {faiss.__version__}", "index_type": type(index).__name__,
        "metric": "inner product of L2-normalised embeddings (cosine)", "thumb_size": THUMB_SIZE,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": {"embed": round(t_embed, 3)},
    }
    data = IndexData(vectors=vectors, raw_cluster=raw, raw_similarity=sims[rows, raw], cluster=bal,
                     similarity=sims[rows, bal], labels=labels, sources=names, thumbs=thumbs, meta=meta)
    write_index(root, data, index)
    meta["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    meta["count"] = int(len(vectors))
    write_status(root, "succeeded", count=meta["count"], source=source, seconds=meta["seconds"])
    log.info("index %s: %d images of %s in %.1f s", root, len(vectors), source, meta["seconds"]["total"])
    return meta
