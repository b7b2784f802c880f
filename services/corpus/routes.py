"""Corpus search index and curation on the control plane (issue 30 items 2-3):

- ``GET  /v1/corpora/{id}/index``: whether the search index is built, and what it is (type, count, build time).
- ``POST /v1/corpora/{id}/index``: build (or rebuild) it now; ``POST /v1/search`` with ``corpus`` reads it.
- ``POST /v1/corpora/{id}/dedup``: near-duplicate groups (cosine >= threshold), a count and a sample per group.
- ``POST /v1/corpora/{id}/subset``: N images even across the balanced clusters (typical or diverse within each),
  written as a ``list:`` file in the corpus (``subsets/NAME.txt``) and answered with its per-cluster counts.
- ``GET  /v1/corpora/{id}/subsets/{name}``: that ``list:`` file, to train on or hand to a labelling tool.

``{id}`` is the corpus's embedding job id; a corpus is its owner's alone (another key gets the 404 of a corpus
that does not exist). The work runs in the request's thread pool: at 1M images an index build took 75 s and a
dedup pass 38 s on two loaded cores (benchmarks/RESULTS.md, "Corpus search and curation"); small corpora take
seconds.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from services.api.guard import AuthFirstRoute
from services.api.serialize import path_hider
from services.api.state import Caller, Plane
from services.common.errors import ApiError
from services.corpus.curate import (
    DEFAULT_NEIGHBOURS,
    DEFAULT_THRESHOLD,
    MAX_SAMPLE,
    balanced_subset,
    dedup_report,
    write_list,
)
from services.corpus.index import CorpusIndexNotFound, build_corpus_index, current_version, index_root
from services.corpus.search import CorpusSearch, job_resolver, load_index, open_corpus, row_dict, thumb_uri

router = APIRouter(tags=["corpora"], route_class=AuthFirstRoute)
SEARCH = CorpusSearch()  # the process's loaded corpus indexes, shared with POST /v1/search (search.PROCESS_CACHE)
SUBSETS_DIR = "subsets"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_SUBSET = 1_000_000
_building: set[Path] = set()
_building_lock = threading.Lock()


class DedupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(DEFAULT_THRESHOLD, ge=0.5, le=1.0, description="cosine at or above which two images "
                                                                            "are near-duplicates")
    neighbours: int = Field(DEFAULT_NEIGHBOURS, ge=1, le=128, description="neighbours looked at per image")
    sample: int = Field(5, ge=1, le=MAX_SAMPLE, description="paths shown per group")
    limit: int = Field(100, ge=0, le=10_000, description="groups shown (largest first)")
    thumbs: bool = Field(False, description="inline each sample's thumbnail as a data: URI")


class SubsetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(..., ge=1, le=MAX_SUBSET, description="images in the subset")
    strategy: Literal["typical", "diverse"] = Field("diverse", description="within each cluster: farthest-point "
                                                    "sampling (spread; the default: on a labelled set it evened the "
                                                    "classes best) or the images nearest its mean")
    name: str = Field("subset", pattern=NAME_PATTERN, description="the list file's name (subsets/NAME.txt)")
    preview: int = Field(24, ge=0, le=1000, description="subset images shown in the answer")
    thumbs: bool = Field(False, description="inline each preview image's thumbnail as a data: URI")


def _corpus(cp: Any, who: Any, corpus_id: str) -> tuple[Path, dict[str, Any]]:
    """The caller's corpus by the id they know its job by (client ``job_id`` or server id)."""
    server_id = job_resolver(cp.db)(who.id, corpus_id)
    return open_corpus(cp.settings, cp.auth.enabled, who.id, server_id, field="corpus_id")


def _index_info(root: Path) -> dict[str, Any] | None:
    version = current_version(root)
    if version is None:
        return None
    try:
        return dict(json.loads((index_root(root) / version / "meta.json").read_text()))
    except (OSError, ValueError):
        return None


@router.get("/corpora/{corpus_id}/index", summary="The corpus's search index: built or not, and what it is")
def index_info(corpus_id: str, cp: Plane, who: Caller) -> dict[str, Any]:
    root, manifest = _corpus(cp, who, corpus_id)
    meta = _index_info(root)
    with _building_lock:
        building = root in _building
    return {"corpus": corpus_id, "server_id": root.parent.name, "ready": meta is not None, "building": building,
            "corpus_status": manifest.get("status"), "meta": {k: v for k, v in (meta or {}).items() if k != "parts"}}


