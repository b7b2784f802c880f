"""Embed one chunk: decode, preprocess and run a batch at a time through the model's verified ONNX bundle, with
the embed service's decoder and assignment (``excb.data.decode``, ``excb.inference``), so a corpus row and the same
image sent to ``POST /v1/embed`` carry the same vector and clusters.

Memory is bounded by the chunk, not the corpus: one batch of decoded images at a time, and the chunk's result
columns (``chunk_size`` x ``embed_dim`` floats) until its part is written. Nothing is kept between chunks except
the ONNX session of the last model used (loading it per chunk would cost more than small chunks take).
"""

from __future__ import annotations

import os
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from excb.data.decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, load_image
from excb.inference.assign import Assigner
from excb.inference.onnx_runtime import OrtEmbedder, load_bundle
from services.corpus.parts import part_table
from services.corpus.plan import Item

DEFAULT_BATCH_SIZE = 64
THREADS_ENV = "EXCB_CORPUS_THREADS"  # ORT intra-op threads per worker (default: the cores the process may use)


class Stopped(Exception):
    """The chunk was abandoned half-way (job cancelled, lease lost, worker shutting down); nothing was written."""


class ChunkEmbedder:
    """A model's session, eval transform and balanced assignment."""

    def __init__(self, bundle_dir: str, threads: int | None = None) -> None:
        self.bundle = load_bundle(bundle_dir)
        self.embedder = OrtEmbedder(self.bundle, None, threads)
        self.assign = Assigner(self.bundle.sizes)

    @property
    def embed_dim(self) -> int:
        return self.bundle.embed_dim

    def _image(self, item: Item) -> Any:
        """The item decoded to RGB; raises ImageDecodeError when it cannot be used."""
        side = self.embedder.decode_min_side
        if item.file is not None:
            return load_image(item.file, max_bytes=DEFAULT_MAX_BYTES, max_pixels=DEFAULT_MAX_PIXELS, min_side=side)
        if item.data is not None:
            return decode_image(item.data, max_bytes=DEFAULT_MAX_BYTES, max_pixels=DEFAULT_MAX_PIXELS, min_side=side)
        if item.image is None:
            raise ImageDecodeError("unreadable", "the data set returned no image")
        return item.image.convert("RGB")

    def embed(self, items: Iterable[Item], batch_size: int = DEFAULT_BATCH_SIZE,
              between: Callable[[int], bool] | None = None) -> tuple[Any, int, int]:
        """``(part table, items, errors)`` for ``items``. ``between(done)`` is called after every batch; True
        abandons the chunk (:class:`Stopped`)."""
        size, d = self.bundle.input_size, self.embed_dim
        paths: list[str] = []
        errors: list[str | None] = []
        cols: dict[str, list[np.ndarray]] = {"emb": [], "raw": [], "bal": [], "sim": []}
        for batch in _batches(items, batch_size):
            x = np.empty((len(batch), 3, size, size), np.float32)
            good = np.zeros(len(batch), bool)
            for j, item in enumerate(batch):
                paths.append(item.path)
                try:
                    self.embedder.preprocess(self._image(item), out=x[j])
                    good[j] = True
                    errors.append(None)
                except ImageDecodeError as exc:
                    errors.append(f"{exc.code}: {exc.message}")
                except (OSError, ValueError) as exc:  # a decoder edge the defensive decoder did not name
                    errors.append(f"undecodable: {type(exc).__name__}: {exc}")
            emb = np.zeros((len(batch), d), np.float32)
            raw = np.zeros(len(batch), np.int32)
            bal = np.zeros(len(batch), np.int32)
            sim = np.zeros(len(batch), np.float32)
            if good.any():
                a = self.assign(*self.embedder.run(x[good]))
                emb[good], raw[good], bal[good], sim[good] = (a.embeddings, a.cluster, a.balanced_cluster,
                                                              a.balanced_similarity)
            for key, arr in zip(("emb", "raw", "bal", "sim"), (emb, raw, bal, sim)):
                cols[key].append(arr)
            del x, batch  # the decoded pixels of this batch go now, not at the end of the chunk
            if between is not None and between(len(paths)):
                raise Stopped()
        n_err = sum(e is not None for e in errors)

        def cat(key: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
            return np.concatenate(cols[key]) if cols[key] else np.zeros(shape, dtype)

        table = part_table(d, paths, cat("emb", np.float32, (0, d)), cat("raw", np.int32, (0,)),
                           cat("bal", np.int32, (0,)), cat("sim", np.float32, (0,)), errors)
        return table, len(paths), n_err


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def threads_from_env() -> int | None:
    value = os.environ.get(THREADS_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


@lru_cache(maxsize=1)
def cached_embedder(bundle_dir: str, sha256: str) -> ChunkEmbedder:
    """The worker process's session for the model it embedded last (keyed by the bundle's hash too, so a
    re-exported bundle at the same path is loaded again)."""
    return ChunkEmbedder(bundle_dir, threads_from_env())


def embedder_for(bundle_dir: str | Path) -> ChunkEmbedder:
    import json

    meta = json.loads((Path(bundle_dir) / "model.json").read_text())
    return cached_embedder(str(bundle_dir), str(meta.get("sha256", "")))
