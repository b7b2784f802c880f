"""/livez, /health, /readyz, /metrics, /v1/info, /v1/workers."""

from __future__ import annotations

import platform
from typing import Any, Callable, Iterable

import celery
import fastapi
import sqlalchemy
from fastapi import APIRouter, Depends, Query, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select, text

import excb
from services.api.job_metrics import JobHistoryCollector, visible_jobs
from services.api.liveness import workers_view
from services.api.serialize import path_hider
from services.api.state import ControlPlane, OpsCaller, plane, principal
from services.common.auth import CURRENT_PRINCIPAL, Principal
from services.common.errors import ApiError
from services.common.metrics import ScrapeScope, metrics_response, register_runtime_collectors
from services.db import jobs as store
from services.db import models as model_store
from services.db.tables import JOB_STATUSES, Job

router = APIRouter(tags=["infra"])


@router.get("/livez", summary="The process is up")
def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health", summary="The process is up (the liveness route of Hugging Face TEI; same as /livez)")
def health() -> dict[str, str]:
    return livez()


@router.get("/readyz", summary="DB and broker reachable, and a worker alive",
            responses={503: {"description": "not ready; the message says which check failed and why"}})
def readyz(cp: ControlPlane = Depends(plane),
           workers: bool = Query(True, description="also require a live worker (false: only this process's "
                                                   "own dependencies, for load-balancer readiness)")) -> dict[str, Any]:
    checks: dict[str, str] = {}
    try:
        with cp.db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        with cp.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {type(exc).__name__}"
    if workers and checks["database"] == "ok":
        view = workers_view(cp)
        checks["workers"] = f"ok: {view.live} live" if view.live else (view.reason or "no live worker")
    failed = {k: v for k, v in checks.items() if not v.startswith("ok")}
    if failed:
        raise ApiError(503, "unavailable", "not ready: " + ", ".join(f"{k}={v}" for k, v in failed.items()))
    return {"status": "ok", "checks": checks}


@router.get("/v1/workers", summary="Workers and their last heartbeat (and, in `excb up`, the supervisor)")
def list_workers(cp: ControlPlane = Depends(plane), who: Principal = Depends(principal)) -> dict[str, Any]:
    """A worker is live while its row says alive and its heartbeat is younger than ``stale_after_seconds``;
    ``reason`` says why none is, ``supervisor`` what `excb up` is doing about it (restarts, crash loop).
    With API keys, ``job_id`` is shown only for the caller's own jobs (null for another key's: issue 33
    item 1); an operator's key (``EXCB_ADMIN_KEYS_FILE``) sees them all."""
    body = workers_view(cp).as_dict(cp.settings.stall_seconds)
    if not who.sees_all(cp.auth.enabled):
        mine = store.owned_ids(cp.db, who.id, [i["job_id"] for i in body["items"] if i["job_id"]])
        for item in body["items"]:
            item["job_id"] = item["job_id"] if item["job_id"] in mine else None
    return body


@router.api_route("/metrics", methods=["GET", "HEAD"], summary="Prometheus metrics", response_class=Response)
def metrics(request: Request, caller: OpsCaller) -> Response:
    """Per-model series (``model`` label) and per-job ones (``job``: running jobs' training balance) are
    scoped to the caller: with API keys a key's scrape carries only the models it may see (its own, shared,
    ownerless) and its own jobs, an operator's key (EXCB_ADMIN_KEYS_FILE) all of them, an anonymous scrape
    (ops routes opened to all) none; totals without those labels stay as they are. OpenMetrics when the
    ``Accept`` header asks for it (``application/openmetrics-text``), else the text format 0.0.4."""
    return metrics_response(request.app.state.registry, _scope(request, caller), request.headers.get("accept"))


def _scope(request: Request, caller: Principal) -> ScrapeScope:
    """What ``caller``'s scrape may name: the models of :func:`_visible_models`, its own running jobs."""
    cp: ControlPlane = request.app.state.plane
    if caller.sees_all(cp.auth.enabled):
        return ScrapeScope()
    jobs = visible_jobs(cp, caller.id) if caller.id is not None else set()
    return ScrapeScope(models=_visible_models(request, caller), jobs=jobs.__contains__)


