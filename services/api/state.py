"""What every request handler needs, built once per app: settings, DB, Celery, auth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, Request

from services.common.auth import ANONYMOUS, ApiKeyAuth, Principal
from services.db.session import Database
from services.settings import Settings


@dataclass
class ControlPlane:
    settings: Settings
    db: Database
    celery: Celery
    auth: ApiKeyAuth
    # `excb up` only: the WorkerSupervisor of the workers this process started (services/worker/supervisor.py)
    supervisor: Any = None


def plane(request: Request) -> ControlPlane:
    """The app's ControlPlane (FastAPI dependency)."""
    return request.app.state.plane


def principal(request: Request) -> Principal:
    """The authenticated caller (FastAPI dependency; 401 when auth is on and the key is bad).

    Routes of :class:`services.api.guard.AuthFirstRoute` have already authenticated before the body was
    read; their result is reused."""
    known = getattr(request.state, "principal", None)
    if isinstance(known, Principal):
        return known
    return request.app.state.plane.auth.authenticate(request)


def ops_principal(request: Request) -> Principal:
    """The caller of an operational route (metrics, info, docs): authenticated when ``ops_routes_auth`` says
    so (by default whenever API keys exist: they expose counts, versions and the whole API surface)."""
    cp: ControlPlane = request.app.state.plane
    mode = cp.settings.ops_routes_auth
    if mode == "off" or (mode == "auto" and not cp.auth.enabled):
        return ANONYMOUS
    return principal(request)


Plane = Annotated[ControlPlane, Depends(plane)]
Caller = Annotated[Principal, Depends(principal)]
OpsCaller = Annotated[Principal, Depends(ops_principal)]
