"""The embedding / cluster-assignment service (FastAPI).

Routes: ``GET /embed?uri=`` (one image named by a string), ``POST /v1/embed`` (multipart uploads, the raw image
body, or JSON ``input`` strings), ``GET /v1/info``,
``GET /v1/models/{id}/balance``, ``/livez``, ``/readyz``, ``/metrics``.

The response follows the OpenAI / Infinity embeddings shape (``object: list``, ``data[{index, embedding}]``,
``model``, ``usage``) so existing clients work, plus per image ``cluster {id, similarity, top_k}``, the
balance-adjusted ``balanced_cluster`` and ``model_version`` (also in the ``X-Model-Version`` header).

Request path: cap the body while it streams -> parse (JSON strings naming images through the one resolver,
``services.embed.sources``: data URIs, base64, paths under a data root, allow-listed URLs; multipart; or the raw
image bytes with ``Content-Type: image/*``) -> lease a model -> decode + preprocess on a pool sized to the cores
(``services.embed.decoding``; every bad image is a 4xx) -> bounded micro-batch queue (503 + Retry-After when
full) -> ONNX Runtime -> assignment (``excb.inference.assign``) + monitor -> orjson response. Each stage's time is in
``excb_embed_stage_seconds{stage}``. Nothing a client sends can produce a 500: decoding, parsing and queueing
errors all map to the one JSON error shape.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, AsyncIterator, Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry

from services.api.serialize import path_hider
from services.common.body import is_raw, read_capped
from services.common.cors import install_cors
from services.common.errors import ApiError, install_error_docs, install_error_handlers
from services.common.metrics import install_http_metrics, metrics_response, register_runtime_collectors
from services.corpus.search import CorpusSearch
from services.embed.inputs import EmbedOptions, parse_json, parse_multipart, parse_raw
from services.embed.metrics import EmbedMetrics
from services.embed.openai_compat import build_openai_router
from services.embed.openapi_docs import install_openapi
from services.embed.registry import ModelNotFound, ModelRegistry
from services.embed.service import EmbedService
from services.embed.sources import resolve_inputs
from services.index.routes import build_index_router
from services.settings import Settings, get_settings


def build_router(svc: EmbedService) -> APIRouter:
    """All embed routes; the control plane may include this router (or mount the whole app)."""
    router = APIRouter()
    e = svc.embed

    async def require_key(request: Request) -> None:
        """Async on purpose: the principal it sets (CURRENT_PRINCIPAL) must reach the route's task, where the
        registry reads it to show each key only its own models (a sync dependency runs in a copied context)."""
        svc.auth.authenticate(request)

    @router.get("/embed", dependencies=[Depends(require_key)], tags=["embed"])
    async def embed_get(uri: str = Query(..., min_length=1, max_length=4096,
                                         description="an image named as POST /v1/embeddings names one: a path "
                                                     "under a data root, an allow-listed http(s) URL, a data URI "
                                                     "or base64"),
                        model: str | None = Query(None, max_length=128),
                        normalize: bool = True, return_clusters: bool = True,
                        top_k: int | None = Query(None, ge=1, le=e.max_top_k),
                        encoding_format: Literal["float", "base64"] = "float") -> Response:
        """Embed one image named by a string (``services.embed.sources``): a path under a data root (relative, or
        absolute inside one), an allow-listed URL, a data URI or base64."""
        opts = EmbedOptions(model=model, normalize=normalize, return_clusters=return_clusters, top_k=top_k,
                            encoding_format=encoding_format)
        items = await resolve_inputs([uri], ["uri"], svc.settings, svc.fetch_policy.enabled)
        return await svc.serve(items, opts, "/embed")

    @router.post("/v1/embed", dependencies=[Depends(require_key)], tags=["embed"])
    async def embed_post(request: Request) -> Response:
        """Embed uploaded images (multipart ``files``), JSON ``{"input": [base64 or data URI, ...]}``, or one
        image as the raw body (``Content-Type: image/png``, ``image/jpeg``, ... or ``application/octet-stream``;
        options as query parameters)."""
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        raw = is_raw(ctype)
        if not raw and ctype not in ("multipart/form-data", "application/json") and not ctype.endswith("+json"):
            raise ApiError(415, "unsupported_media_type",
                           "send multipart/form-data (files), application/json ({\"input\": [...]}) or one image "
                           "as the body (image/*)")
        body = await read_capped(request, e.max_request_bytes)
        t1 = time.perf_counter()
        if raw:
            items, opts = parse_raw(body, request, svc)
        elif ctype == "multipart/form-data":
            items, opts = await parse_multipart(request, svc)
        else:
            items, opts = await parse_json(body, svc)
        svc.metrics.stage("read", t1 - t0)
        svc.metrics.stage("parse", time.perf_counter() - t1)
        response = await svc.serve(items, opts, "/v1/embed")
        svc.metrics.stage("handler", time.perf_counter() - t0)
        return response

    @router.get("/v1/info", dependencies=[Depends(require_key)], tags=["embed"])
    async def info() -> dict[str, Any]:
        """Runtime, providers (requested, available, active per model), threads, batching and models; with API keys
        the models' server paths are shown relative to models/ (or the data roots), as the control plane does."""
        body = svc.info()
        hide = path_hider(svc.settings, svc.auth.enabled)
        if hide is not None:
            body["models"] = hide.deep(body["models"])
        return body

    @router.get("/v1/models/{model_id}/balance", dependencies=[Depends(require_key)], tags=["embed"])
    async def balance(model_id: str, max_points: int = Query(256, ge=2, le=4096)) -> dict[str, Any]:
        """Live balance of served assignments vs the training size estimate."""
        try:
            m = svc.registry.get(model_id)
        except ModelNotFound as exc:
            raise ApiError(404, "not_found", f"model {model_id!r} is not loaded", "model_id") from exc
        return await anyio.to_thread.run_sync(m.monitor.snapshot, m.id, max_points)

    @router.get("/livez", tags=["health"])
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    @router.get("/health", tags=["health"], summary="Liveness, as Hugging Face TEI names it (same as /livez)")
    async def health() -> dict[str, str]:
        return await livez()

    @router.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        ok, problems = svc.registry.readiness()
        if not ok:
            raise ApiError(503, "not_ready", "; ".join(problems))
        return JSONResponse({"status": "ready", "latest": svc.registry.latest_id,
                             "models": [m.version for m in svc.registry.models()]})

    @router.api_route("/metrics", methods=["GET", "HEAD"], tags=["health"])
    async def metrics(request: Request) -> Response:
        """Prometheus; OpenMetrics when the ``Accept`` header asks for it."""
        return metrics_response(svc.metrics.registry, accept=request.headers.get("accept"))

    return router


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None,
               metrics_registry: CollectorRegistry | None = None, cors: bool = True) -> FastAPI:
    """Build the embed app. Without ``registry``, one is made from ``settings`` and ``models_dir`` is scanned
    now (not in a lifespan hook, so the app also works when mounted inside another app). ``metrics_registry``:
    the mounting app's, so one ``/metrics`` shows both (`excb up`); by default the app has its own (with the
    process collectors). ``cors``: False when mounted in an app that answers CORS itself."""
    settings = settings or get_settings()
    metrics = EmbedMetrics(metrics_registry)
    if metrics_registry is None:
        register_runtime_collectors(metrics.registry)
    owns = registry is None
    if registry is None:
        registry = ModelRegistry(settings.embed, settings.resolved_models_dir, batch_hook=metrics.batch_hook,
                                 require_record=settings.auth_configured)
        registry.rescan()
        registry.start_rescan(settings.embed.rescan_seconds)
    elif registry.batch_hook is None:
        registry.set_batch_hook(metrics.batch_hook)
    metrics.attach(registry)
    svc = EmbedService(settings, registry, metrics, owns)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        svc.decoder.close()
        if svc.owns_registry:
            await anyio.to_thread.run_sync(svc.registry.close)

    app = FastAPI(title="excb embed", description="Embeddings and cluster assignments from ExCB ONNX bundles",
                  lifespan=lifespan)
    install_error_handlers(app)
    install_http_metrics(app, metrics.registry, "embed")
    app.state.embed = svc
    app.include_router(build_router(svc))
    app.include_router(build_openai_router(svc))
    app.include_router(build_index_router(svc, CorpusSearch()))  # search (+ corpora) and the cluster gallery
    install_openapi(app)
    install_error_docs(app)
    if cors:
        install_cors(app, settings.cors_origins)
    return app


__all__ = ["create_app", "build_router", "EmbedService"]
