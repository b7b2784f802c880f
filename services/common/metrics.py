"""Prometheus helpers: one ``excb_`` namespace, a ``/metrics`` response, request timing middleware."""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

NAMESPACE = "excb"


def metrics_response(registry: CollectorRegistry) -> Response:
    """The text exposition of ``registry``."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def install_http_metrics(app: FastAPI, registry: CollectorRegistry, service: str) -> None:
    """Count requests and time them by route template (never by raw path: unbounded label values)."""
    requests = Counter(f"{NAMESPACE}_http_requests_total", "HTTP requests", ["service", "method", "route", "status"],
                       registry=registry)
    latency = Histogram(f"{NAMESPACE}_http_request_duration_seconds", "HTTP request latency",
                        ["service", "method", "route"], registry=registry)

    @app.middleware("http")
    async def _timing(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", "unmatched")
            requests.labels(service, request.method, template, str(status)).inc()
            latency.labels(service, request.method, template).observe(time.perf_counter() - start)
