"""``POST /v1/search`` with ``corpus``: the nearest images of an embedded corpus (a corpus job's output) to a
query image, each with the path it was read from.

The index routes (``services/index/routes.py``) hand a search that names a corpus to :func:`search_corpus`, so
the query is parsed, read and embedded exactly as a search of a model's sample index (upload, raw body, a string
naming an image, or ``image_id`` = a corpus row). The query is embedded with the corpus's own model (its manifest's
``model_id``), through the host, so the vectors compare.

Tenancy: a corpus is its job's, and its manifest names the job's owner; with API keys on, only that key finds it
(another key gets the 404 of a corpus that does not exist). Paths are shown as the job routes show server paths
(``services.api.serialize.PathHider``: relative to the data root they lie in) when keys are on.
"""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path
from typing import Any, Callable

import anyio
import numpy as np

from excb.data.decode import ImageDecodeError, load_image
from excb.inference.onnx_runtime import l2_normalize
from services.api.serialize import PathHider, path_hider
from services.common.auth import CURRENT_PRINCIPAL
from services.common.errors import ApiError
from services.corpus.index import EXACT_MAX, CorpusIndex, CorpusIndexCache, CorpusIndexNotFound
from services.corpus.parts import corpus_dir, read_manifest
from services.db.jobs import find_owned
from services.index.build import thumbnail
from services.settings import Settings

CORPUS_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a job id (services.api.schemas.JOB_ID_PATTERN)
THUMB_MAX_BYTES = 32 * 1024 * 1024


def job_resolver(db: Any) -> ResolveId:
    """Map a caller's client job id (or a server id they own) to the server id, through the job store; an id that
    names none of the caller's jobs is left as it is (its manifest still decides, usually a 404)."""

    def resolve(caller: str | None, ref: str) -> str:
        job = find_owned(db, caller, ref) if CORPUS_ID_RE.fullmatch(ref) else None
        return str(job.id) if job is not None else ref

    return resolve


def open_corpus(settings: Settings, auth_enabled: bool, caller: str | None, corpus_id: str,
                field: str = "corpus") -> tuple[Path, dict[str, Any]]:
    """The corpus directory and manifest of ``corpus_id`` if ``caller`` may read it, else the 404 of a corpus
    that does not exist (another key's corpus is not told apart from none)."""
    if not CORPUS_ID_RE.fullmatch(corpus_id):
        raise ApiError(422, "validation_error", "corpus: a job id (1-64 characters of [A-Za-z0-9_.-])", field)
    root = corpus_dir(settings, corpus_id)
    try:
        manifest = read_manifest(root)
    except (OSError, ValueError):
        manifest = None
    if manifest is None or (auth_enabled and manifest.get("owner") != caller):
        raise ApiError(404, "not_found", f"corpus {corpus_id!r} not found (the id of an embedding job of yours)",
                       field)
    return root, manifest


def load_index(cache: CorpusIndexCache, root: Path, corpus_id: str) -> CorpusIndex:
    """The corpus's index (built here when small, see ``CorpusIndexCache.get``); a 409 says how to build a big one."""
    try:
        return cache.get(root, build_up_to=EXACT_MAX)
    except CorpusIndexNotFound as exc:
        raise ApiError(409, "index_not_built",
                       f"corpus {corpus_id!r} has no search index yet ({exc}); build it with POST /v1/corpora/"
                       f"{corpus_id}/index or `excb corpus index {corpus_id}`", "corpus") from exc
    except ValueError as exc:  # no row has an embedding
        raise ApiError(409, "conflict", f"corpus {corpus_id!r}: {exc}", "corpus") from exc


def shown_path(hide: PathHider | None, path: str) -> str:
    return hide.path(path) if hide is not None else path


