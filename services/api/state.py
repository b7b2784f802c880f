"""What every request handler needs, built once per app: settings, DB, Celery, auth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Celery
from fastapi import Request

from services.common.auth import ApiKeyAuth, Principal
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
    """The authenticated caller (FastAPI dependency; 401 when auth is on and the key is bad)."""
    return request.app.state.plane.auth.authenticate(request)
