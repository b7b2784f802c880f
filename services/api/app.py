"""The control-plane FastAPI app: jobs and models under /v1 (and unversioned aliases), infra routes,
the dashboard router when installed, and — in embedded mode — the embed service on the same port."""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, AsyncIterator

from celery import Celery
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CollectorRegistry

from services.api import routes_index, routes_infra, routes_jobs, routes_models
from services.api.index_view import build_plane_index_router
from services.api.model_sync import ModelSync
from services.api.state import ControlPlane, OpsCaller
from services.common.auth import ApiKeyAuth
from services.common.cors import install_cors
from services.common.errors import install_error_docs, install_error_handlers
from services.common.metrics import install_http_metrics
from services.corpus import routes as corpus_routes
from services.db.session import Database, default_url
from services.queue.broker import make_celery
from services.queue.reaper import Reaper
from services.settings import Settings, get_settings

log = logging.getLogger("excb.api")


def create_app(settings: Settings | None = None, *, embedded: bool = False, db: Database | None = None,
               celery: Celery | None = None, reaper: bool = True) -> FastAPI:
    """Build the app. ``embedded`` also serves the embed service (/embed, /v1/embed) from this process."""
    settings = settings or get_settings()
    db = db or Database(settings.database_url or default_url(settings.home))
    celery = celery or make_celery(settings)
    auth = ApiKeyAuth.from_settings(settings)
    cp = ControlPlane(settings=settings, db=db, celery=celery, auth=auth)
    metrics_registry = CollectorRegistry()  # one registry: the embed app's series too in `excb up`
    embed_app = _embed_app(settings, metrics_registry) if embedded else None
    syncer = ModelSync(db, embed_app.state.embed.registry, settings.resolved_models_dir) if embed_app else None
    if embed_app is not None and syncer is not None:
        embed_app.state.embed.model_source = syncer

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = Reaper(db, celery, settings) if reaper else None
        if sweeper:
            sweeper.start()
        if syncer is not None:
            syncer.start()
        async with contextlib.AsyncExitStack() as stack:
            if embed_app is not None:
                await stack.enter_async_context(embed_app.router.lifespan_context(embed_app))
            yield
        if sweeper:
            sweeper.stop()
        if syncer:
            syncer.stop()

    app = FastAPI(title="excb control plane", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None,
                  description="Training jobs (ExCB), models, live balance. Errors: {error: {type, message, field}}.")
    app.state.plane = cp
    app.state.embed_app = embed_app
    app.state.registry = metrics_registry
    install_error_handlers(app)
    install_http_metrics(app, app.state.registry, "api")
    routes_infra.register_collectors(app.state.registry, cp)
    app.include_router(routes_infra.router)
    _include_docs(app)
    for prefix, visible in (("/v1", True), ("", False)):
        app.include_router(routes_jobs.router, prefix=prefix, include_in_schema=visible)
        app.include_router(routes_models.router, prefix=prefix, include_in_schema=visible)
    _include_index_build(app, cp if embed_app is None else None)
    app.include_router(corpus_routes.router, prefix="/v1")  # corpus index, dedup, subsets (services/corpus)
    _include_dashboard(app)
    if embed_app is not None:
        app.mount("/", embed_app)
        _merge_openapi(app, embed_app)
    install_error_docs(app)  # the spec's 422s in the shape the handlers answer
    install_cors(app, settings.cors_origins)  # last: the outermost layer (also for the mounted embed app)
    return app


def _include_docs(app: FastAPI) -> None:
    """/openapi.json, /docs and /redoc behind ``ops_routes_auth`` (FastAPI's built-in ones cannot be)."""

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_json(_: OpsCaller) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def swagger(_: OpsCaller) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False)
    def redoc(_: OpsCaller) -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")


def _merge_openapi(app: FastAPI, embed_app: FastAPI) -> None:
    """`excb up` is one service, so one spec: the control plane's operations plus every operation of the
    mounted embed app that no control-plane route shadows (those are matched first and never reach it)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            # from the spec, not app.routes: included routers may sit there unexpanded (FastAPI's _IncludedRouter)
            taken = {(_shape(path), method) for path, item in schema.get("paths", {}).items() for method in item}
            embed = embed_app.openapi()
            for path, item in embed.get("paths", {}).items():
                for method, op in item.items():
                    if (_shape(path), method) not in taken:
                        schema.setdefault("paths", {}).setdefault(path, {})[method] = op
            for section, entries in embed.get("components", {}).items():
                target = schema.setdefault("components", {}).setdefault(section, {})
                for name, body in entries.items():
                    target.setdefault(name, body)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema


def _shape(path: str) -> str:
    """A path template with its parameter names erased: /v1/models/{id} and /v1/models/{model_id} collide."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def _include_index_build(app: FastAPI, reader: ControlPlane | None) -> None:
    """POST /v1/models/{id}/index (routes_index.py): queue an image-index build on the workers. ``reader``: without
    an embedded embed service, also serve the index's read routes here (index_view.py: the dashboard's gallery,
    compose shape)."""
    app.include_router(routes_index.router, prefix="/v1")
    if reader is not None:
        app.include_router(build_plane_index_router(reader))


def _include_dashboard(app: FastAPI) -> None:
    try:
        from services.dashboard import router as dashboard_router
    except ImportError:
        log.info("services.dashboard not installed; /dashboard not served")
        return
    app.include_router(dashboard_router)


def _embed_app(settings: Settings, metrics_registry: CollectorRegistry) -> Any:
    try:
        from services.embed.app import create_app as create_embed_app
    except ImportError:
        log.warning("services.embed not installed; /embed not served")
        return None
    return create_embed_app(settings, metrics_registry=metrics_registry, cors=False)  # the outer app's CORS