def thumb_uri(path: str, roots: list[Path]) -> str | None:
    """A ``data:`` JPEG thumbnail of a corpus image read from its file (through excb's safe decoder), or None
    when the file is gone, no longer decodes, or (data roots configured) no longer resolves inside one: the job
    checked its files at submit, a link swapped since must not make this route read elsewhere."""
    try:
        real = Path(path).resolve()
        if roots and not any(real.is_relative_to(Path(r).expanduser().resolve()) for r in roots):
            return None
        image = load_image(real, max_bytes=THUMB_MAX_BYTES)
    except (OSError, ImageDecodeError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(thumbnail(image)).decode("ascii")


def row_dict(idx: CorpusIndex, row: int, hide: PathHider | None, thumbs: bool,
             roots: list[Path] | None = None) -> dict[str, Any]:
    """One corpus row as the API shows it."""
    cols = idx.columns
    path = cols.path(row)
    out: dict[str, Any] = {"row": int(row), "path": shown_path(hide, path), "cluster": int(cols.cluster[row]),
                           "balanced_cluster": int(cols.balanced_cluster[row]),
                           "similarity": round(float(cols.similarity[row]), 6)}
    if thumbs:
        out["thumbnail"] = thumb_uri(path, roots or [])
    return out


# One cache per process: in `excb up` the embed service's search and the control plane's curation routes read the
# same loaded indexes (a 1M x 384-d corpus holds 1.5 GB) instead of one copy each.
PROCESS_CACHE = CorpusIndexCache(max_loaded=2)


# (caller, the id a request names) -> the corpus's job server id; a host with the job store maps a client job_id
ResolveId = Callable[[str | None, str], str]


class CorpusSearch:
    """What ``POST /v1/search`` needs to answer for a corpus: the process's loaded corpus indexes, and (where the
    host has the job store) how a client job id maps to the server id the corpus directory is named by."""

    def __init__(self, cache: CorpusIndexCache | None = None, resolve: ResolveId | None = None) -> None:
        self.cache = cache if cache is not None else PROCESS_CACHE
        self.resolve = resolve

    async def __call__(self, host: Any, req: Any, image: Any) -> dict[str, Any]:
        """Answer ``req`` (the index routes' ``SearchRequest`` with ``corpus`` set) on ``host`` (their
        ``IndexHost``: settings, auth, the caller's models, and embedding one image)."""
        t0 = time.perf_counter()
        principal = CURRENT_PRINCIPAL.get()
        caller = principal.id if principal is not None else None
        corpus_id = self.resolve(caller, req.corpus) if self.resolve is not None else req.corpus
        root, manifest = open_corpus(host.settings, host.auth.enabled, caller, corpus_id)
        model_id = str(manifest.get("model_id") or "")
        idx = await anyio.to_thread.run_sync(load_index, self.cache, root, req.corpus)
        query: dict[str, Any]
        self_row = -1
        if req.image_id is not None:
            self_row = int(req.image_id)
            fid = idx.faiss_id(self_row)
            if fid < 0:
                raise ApiError(404, "not_found", f"corpus {req.corpus!r} has no embedded row {self_row} "
                                                 f"({idx.columns.count} rows, {idx.count} embedded)", "image_id")
            vec = idx.vectors(np.array([fid]))
            query = {"row": self_row, "cluster": int(idx.columns.cluster[self_row]),
                     "balanced_cluster": int(idx.columns.balanced_cluster[self_row])}
        else:
            if host.find_model(model_id) is None:
                raise ApiError(404, "not_found", f"the corpus's model {model_id!r} is not served here; search by "
                                                 "image_id", "model")
            emb, sims = await host.embed_image(model_id, image)
            vec = l2_normalize(emb)
            query = {"cluster": int(np.asarray(sims)[0].argmax())}
        extra = 1 if self_row >= 0 and req.exclude_self else 0
        k = req.k + extra
        scores, rows = await anyio.to_thread.run_sync(idx.search, vec, k)
        hide = path_hider(host.settings, host.auth.enabled)

        def results() -> list[dict[str, Any]]:
            out = []
            for score, row in zip(scores[0], rows[0]):
                if row < 0 or (extra and int(row) == self_row):
                    continue
                out.append({**row_dict(idx, int(row), hide, req.thumbs, list(host.settings.data_roots)),
                            "score": round(float(score), 6)})
            return out[:req.k]

        data = await anyio.to_thread.run_sync(results)
        return {"object": "list", "corpus": req.corpus, "model": model_id, "indexed": idx.count,
                "index_type": idx.meta.get("index_type"), "query": query, "data": data,
                "usage": {"latency_ms": round((time.perf_counter() - t0) * 1000, 3)}}
