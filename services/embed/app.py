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
full) -> ONNX Runtime -> assignment (``excb.assign``) + monitor -> orjson response. Each stage's time is in
``excb_embed_stage_seconds{stage}``. Nothing a client sends can produce a 500: decoding, parsing and queueing
errors all map to the one JSON error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import Future
from typing import Any, AsyncIterator, Literal

import anyio
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry

from excb.onnx_runtime import PROVIDER_ORDER, available_providers, default_intra_op_threads
from services.common.auth import ApiKeyAuth
from services.common.cors import install_cors
from services.common.errors import ApiError, install_error_docs, install_error_handlers
from services.common.metrics import install_http_metrics, metrics_response, register_runtime_collectors
from services.embed.batcher import BatcherClosed, QueueFull, QueueTimeout
from services.embed.decode_budget import PixelBudget, return_large_buffers_to_the_os
from services.embed.decoding import ImageDecoder
from services.embed.fetch import FetchError, FetchPolicy, fetch_url
from services.embed.inputs import EmbedOptions, is_raw, parse_json, parse_multipart, parse_raw, read_capped
from services.embed.metrics import EmbedMetrics
from services.embed.registry import LoadedModel, ModelNotFound, ModelRegistry
from services.embed.respond import FastJSONResponse
from services.embed.respond import items as response_items
from services.embed.sources import Item, UrlImage, resolve_inputs
from services.settings import Settings, get_settings


