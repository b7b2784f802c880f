"""Search and cluster-gallery routes, served by the embed service (it holds the models and their sessions).

- ``POST /v1/search``: the top-k indexed images nearest to a query (an upload, the raw image as the body, a
  string naming an image as ``services.embed.sources`` reads it, or the id of an indexed image), with scores and
  clusters.
- ``GET /v1/models/{id}/index``: what is indexed (source, sample cap, seed, count, library) and the build state.
- ``GET /v1/models/{id}/clusters``: every cluster's size in the index against uniform, its training and served
  share, and a strip of its most typical images; ordered by size or by drift in served traffic.
- ``GET /v1/models/{id}/clusters/{c}``: one cluster: size, members nearest the centroid and a few from its edge.
- ``GET /v1/models/{id}/index/images/{i}`` and ``.../thumbnail``: one indexed image.

The routes are host-agnostic: :func:`build_index_router` takes an :class:`IndexHost`, which two hosts provide:
the embed service (``services.embed.service.EmbedService``, mounted by ``services/embed/app.py``; it has the
sessions) and the control plane's read-only view when it runs without an embed service
(``services/api/index_view.py``; no session, so a search by an uploaded image is its 503).

Tenancy is the host's (a key sees its own, shared and ownerless models; anything else is a 404, exactly like
a model that does not exist), so an index is visible exactly when its model is. Thumbnails come from the index
(never from the data folder) through these authenticated routes; the JSON routes can inline them as
``data:`` URIs (``thumbs=true``), which is how the dashboard shows them with the API key it already sends.
"""

from __future__ import annotations

import base64
import time
from typing import Any, Awaitable, Callable, Literal, Protocol

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from excb.inference.onnx_runtime import balance_paper, l2_normalize
from services.common.auth import ApiKeyAuth
from services.common.body import is_raw, parse_json_object, read_capped, validate_as
from services.common.errors import ApiError
from services.common.errors import Error as ErrorBody
from services.index.schemas import ClusterDetail, ClusterList, IndexImage, IndexInfo, SearchResponse
from services.index.store import (
    DEFAULT_NAME,
    IndexCache,
    IndexNotFound,
    LoadedIndex,
    index_root,
    read_status,
    valid_name,
)
from services.settings import Settings

MAX_K = 100
MAX_MEMBERS = 200
MAX_PER_CLUSTER = 24
MAX_CLUSTERS_PAGE = 1000
OVERFULL_RELATIVE = 2.0  # a cluster holding >= 2x its uniform share of the index is flagged over-full


class BundleFacts(Protocol):
    """What the routes read from a model's bundle."""

    @property
    def sha256(self) -> str: ...
    @property
    def num_clusters(self) -> int: ...
    @property
    def sizes(self) -> np.ndarray: ...


