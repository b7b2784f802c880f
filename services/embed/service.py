"""The embed service's state and pipeline, shared by every route mounted on it (``app.py``'s own, the OpenAI ones
in ``openai_compat.py``, the index routes of ``services/index``): settings, models, metrics, auth, URL policy;
limits on a request's images; decode -> micro-batch -> ONNX Runtime -> assignment; and the public calls other
routes make (``find_model``, ``resolve_image``, ``embed_image``, ``infer``)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from typing import Any

import anyio
import numpy as np
import onnxruntime
from fastapi.responses import JSONResponse

from excb import __version__
from excb.inference.onnx_runtime import PROVIDER_ORDER, available_providers, default_intra_op_threads
from services.common.auth import ApiKeyAuth
from services.common.errors import ApiError
from services.embed.batcher import BatcherClosed, QueueFull, QueueTimeout
from services.embed.decode_budget import PixelBudget, return_large_buffers_to_the_os
from services.embed.decoding import ImageDecoder
from services.embed.fetch import FetchError, FetchPolicy, fetch_url
from services.embed.inputs import EmbedOptions
from services.embed.metrics import EmbedMetrics
from services.embed.registry import LoadedModel, ModelNotFound, ModelRegistry
from services.embed.respond import FastJSONResponse
from services.embed.respond import items as response_items
from services.embed.sources import Item, Source, UrlImage, resolve_inputs
from services.settings import Settings

__all__ = ["EmbedService"]


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
            emb, sims = await self.infer(model, x)
            t2 = time.perf_counter()
            body = self.build_body(model, emb, sims, opts, k, t0)  # ~0.05 ms of NumPy: no thread hop
            self.metrics.stage("batch", t2 - t1)
            self.metrics.stage("assign", time.perf_counter() - t2)
        finally:
            lease.__exit__(None, None, None)
        self.metrics.images.labels(model.id).inc(len(items))
        self.metrics.request_seconds.labels(route).observe(time.perf_counter() - t0)
        return body, model.version

    async def infer(self, model: LoadedModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, centroid similarities) of a decoded batch through the model's micro-batcher; a full
        queue, a closed batcher or a failed runtime is a 503."""
        return await self._wait(self._submit(model, x))

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

    # -- what other routes mounted on this service use (services/index/routes.py: IndexHost) ----------------

    def find_model(self, model_id: str | None) -> LoadedModel | None:
        """The caller's model ``model_id`` (``None``/``latest``: the latest), None when it is not loaded."""
        try:
            return self.registry.get(model_id)
        except ModelNotFound:
            return None

    async def resolve_image(self, text: str, field: str) -> Source:
        """One image named by a string, read as every image route reads one (``services.embed.sources``)."""
        items = await resolve_inputs([text], [field], self.settings, self.fetch_policy.enabled)
        return items[0][1]

    async def embed_image(self, model_id: str, image: Source) -> tuple[np.ndarray, np.ndarray]:
        """(embedding [1, D], centroid similarities [1, K]) of one image through this service's decode budget,
        micro-batcher and session; every bad image is the service's 4xx."""
        try:
            lease = self.registry.use(model_id)
            model = lease.__enter__()
        except ModelNotFound as exc:  # unloaded since the caller looked it up
            raise ApiError(404, "not_found", f"model {model_id!r} not found", "model") from exc
        try:
            model.batcher.announce()
            try:
                x = await self.decoder.decode([("image", image)], model, self.fetch_image)
            finally:
                model.batcher.withdraw()
            return await self.infer(model, x)
        finally:
            lease.__exit__(None, None, None)

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