class EmbedService:
    """State shared by the routes: settings, models, metrics, auth, URL policy."""

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: EmbedMetrics, owns_registry: bool):
        self.settings = settings
        self.embed = settings.embed
        self.registry = registry
        self.metrics = metrics
        self.owns_registry = owns_registry
        # `excb up`: the control plane's ModelSync (stale(), sync_if_changed()); checked before each lease so
        # a model activated a moment ago answers even before the file-system notification arrives
        self.model_source: Any = None
        self.auth = ApiKeyAuth.from_settings(settings)
        e = settings.embed
        self.fetch_policy = FetchPolicy.build(e.url_allowed_hosts, e.url_allowed_networks, e.max_image_bytes,
                                              e.url_timeout_seconds, e.url_max_redirects)
        self._fetch_limiter: anyio.CapacityLimiter | None = None  # made on first use, inside the event loop
        self._fetches = 0  # in flight; checked and bumped with no await between, so admission is exact
        self.pixel_budget = PixelBudget(max(e.decode_pixel_budget, e.max_pixels), e.decode_wait_seconds)
        self.decoder = ImageDecoder(e, metrics, self.pixel_budget)
        return_large_buffers_to_the_os()  # else freed decode buffers stay in per-thread arenas (see there)

    # -- inputs ------------------------------------------------------------------------------------------

    def check_top_k(self, opts: EmbedOptions) -> int:
        k = opts.top_k if opts.top_k is not None else self.embed.default_top_k
        if k > self.embed.max_top_k:
            raise ApiError(422, "validation_error", f"top_k: at most {self.embed.max_top_k}", "top_k")
        return k

    def check_count(self, n: int, field: str) -> None:
        if n == 0:
            raise ApiError(422, "validation_error", "no images in the request", field)
        if n > self.embed.max_images_per_request:
            self.metrics.rejected.labels("too_many_images").inc()
            raise ApiError(413, "too_many_images",
                           f"{n} images in one request; the limit is {self.embed.max_images_per_request}", field)

    def decode_all(self, items: list[Item], model: LoadedModel) -> np.ndarray:
        """Decode + preprocess every image in the calling thread (see ``services.embed.decoding``)."""
        return self.decoder.decode_all(items, model)

    def info(self) -> dict[str, Any]:
        """The embed half of ``/v1/info`` (also embedded in the control plane's in `excb up`); models are the
        caller's (CURRENT_PRINCIPAL)."""
        import onnxruntime

        from excb import __version__

        e = self.embed

        return {
            "service": "excb-embed",
            "versions": {"excb": __version__, "onnxruntime": onnxruntime.__version__},
            "providers": {"order": list(PROVIDER_ORDER), "available": available_providers(),
                          "requested": e.providers or "auto"},
            "threads": {"intra_op": e.intra_op_threads or default_intra_op_threads(),
                        "inter_op": e.inter_op_threads, "cores": default_intra_op_threads()},
            "batching": {"enabled": e.batching, "max_batch": e.max_batch, "max_delay_ms": e.max_delay_ms,
                         "budget_ms": e.batch_budget_ms, "queue_size": e.queue_size},
            "decode_workers": self.decoder.workers,
            "limits": {"max_images_per_request": e.max_images_per_request, "max_image_bytes": e.max_image_bytes,
                       "max_request_bytes": e.max_request_bytes, "max_pixels": e.max_pixels,
                       "allowed_formats": e.allowed_formats, "max_top_k": e.max_top_k},
            "url_input": self.fetch_policy.enabled,
            "latest": self.registry.latest_id,
            "models": [m.info() for m in self.registry.models()],
            "errors": dict(self.registry.errors) if not self.auth.enabled else {},  # names other keys' models
        }

    # -- the pipeline ------------------------------------------------------------------------------------

    async def serve(self, items: list[Item], opts: EmbedOptions, route: str) -> JSONResponse:
        body, version = await self.run(items, opts, route)
        return self.respond(body, version)

    def respond(self, body: dict[str, Any], version: str) -> JSONResponse:
        """orjson-encoded (NumPy arrays inside ``body`` are written directly); the ``encode`` stage."""
        t0 = time.perf_counter()
        response = FastJSONResponse(body, headers={"X-Model-Version": version})
        self.metrics.stage("encode", time.perf_counter() - t0)
        return response

    async def run(self, items: list[Item], opts: EmbedOptions, route: str) -> tuple[dict[str, Any], str]:
        """The pipeline without the HTTP envelope: (body, model version); POST /v1/embeddings reshapes it."""
        t0 = time.perf_counter()
        k = self.check_top_k(opts)
        if self.model_source is not None and self.model_source.stale():
            await anyio.to_thread.run_sync(self.model_source.sync_if_changed)
        try:
            lease = self.registry.use(opts.model)
            model = lease.__enter__()
        except ModelNotFound as exc:
            if opts.model in (None, "", "latest"):
                raise ApiError(503, "no_model", "no model is loaded yet", "model",
                               {"Retry-After": str(self.embed.retry_after_seconds)}) from exc
            raise ApiError(404, "not_found", f"model {opts.model!r} is not loaded", "model") from exc
        try:
            # a request that fetches URLs is seconds away from the queue: no batch should hold open for it
            announce = not any(isinstance(src, UrlImage) for _, src in items)
            if announce:
                model.batcher.announce()
            try:
                x = await self.decoder.decode(items, model, self.fetch_image)
            finally:
                if announce:
                    model.batcher.withdraw()  # before submitting: a batch must not wait for its own request
            t1 = time.perf_counter()
            emb, sims = await self._wait(self._submit(model, x))
            t2 = time.perf_counter()
            body = self.build_body(model, emb, sims, opts, k, t0)  # ~0.05 ms of NumPy: no thread hop
            self.metrics.stage("batch", t2 - t1)
            self.metrics.stage("assign", time.perf_counter() - t2)
        finally:
            lease.__exit__(None, None, None)
        self.metrics.images.labels(model.id).inc(len(items))
        self.metrics.request_seconds.labels(route).observe(time.perf_counter() - t0)
        return body, model.version

    def _submit(self, model: LoadedModel, x: np.ndarray) -> "Future[tuple[np.ndarray, np.ndarray]]":
        try:
            return model.batcher.submit(x)
        except QueueFull as exc:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(503, "overloaded", str(exc), None, {"Retry-After": str(exc.retry_after)}) from exc
        except BatcherClosed as exc:
            raise ApiError(503, "unavailable", str(exc), None, self._retry()) from exc

    def _retry(self) -> dict[str, str]:
        return {"Retry-After": str(self.embed.retry_after_seconds)}

    async def _wait(self, fut: "Future[tuple[np.ndarray, np.ndarray]]") -> tuple[np.ndarray, np.ndarray]:
        try:
            return await asyncio.wrap_future(fut)
        except QueueTimeout as exc:
            self.metrics.rejected.labels("queue_timeout").inc()
            raise ApiError(503, "overloaded", str(exc), None, self._retry()) from exc
        except BatcherClosed as exc:
            raise ApiError(503, "unavailable", str(exc), None, self._retry()) from exc
        except Exception as exc:  # the runtime failed on this batch; the service itself stays up
            self.metrics.rejected.labels("inference_failed").inc()
            raise ApiError(503, "inference_failed", f"inference failed: {exc}", None, self._retry()) from exc

    def build_body(self, model: LoadedModel, emb: np.ndarray, sims: np.ndarray, opts: EmbedOptions, k: int,
                   t0: float) -> dict[str, Any]:
        """The native response (NumPy arrays inside: encode with :class:`FastJSONResponse`)."""
        a = model.assigner(emb, sims, top_k=k if opts.return_clusters else 0, normalize=opts.normalize)
        model.monitor.record(a.balanced_cluster, a.cluster)
        return {
            "object": "list",
            "model": model.id,
            "model_version": model.version,
            "data": response_items(a, opts.encoding_format, opts.return_clusters),
            "usage": {"images": len(a), "prompt_tokens": 0, "total_tokens": 0,
                      "latency_ms": round((time.perf_counter() - t0) * 1000, 3)},
        }

    # -- sources -----------------------------------------------------------------------------------------

    async def fetch_image(self, src: UrlImage, field: str) -> bytes:
        """Fetch a URL on threads of its own: at most ``url_max_concurrent`` at once, none taken from the
        pool every other sync route runs on, so slow remote servers cannot starve them; beyond it 503."""
        cap = self.embed.url_max_concurrent
        if self._fetch_limiter is None:
            self._fetch_limiter = anyio.CapacityLimiter(cap)
        if self._fetches >= cap:
            self.metrics.rejected.labels("fetch_busy").inc()
            raise ApiError(503, "overloaded", f"{cap} URL fetches already in flight", field, self._retry())
        self._fetches += 1
        try:
            return await anyio.to_thread.run_sync(self.read_url, src, field, limiter=self._fetch_limiter)
        finally:
            self._fetches -= 1

    def read_url(self, src: UrlImage, field: str) -> bytes:
        """One fetch within its request's deadline and remaining byte allowance (``src.loads``)."""
        loads = src.loads
        try:
            data = fetch_url(src.url, self.fetch_policy, deadline=loads.deadline, max_bytes=loads.left)
        except FetchError as exc:
            self.metrics.rejected.labels(exc.code).inc()
            if exc.code == "too_large" and loads.left < self.fetch_policy.max_bytes:
                loads.take(loads.left + 1, field)  # the request's allowance ran out: say so (413)
            raise ApiError(exc.status, exc.code, exc.message, field) from exc
        loads.take(len(data), field)
        return data


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
        """Runtime, providers (requested, available, active per model), threads, batching and models."""
        return svc.info()

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
    from services.embed.openai_compat import build_openai_router  # imports this module: kept local
    from services.embed.openapi_docs import install_openapi

    app.include_router(build_openai_router(svc))
    _include_index_routes(app, svc)
    install_openapi(app)
    install_error_docs(app)
    if cors:
        install_cors(app, settings.cors_origins)
    return app


def _include_index_routes(app: FastAPI, svc: EmbedService) -> None:
    """Search and the cluster gallery (services/index), when faiss is installed."""
    try:
        from services.index.routes import build_index_router
    except ImportError:
        return
    app.include_router(build_index_router(svc))


__all__ = ["create_app", "build_router", "EmbedService"]