@router.post("/corpora/{corpus_id}/index", summary="Build (or rebuild) the corpus's search index now")
def build_index(corpus_id: str, cp: Plane, who: Caller) -> dict[str, Any]:
    root, _ = _corpus(cp, who, corpus_id)
    with _building_lock:
        if root in _building:
            raise ApiError(409, "conflict", f"the index of corpus {corpus_id!r} is already being built")
        _building.add(root)
    try:
        meta = build_corpus_index(root)
    except CorpusIndexNotFound as exc:
        raise ApiError(409, "conflict", f"corpus {corpus_id!r} has no committed parts yet") from exc
    except ValueError as exc:
        raise ApiError(409, "conflict", f"corpus {corpus_id!r}: {exc}") from exc
    finally:
        with _building_lock:
            _building.discard(root)
    return {"corpus": corpus_id, "ready": True, "meta": {k: v for k, v in meta.items() if k != "parts"}}


@router.post("/corpora/{corpus_id}/dedup", summary="Near-duplicate groups of the corpus")
def dedup(corpus_id: str, body: DedupRequest, cp: Plane, who: Caller) -> dict[str, Any]:
    root, _ = _corpus(cp, who, corpus_id)
    idx = load_index(SEARCH.cache, root, corpus_id)
    report = dedup_report(idx, body.threshold, body.neighbours, body.sample, body.limit)
    hide = path_hider(cp.settings, cp.auth.enabled)
    for group in report["data"]:
        group["keep"] = hide.path(group["keep"]) if hide is not None else group["keep"]
        for item in group["sample"]:
            path = item["path"]
            item["path"] = hide.path(path) if hide is not None else path
            if body.thumbs:
                item["thumbnail"] = thumb_uri(path, list(cp.settings.data_roots))
    return {"corpus": corpus_id, **report}


@router.post("/corpora/{corpus_id}/subset", summary="A balanced subset of the corpus, written as a list: file")
def subset(corpus_id: str, body: SubsetRequest, cp: Plane, who: Caller) -> dict[str, Any]:
    root, manifest = _corpus(cp, who, corpus_id)
    idx = load_index(SEARCH.cache, root, corpus_id)
    sub = balanced_subset(idx, body.n, body.strategy)
    listing = root / SUBSETS_DIR / f"{body.name}.txt"
    header = {"excb subset of corpus": corpus_id, "model": manifest.get("model_id"), "strategy": body.strategy,
              "requested": body.n, "images": sub["count"], "clusters": len(sub["clusters"])}
    write_list(idx, sub["rows"], listing, header)
    hide = path_hider(cp.settings, cp.auth.enabled)
    shown = hide.path(str(listing)) if hide is not None else str(listing)
    taken = [c["taken"] for c in sub["clusters"] if c["taken"]]
    return {"corpus": corpus_id, "name": body.name, "strategy": body.strategy, "requested": body.n,
            "count": sub["count"], "source": f"list:{shown}", "download_url": f"/v1/corpora/{corpus_id}/subsets/"
                                                                               f"{body.name}",
            "clusters_total": len(sub["clusters"]), "clusters_used": len(taken),
            "per_cluster_min": min(taken, default=0), "per_cluster_max": max(taken, default=0),
            "clusters": sub["clusters"],
            "preview": [row_dict(idx, int(r), hide, body.thumbs, list(cp.settings.data_roots))
                        for r in sub["rows"][:body.preview]]}


@router.get("/corpora/{corpus_id}/subsets/{name}", response_class=PlainTextResponse,
            summary="A subset's list: file (one path per line)")
def subset_file(corpus_id: str, name: str, cp: Plane, who: Caller) -> PlainTextResponse:
    root, _ = _corpus(cp, who, corpus_id)
    if not re.fullmatch(NAME_PATTERN, name):
        raise ApiError(422, "validation_error", "name: 1-64 characters of [A-Za-z0-9._-]", "name")
    try:
        text = (root / SUBSETS_DIR / f"{name}.txt").read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ApiError(404, "not_found", f"corpus {corpus_id!r} has no subset {name!r}", "name") from exc
    hide = path_hider(cp.settings, cp.auth.enabled)
    if hide is not None:  # with keys, server paths as the API shows them (relative to their data root)
        text = "".join(line if line.startswith("#") else hide.path(line.rstrip("\n")) + "\n"
                       for line in text.splitlines(keepends=True))
    return PlainTextResponse(text, headers={"Content-Disposition": f'attachment; filename="{name}.txt"'})
