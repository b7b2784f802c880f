"""Prometheus helpers: one ``excb_`` namespace, a ``/metrics`` response, request timing middleware."""

from __future__ import annotations

import copy
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from fastapi import FastAPI, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, multiprocess
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

NAMESPACE = "excb"

# No ``*_created`` series beside every counter and histogram: they double the series count and Prometheus
# itself ignores them (issue 32). Process-wide, as prometheus_client offers it.
disable_created_metrics()

LabelFilter = Callable[[str], bool]  # which values of one label a scrape may carry
ModelFilter = LabelFilter  # the ``model`` label's (kept: the name the callers know)


@dataclass(frozen=True)
class ScrapeScope:
    """What one scrape may see (issue 33 item 5): ``models`` filters the ``model`` label, ``jobs`` the ``job``
    label; None lets every value through."""

    models: LabelFilter | None = None
    jobs: LabelFilter | None = None

    def keeps(self, labels: dict[str, str]) -> bool:
        if self.models is not None and "model" in labels and not self.models(labels["model"]):
            return False
        return not (self.jobs is not None and "job" in labels and not self.jobs(labels["job"]))


def register_runtime_collectors(registry: CollectorRegistry) -> None:
    """The standard ``process_*``, ``python_info`` and ``python_gc_*`` series on an app's own registry, as
    every Prometheus Python exporter has them (the default registry, which holds them, is not ours)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


def metrics_response(registry: CollectorRegistry, scope: ScrapeScope | ModelFilter | None = None,
                     accept: str | None = None) -> Response:
    """The exposition of ``registry`` (summed over processes when several serve one port) in the format the
    ``Accept`` header asks for: OpenMetrics when it names ``application/openmetrics-text``, else the text
    format 0.0.4 (prometheus_client's own negotiation). ``scope``: keep only the series it allows (None:
    all; a bare filter is the ``model`` label's)."""
    if scope is not None and not isinstance(scope, ScrapeScope):
        scope = ScrapeScope(models=scope)
    encoder, content_type = choose_encoder(accept or "")
    return Response(encoder(_source(registry, scope)), media_type=content_type)


def _source(registry: CollectorRegistry, scope: ScrapeScope | None) -> "_Scoped":
    """One process: ``registry`` as is. Several (``uvicorn --workers N`` with ``PROMETHEUS_MULTIPROC_DIR``
    set, reliability.md row 31): each scrape reaches one process at random, so counters and histograms come
    from every process's files (totals stay monotonic), and only the scrape-time collectors (gauges read
    from the job store, the process collectors) from this process."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return _Scoped([registry], scope)
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=path)
    return _Scoped([merged, _ScrapeTimeOnly(registry)], scope)


class _Scoped:
    """``sources``' metrics (one exposition, one ``# EOF`` in OpenMetrics) without the samples whose ``model``
    or ``job`` label the scope refuses: one key's scrape does not name another key's models or jobs."""

    def __init__(self, sources: list[Any], scope: ScrapeScope | None) -> None:
        self.sources, self.scope = sources, scope

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            for metric in source.collect():
                if self.scope is not None:
                    metric = copy.copy(metric)
                    metric.samples = [s for s in metric.samples if self.scope.keeps(s.labels)]
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
