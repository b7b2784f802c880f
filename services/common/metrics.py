"""Prometheus helpers: one ``excb_`` namespace, a ``/metrics`` response, request timing middleware."""

from __future__ import annotations

import copy
import os
import time
import weakref
from typing import Any, Callable, Iterator

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

NAMESPACE = "excb"


ModelFilter = Callable[[str], bool]  # which ``model`` label values a scrape may carry


def metrics_response(registry: CollectorRegistry, models: ModelFilter | None = None) -> Response:
    """The text exposition of ``registry`` (summed over processes when several serve one port); ``models``:
    keep only the series whose ``model`` label it accepts (None: all)."""
    return Response(exposition(registry, models), media_type=CONTENT_TYPE_LATEST)


def exposition(registry: CollectorRegistry, models: ModelFilter | None = None) -> bytes:
    """One process: ``registry`` as is. Several (``uvicorn --workers N`` with ``PROMETHEUS_MULTIPROC_DIR``
    set, reliability.md row 31): each scrape reaches one process at random, so counters and histograms come
    from every process's files (totals stay monotonic), and only the scrape-time collectors (gauges read
    from the job store) from this process."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return generate_latest(_ModelScoped(registry, models))
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=path)
    return generate_latest(_ModelScoped(merged, models)) + generate_latest(
        _ModelScoped(_ScrapeTimeOnly(registry), models))


class _ModelScoped:
    """``source``'s metrics without the samples whose ``model`` label the filter refuses: one key's scrape does
    not name another key's models (issue 33 item 5)."""

    def __init__(self, source: Any, models: ModelFilter | None) -> None:
        self.source, self.models = source, models

    def collect(self) -> Iterator[Metric]:
        for metric in self.source.collect():
            if self.models is not None:
                keep = self.models
                metric = copy.copy(metric)
                metric.samples = [s for s in metric.samples if "model" not in s.labels or keep(s.labels["model"])]
            yield metric


class _ScrapeTimeOnly:
    """The collectors of a registry that are not per-process metric objects (those are in the files)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        # prometheus_client has no public way to list a registry's collectors; this attribute has been stable.
        for collector in list(self.registry._collector_to_names):  # noqa: SLF001
            if not isinstance(collector, MetricWrapperBase):
                yield from collector.collect()


_HTTP_METRICS: "weakref.WeakKeyDictionary[CollectorRegistry, tuple[Counter, Histogram]]" = \
    weakref.WeakKeyDictionary()
_COUNTED = "excb.http_counted"  # scope key: an inner (mounted) app already counted this request


def http_metrics(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
    """The request counter and latency histogram of ``registry``, made once: a mounted app that shares its
    parent's registry (`excb up`) uses the same series with its own ``service`` label."""
    if registry not in _HTTP_METRICS:
        _HTTP_METRICS[registry] = (
            Counter(f"{NAMESPACE}_http_requests_total", "HTTP requests", ["service", "method", "route", "status"],
                    registry=registry),
            Histogram(f"{NAMESPACE}_http_request_duration_seconds", "HTTP request latency",
                      ["service", "method", "route"], registry=registry))
    return _HTTP_METRICS[registry]


def install_http_metrics(app: FastAPI, registry: CollectorRegistry, service: str) -> None:
    """Count requests and time them by route template (never by raw path: unbounded label values). A request
    is counted once, by the innermost app that saw it (an app mounted in another labels its own routes)."""
    requests, latency = http_metrics(registry)
    app.add_middleware(HttpMetricsMiddleware, requests=requests, latency=latency, service=service)


class HttpMetricsMiddleware:
    """Plain ASGI, not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs every request through
    an extra task and memory streams, which cost the embed service ~0.1-0.2 ms per request (issue 19)."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram, service: str) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            if not scope.get(_COUNTED):
                scope[_COUNTED] = True
                template = getattr(scope.get("route"), "path", "unmatched")
                method = scope.get("method", "GET")
                self.requests.labels(self.service, method, template, str(status)).inc()
                self.latency.labels(self.service, method, template).observe(time.perf_counter() - start)
