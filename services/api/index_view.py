"""The control plane's host for the index routes (services/index/routes.py: ``IndexHost``) when it does not embed
(compose, Kubernetes): the dashboard's origin.

In `excb up` the embed service is mounted in the control plane and answers the index routes itself. In the
compose shape the dashboard is served by the API (:8000) while the embed replicas (:8080) run elsewhere; both
mount the same models volume, so the API can read the index directly. Here a model is the DB row (ownership
exactly as ``/v1/models/{id}``: another key's model is a 404), its cluster count, sizes and sha256 come from the
row's model.json, and nothing is run through ONNX: cluster pages, thumbnails and search by ``image_id`` work;
a search by an uploaded image answers 503 and names the embed service, which has the session. Served shares
are the embed replicas' (in their memory), so this view shows none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter

from services.api.state import ControlPlane
from services.common.active_model import read_active_id
from services.common.auth import CURRENT_PRINCIPAL, ApiKeyAuth
from services.common.errors import ApiError
from services.corpus.search import CorpusSearch, job_resolver
from services.db import models as model_store
from services.db.session import Database
from services.embed.sources import Source, resolve_inputs
from services.index.routes import build_index_router
from services.settings import Settings


class _Bundle:
    def __init__(self, meta: dict[str, Any], sha256: str | None) -> None:
        self.meta = meta
        self.sha256 = sha256 or str(meta.get("sha256", ""))
        self.num_clusters = int(meta.get("num_clusters", 0))
        self.sizes = np.asarray(meta.get("sizes") or [1.0 / max(1, self.num_clusters)] * self.num_clusters,
                                dtype=np.float32)


class _NoTraffic:
    """This process serves no embeddings: no served assignments to report."""

    def __init__(self, k: int) -> None:
        self.k = k

    def counts(self) -> tuple[np.ndarray, np.ndarray, int]:
        return np.zeros(self.k, np.int64), np.zeros(self.k, np.int64), 0


class PlaneModel:
    """What the index routes read from a served model, built from the control plane's row."""

    def __init__(self, row: Any) -> None:
        self.id = row.id
        self.bundle = _Bundle(dict(row.model_json or {}), row.sha256)
        self.monitor = _NoTraffic(self.bundle.num_clusters)
        self.version = f"{row.id}@{self.bundle.sha256[:12]}"


def find_plane_model(db: Database, models_dir: Path, model_id: str | None) -> PlaneModel | None:
    """The caller's own model row (or any row when auth is off); ``None``/``latest``: the active one, else the
    newest; None when there is none."""
    principal = CURRENT_PRINCIPAL.get()
    caller = principal.id if principal is not None else None
    if model_id in (None, "", "latest"):
        active = read_active_id(models_dir)
        rows = model_store.list_models(db, caller)
        rows = [r for r in rows if r.id == active] or rows
        return PlaneModel(rows[0]) if rows else None
    row = model_store.get_model(db, model_id)
    if row is None or (caller is not None and row.owner != caller):
        return None
    return PlaneModel(row)


class PlaneIndexHost:
    """The index routes' host on the control plane: model rows, no ONNX session (a search by image is a 503)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.db: Database = cp.db
        self.settings: Settings = cp.settings
        self.auth: ApiKeyAuth = cp.auth

    def find_model(self, model_id: str | None) -> PlaneModel | None:
        return find_plane_model(self.db, self.settings.resolved_models_dir, model_id)

    async def resolve_image(self, text: str, field: str) -> Source:
        """A string naming an image is read (and refused) as the embed service would; URLs are not fetched here."""
        return (await resolve_inputs([text], [field], self.settings, False))[0][1]

    async def embed_image(self, model_id: str, image: Source) -> tuple[np.ndarray, np.ndarray]:
        raise ApiError(503, "unavailable", "search by an uploaded image runs on the embed service (POST /v1/search "
                                           "there); here, search by image_id", "image", {"Retry-After": "1"})


def build_plane_index_router(cp: ControlPlane) -> APIRouter:
    """The index's read routes served from the control plane (see the module docstring)."""
    return build_index_router(PlaneIndexHost(cp), CorpusSearch(resolve=job_resolver(cp.db)))