def _visible_models(request: Request, caller: Principal) -> Callable[[str], bool] | None:
    """The ``model`` label values ``caller`` may see in /metrics; None = every one."""
    cp: ControlPlane = request.app.state.plane
    if caller.sees_all(cp.auth.enabled):
        return None
    if caller.id is None:
        return lambda _model: False
    visible = {m.id for m in model_store.list_models(cp.db, caller.id)}
    embed_app = request.app.state.embed_app
    if embed_app is not None:  # the embed registry's rule: own, shared and ownerless loaded models
        token = CURRENT_PRINCIPAL.set(caller)
        try:
            visible |= {m.id for m in embed_app.state.embed.registry.models()}
        finally:
            CURRENT_PRINCIPAL.reset(token)
    return visible.__contains__


@router.get("/v1/info", summary="Versions and mode (no secrets); in `excb up` also the embed service's")
def info(request: Request, caller: OpsCaller, cp: ControlPlane = Depends(plane)) -> dict[str, Any]:
    s = cp.settings
    return {
        "service": "excb-control-plane",
        "versions": {"excb": getattr(excb, "__version__", "0.1.0"), "python": platform.python_version(),
                     "fastapi": fastapi.__version__, "celery": celery.__version__,
                     "sqlalchemy": sqlalchemy.__version__},
        "database": cp.db.engine.dialect.name,
        "broker": "redis" if s.redis_url else "sqlalchemy (embedded)",
        "auth": cp.auth.enabled,
        "queue": s.celery_queue,
        "max_attempts": s.max_attempts,
        "data_roots": len(s.data_roots),
        "workers": _workers_summary(cp),
        "embed": _embed_info(request, caller),
    }


def _embed_info(request: Request, caller: Principal) -> dict[str, Any] | None:
    """The mounted embed service's info (`excb up` is one service, so one /v1/info), with the caller's models
    only: the principal is set here because this sync route runs in its own copied context."""
    embed_app = request.app.state.embed_app
    if embed_app is None:
        return None
    token = CURRENT_PRINCIPAL.set(caller)
    try:
        body: dict[str, Any] = embed_app.state.embed.info()
    finally:
        CURRENT_PRINCIPAL.reset(token)
    cp: ControlPlane = request.app.state.plane
    if caller.id is None and cp.auth.enabled:  # ops routes opened to all: no model names
        body = {k: v for k, v in body.items() if k not in ("latest", "models")}
    hide = path_hider(cp.settings, cp.auth.enabled)
    if hide is not None and "models" in body:  # bundle paths relative to models/, as the model routes show them
        body["models"] = hide.deep(body["models"])
    return body


def _workers_summary(cp: ControlPlane) -> dict[str, Any]:
    """Counts only: the list, with names and the reason, is GET /v1/workers (behind auth) and /readyz."""
    try:
        view = workers_view(cp)
    except Exception as exc:
        return {"error": type(exc).__name__}
    crash = any(slot["crash_loop"] for slot in view.supervisor or [])
    return {"live": view.live, "stale_after_seconds": cp.settings.stall_seconds,
            "supervised": view.supervisor is not None, "crash_loop": crash}


class JobsCollector:
    """``excb_jobs{status}`` counted from the DB at scrape time (the DB is the truth, not a counter)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def collect(self) -> Iterable[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("excb_jobs", "jobs by status", labels=["status"])
        counts = {s: 0 for s in JOB_STATUSES}
        try:
            with self.cp.db.session() as s:
                for status, n in s.execute(select(Job.status, func.count()).group_by(Job.status)):
                    counts[status] = int(n)
        except Exception:
            return []
        for status, n in counts.items():
            gauge.add_metric([status], n)
        return [gauge]


class WorkersCollector:
    """``excb_workers_live`` from the workers table at scrape time (alert on 0 while jobs are QUEUED)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            live = workers_view(self.cp).live
        except Exception:
            return []
        gauge = GaugeMetricFamily("excb_workers_live", "workers whose heartbeat is within the stall window")
        gauge.add_metric([], live)
        return [gauge]


def register_collectors(registry: CollectorRegistry, cp: ControlPlane) -> None:
    registry.register(JobsCollector(cp))
    registry.register(WorkersCollector(cp))
    registry.register(JobHistoryCollector(cp))
    register_runtime_collectors(registry)