class ServedCounts(Protocol):
    def counts(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(balanced counts, raw counts, assignments in the window) of served traffic."""
        ...


class IndexedModel(Protocol):
    """A model as the routes see it (the embed service's ``LoadedModel``, the control plane's ``PlaneModel``)."""

    @property
    def id(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def bundle(self) -> BundleFacts: ...
    @property
    def monitor(self) -> ServedCounts: ...


# An image as the host resolved it (uploaded bytes, or what ``resolve_image`` made of a string): only the host reads it.
Image = Any


class IndexHost(Protocol):
    """What a host gives the routes: its settings and auth, the caller's models, images read and embedded its way."""

    @property
    def settings(self) -> Settings: ...
    @property
    def auth(self) -> ApiKeyAuth: ...

    def find_model(self, model_id: str | None) -> IndexedModel | None:
        """The caller's model (``None``/``latest``: the latest); None when there is none (a 404)."""
        ...

    async def resolve_image(self, text: str, field: str) -> Image:
        """An image named by a string, as the host's image routes read one."""
        ...

    async def embed_image(self, model_id: str, image: Image) -> tuple[np.ndarray, np.ndarray]:
        """(embedding [1, D], centroid similarities [1, K]) of one image; the host's 4xx/503 for what it cannot."""
        ...


class SearchRequest(BaseModel):
    """JSON body of ``POST /v1/search``: exactly one of ``image`` and ``image_id``."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=128, description="model id or 'latest' (default)")
    index: str = Field(DEFAULT_NAME, max_length=64, description="which index of the model")
    image: str | None = Field(None, description="the query image, named as every image route names one: a data URI, "
                                                "base64, a path under a data root or an allow-listed http(s) URL")
    image_id: int | None = Field(None, ge=0, description="the query: an image already in the index")
    k: int = Field(10, ge=1, le=MAX_K, description="how many neighbours")
    exclude_self: bool = Field(True, description="with image_id: leave the query image out of the results")
    thumbs: bool = Field(False, description="inline each result's thumbnail as a data: URI")
    corpus: str | None = Field(None, max_length=64, description="search this embedded corpus (the id of your "
                                                                "embedding job) instead of a model's index; "
                                                                "image_id is then a corpus row")

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        if (self.image is None) == (self.image_id is None):
            raise ValueError("give exactly one of image and image_id")
        if self.corpus is not None and (self.model is not None or self.index != DEFAULT_NAME):
            raise ValueError("a corpus search uses the corpus's own model: give corpus without model and index")
        return self


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def item_dict(idx: LoadedIndex, i: int, model_id: str, thumbs: bool) -> dict[str, Any]:
    """One indexed image as the API shows it."""
    out: dict[str, Any] = {
        "id": int(i), "cluster": int(idx.cluster[i]), "similarity": round(float(idx.similarity[i]), 6),
        "raw_cluster": int(idx.raw_cluster[i]), "raw_similarity": round(float(idx.raw_similarity[i]), 6),
        "label": idx.label(i), "source": idx.source(i),
        "thumbnail_url": f"/v1/models/{model_id}/index/images/{int(i)}/thumbnail?index={idx.meta.get('name', '')}",
    }
    if thumbs:
        out["thumbnail"] = _data_uri(idx.thumbnail(i))
    return out


class IndexRoutes:
    """The routes' shared state: the host (models, and for search its images and embeddings) and the loaded indexes."""

    def __init__(self, host: IndexHost) -> None:
        self.host = host
        self.cache = IndexCache(host.settings.resolved_models_dir)

    def model(self, model_id: str | None) -> IndexedModel:
        model = self.host.find_model(model_id)
        if model is None:
            raise ApiError(404, "not_found", f"model {model_id or 'latest'!r} not found", "model")
        return model

    def index(self, model: IndexedModel, name: str) -> LoadedIndex:
        if not valid_name(name):
            raise ApiError(422, "validation_error", "index: 1-64 characters of [A-Za-z0-9._-]", "index")
        try:
            idx = self.cache.get(model.id, name)
        except ImportError as exc:  # an image built without the services extra
            raise ApiError(503, "unavailable",
                           "this service cannot read image indexes: faiss-cpu is not installed "
                           "(pip install 'excb[services]')", "index", {"Retry-After": "60"}) from exc
        except IndexNotFound as exc:
            raise ApiError(404, "index_not_found",
                           f"model {model.id!r} has no index {name!r}; build one with POST /v1/models/{model.id}/"
                           f"index or `excb index build FOLDER --model {model.id}`", "index") from exc
        if idx.meta.get("model_sha256") != model.bundle.sha256:
            raise ApiError(409, "stale_index", f"index {name!r} was built with another version of {model.id}; "
                                               "rebuild it", "index")
        idx.meta.setdefault("name", name)
        return idx

    def image_row(self, idx: LoadedIndex, image_id: int, field: str) -> int:
        if not 0 <= image_id < idx.count:
            raise ApiError(404, "not_found", f"no image {image_id} in this index ({idx.count} images)", field)
        return int(image_id)

    # -- search ------------------------------------------------------------------------------------------

    async def embed_query(self, model: IndexedModel, data: Image) -> tuple[np.ndarray, np.ndarray]:
        """(normalised embedding [1, D], centroid similarities [1, K]) of one image, embedded by the host."""
        emb, sims = await self.host.embed_image(model.id, data)
        return l2_normalize(emb).astype(np.float32), sims

    async def search(self, req: SearchRequest, data: Image | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        model = self.model(req.model)
        idx = await anyio.to_thread.run_sync(self.index, model, req.index)
        query: dict[str, Any]
        if req.image_id is not None:
            row = self.image_row(idx, req.image_id, "image_id")
            vec = idx.vector(row)
            query = {"image_id": row, "cluster": int(idx.cluster[row]), "raw_cluster": int(idx.raw_cluster[row]),
                     "label": idx.label(row)}
        else:
            assert data is not None
            vec, sims = await self.embed_query(model, data)
            raw = int(sims[0].argmax())
            bal = int(balance_paper(sims, model.bundle.sizes)[0].argmax())
            query = {"cluster": bal, "raw_cluster": raw, "similarity": float(sims[0, bal])}
        extra = 1 if req.image_id is not None and req.exclude_self else 0
        scores, ids = await anyio.to_thread.run_sync(idx.search, vec, req.k + extra)
        results = []
        for score, i in zip(scores[0], ids[0]):
            if i < 0 or (extra and int(i) == req.image_id):
                continue
            results.append({**item_dict(idx, int(i), model.id, req.thumbs), "score": round(float(score), 6)})
        return {"object": "list", "model": model.id, "model_version": model.version, "index": req.index,
                "indexed": idx.count, "query": query, "data": results[:req.k],
                "usage": {"latency_ms": round((time.perf_counter() - t0) * 1000, 3)}}

    # -- clusters ----------------------------------------------------------------------------------------

    def cluster_table(self, model: IndexedModel, idx: LoadedIndex, assignment: str) -> dict[str, np.ndarray]:
        """Per cluster: size in the index, its share, the uniform-relative size, training and served share."""
        k = model.bundle.num_clusters
        labels = idx.cluster if assignment == "balanced" else idx.raw_cluster
        size = np.bincount(labels, minlength=k)[:k]
        n = max(1, idx.count)
        balanced, _, filled = model.monitor.counts()
        served = balanced / filled if filled else np.zeros(k)
        training = model.bundle.sizes.astype(np.float64)
        return {"size": size, "share": size / n, "relative": size * k / n, "training": training, "served": served,
                "drift": (served - training) if filled else np.zeros(k), "served_n": np.array(filled)}

    def members(self, idx: LoadedIndex, assignment: str, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows in cluster c, nearest the centroid first (and their similarities)."""
        labels = idx.cluster if assignment == "balanced" else idx.raw_cluster
        sims = idx.similarity if assignment == "balanced" else idx.raw_similarity
        rows = np.flatnonzero(labels == c)
        order = np.argsort(-sims[rows], kind="stable")
        return rows[order], sims[rows[order]]

    def cluster_entry(self, model: IndexedModel, idx: LoadedIndex, table: dict[str, np.ndarray], c: int,
                      assignment: str, typical: int, thumbs: bool) -> dict[str, Any]:
        size = int(table["size"][c])
        status = "empty" if size == 0 else ("over-full" if table["relative"][c] >= OVERFULL_RELATIVE else "ok")
        rows, _ = self.members(idx, assignment, c)
        return {"id": c, "size": size, "share": float(table["share"][c]),
                "relative_size": round(float(table["relative"][c]), 4), "uniform_share": 1.0 / len(table["size"]),
                "training_share": float(table["training"][c]), "served_share": float(table["served"][c]),
                "drift": float(table["drift"][c]), "status": status,
                "typical": [item_dict(idx, int(r), model.id, thumbs) for r in rows[:typical]]}


async def _parse_search(request: Request, host: IndexHost) -> tuple[SearchRequest, Image | None]:
    """JSON (``image`` named as every image route names one, or ``image_id``), multipart (``file`` + the same
    fields) or the raw image as the body (``image/*``, ``application/octet-stream``; the fields as query
    parameters), exactly the bodies ``POST /v1/embed`` takes."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    e = host.settings.embed
    if ctype not in ("multipart/form-data", "application/json") and not is_raw(ctype):
        raise ApiError(415, "unsupported_media_type", "send application/json, multipart/form-data (file) or the "
                                                      "image as the body (image/*)")
    body = await read_capped(request, e.max_image_bytes * 2 + 65536)
    if is_raw(ctype):
        if not body:
            raise ApiError(422, "validation_error", "the body holds no image", "body")
        return validate_as(SearchRequest, {**request.query_params, "image": "upload"}), body
    if ctype == "application/json":
        req = parse_json_object(body, SearchRequest)
        if req.image is None:
            return req, None
        return req, await host.resolve_image(req.image, "image")
    try:
        form = await request.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
    except Exception as exc:  # Starlette raises HTTPException(400) for malformed or oversized forms
        raise ApiError(400, "bad_request", f"malformed multipart body: {getattr(exc, 'detail', exc)}") from exc
    try:
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        files = [v for _, v in form.multi_items() if not isinstance(v, str)]
        if len(files) > 1:
            raise ApiError(413, "too_many_images", "one query image per search", "file")
        data = await files[0].read() if files else None
        if data is not None:
            fields["image"] = "upload"
        req = validate_as(SearchRequest, fields)
    finally:
        await form.close()
    return req, data


def _ok(model: type[BaseModel], description: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation of a 200 built as a dict (``services.index.schemas``), plus the shared error shape."""
    error = {"model": ErrorBody, "description": "error: {error: {type, message, field}}"}
    return {200: {"model": model, "description": description}, 404: error, 422: error}


# ``POST /v1/search`` with ``corpus`` (services/corpus/search.py), handed in by whoever mounts the routes so this
# module stays a leaf: (host, request, query image) -> the response.
CorpusSearcher = Callable[[IndexHost, SearchRequest, Any], Awaitable[dict[str, Any]]]


def build_index_router(host: IndexHost, corpus_search: CorpusSearcher | None = None) -> APIRouter:
    """The routes above, bound to one host (the embed service, or the control plane's read-only view)."""
    router = APIRouter(tags=["search"])
    state = IndexRoutes(host)

    async def require_key(request: Request) -> None:
        host.auth.authenticate(request)  # async: the principal must reach the route's task (see embed app)

    upload = {"type": "object", "properties": {"file": {"type": "string", "format": "binary"},
                                               "model": {"type": "string"}, "index": {"type": "string"},
                                               "k": {"type": "integer", "minimum": 1, "maximum": MAX_K}}}
    binary = {"schema": {"type": "string", "format": "binary"}}
    search_body = {"required": True, "content": {"application/json": {"schema": SearchRequest.model_json_schema()},
                                                 "multipart/form-data": {"schema": upload},
                                                 "image/*": binary, "application/octet-stream": binary}}
    raw_params = [{"name": name, "in": "query", "required": False, "schema": schema,
                   "description": "with a raw image body only (JSON and multipart carry it in the body)"}
                  for name, schema in (("model", {"type": "string"}), ("index", {"type": "string"}),
                                       ("k", {"type": "integer", "minimum": 1, "maximum": MAX_K}),
                                       ("thumbs", {"type": "boolean"}))]

    @router.post("/v1/search", dependencies=[Depends(require_key)], response_model=None,
                 responses=_ok(SearchResponse, "the k nearest indexed images, most similar first"),
                 openapi_extra={"requestBody": search_body, "parameters": raw_params})
    async def search(request: Request) -> dict[str, Any]:
        """Nearest indexed images to a query image (an upload, the raw image as the body, or a string naming one
        as every image route does) or to an indexed image's id."""
        req, data = await _parse_search(request, host)
        if req.corpus is not None:
            if corpus_search is None:
                raise ApiError(404, "not_found", "this service searches no corpora", "corpus")
            return await corpus_search(host, req, data)
        return await state.search(req, data)

    @router.get("/v1/models/{model_id}/index", dependencies=[Depends(require_key)], response_model=None,
                responses=_ok(IndexInfo, "whether the index is ready, its build state and what it holds"))
    async def index_info(model_id: str, index: str = Query(DEFAULT_NAME, max_length=64)) -> dict[str, Any]:
        """What the index holds (source, sample cap and seed, count, library) and its last build's state."""
        model = state.model(model_id)
        if not valid_name(index):
            raise ApiError(422, "validation_error", "index: 1-64 characters of [A-Za-z0-9._-]", "index")
        status = read_status(index_root(state.cache.models_dir, model.id, index))
        if status is not None and host.auth.enabled:  # server paths stay hidden with API keys (as job responses)
            status.pop("source", None)
        try:
            idx = await anyio.to_thread.run_sync(state.index, model, index)
        except ApiError as exc:
            if exc.status != 404 or status is None:
                raise
            return {"model": model.id, "index": index, "ready": False, "status": status}
        return {"model": model.id, "index": index, "ready": True, "status": status,
                "meta": {k: v for k, v in idx.meta.items() if k not in ("source",) or not host.auth.enabled}}

    @router.get("/v1/models/{model_id}/clusters", dependencies=[Depends(require_key)], response_model=None,
                responses=_ok(ClusterList, "a page of clusters"))
    async def clusters(model_id: str, index: str = Query(DEFAULT_NAME, max_length=64),
                       order: Literal["size", "drift", "id"] = "size",
                       assignment: Literal["balanced", "raw"] = "balanced",
                       typical: int = Query(6, ge=0, le=MAX_PER_CLUSTER),
                       offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=MAX_CLUSTERS_PAGE),
                       thumbs: bool = False) -> dict[str, Any]:
        """Every cluster (a page of them), largest first or furthest from training in served traffic first."""
        model = state.model(model_id)
        idx = await anyio.to_thread.run_sync(state.index, model, index)

        def build() -> dict[str, Any]:
            table = state.cluster_table(model, idx, assignment)
            if order == "size":
                ids = np.lexsort((np.arange(len(table["size"])), -table["size"]))
            elif order == "drift":
                ids = np.lexsort((np.arange(len(table["size"])), -np.abs(table["drift"])))
            else:
                ids = np.arange(len(table["size"]))
            page = ids[offset:offset + limit]
            return {"object": "list", "model": model.id, "index": index, "assignment": assignment, "order": order,
                    "num_clusters": model.bundle.num_clusters, "indexed": idx.count,
                    "served_assignments": int(table["served_n"]),
                    "empty": int((table["size"] == 0).sum()),
                    "over_full": int((table["relative"] >= OVERFULL_RELATIVE).sum()),
                    "offset": offset, "limit": limit,
                    "data": [state.cluster_entry(model, idx, table, int(c), assignment, typical, thumbs)
                             for c in page]}

        return await anyio.to_thread.run_sync(build)

    @router.get("/v1/models/{model_id}/clusters/{cluster}", dependencies=[Depends(require_key)], response_model=None,
                responses=_ok(ClusterDetail, "one cluster with its nearest and edge members"))
    async def cluster(model_id: str, cluster: int, index: str = Query(DEFAULT_NAME, max_length=64),
                      assignment: Literal["balanced", "raw"] = "balanced",
                      nearest: int = Query(24, ge=0, le=MAX_MEMBERS), edge: int = Query(6, ge=0, le=MAX_MEMBERS),
                      thumbs: bool = False) -> dict[str, Any]:
        """One cluster: its size against uniform, the members nearest its centroid and a few from its edge."""
        model = state.model(model_id)
        if not 0 <= cluster < model.bundle.num_clusters:
            raise ApiError(404, "not_found", f"model {model.id} has clusters 0..{model.bundle.num_clusters - 1}",
                           "cluster")
        idx = await anyio.to_thread.run_sync(state.index, model, index)

        def build() -> dict[str, Any]:
            table = state.cluster_table(model, idx, assignment)
            entry = state.cluster_entry(model, idx, table, cluster, assignment, 0, False)
            rows, _ = state.members(idx, assignment, cluster)
            near = rows[:nearest]
            far = rows[max(len(near), len(rows) - edge):][::-1] if edge else rows[:0]
            entry.pop("typical")
            return {**entry, "model": model.id, "index": index, "assignment": assignment, "indexed": idx.count,
                    "nearest": [item_dict(idx, int(r), model.id, thumbs) for r in near],
                    "edge": [item_dict(idx, int(r), model.id, thumbs) for r in far]}

        return await anyio.to_thread.run_sync(build)

    @router.get("/v1/models/{model_id}/index/images/{image_id}", dependencies=[Depends(require_key)],
                response_model=None, responses=_ok(IndexImage, "one indexed image"))
    async def image(model_id: str, image_id: int, index: str = Query(DEFAULT_NAME, max_length=64),
                    thumbs: bool = False) -> dict[str, Any]:
        model = state.model(model_id)
        idx = await anyio.to_thread.run_sync(state.index, model, index)
        return {**item_dict(idx, state.image_row(idx, image_id, "image_id"), model.id, thumbs),
                "model": model.id, "index": index}

    @router.get("/v1/models/{model_id}/index/images/{image_id}/thumbnail", dependencies=[Depends(require_key)],
                response_class=Response,
                responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                                 "description": "the stored JPEG thumbnail"}})
    async def thumbnail(model_id: str, image_id: int, index: str = Query(DEFAULT_NAME, max_length=64)) -> Response:
        """The stored JPEG thumbnail (from the index, never from the data folder)."""
        model = state.model(model_id)
        idx = await anyio.to_thread.run_sync(state.index, model, index)
        jpeg = idx.thumbnail(state.image_row(idx, image_id, "image_id"))
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"})

    return router
