"""The index routes on a control plane that does not embed (compose, Kubernetes): the dashboard's origin.

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

from services.common.active_model import read_active_id
from services.common.auth import CURRENT_PRINCIPAL
from services.db import jobs as store


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


class PlaneModels:
    """``registry.get`` for the index routes: the caller's own model rows (or any row when auth is off)."""

    def __init__(self, db: Any, models_dir: Path) -> None:
        self.db, self.models_dir = db, models_dir

    def get(self, model_id: str | None) -> PlaneModel:
        from services.embed.registry import ModelNotFound

        principal = CURRENT_PRINCIPAL.get()
        caller = principal.id if principal is not None else None
        if model_id in (None, "", "latest"):
            active = read_active_id(self.models_dir)
            rows = store.list_models(self.db, caller)
            rows = [r for r in rows if r.id == active] or rows
            if not rows:
                raise ModelNotFound("latest")
            return PlaneModel(rows[0])
        row = store.get_model(self.db, model_id)
        if row is None or (caller is not None and row.owner != caller):
            raise ModelNotFound(model_id)
        return PlaneModel(row)


class PlaneIndexService:
    """The parts of the embed service the index routes use, without an ONNX session (``decode_all`` absent)."""

    def __init__(self, cp: Any) -> None:
        self.settings = cp.settings
        self.embed = cp.settings.embed
        self.auth = cp.auth
        self.registry = PlaneModels(cp.db, cp.settings.resolved_models_dir)


def build_plane_index_router(cp: Any) -> APIRouter:
    from services.index.routes import build_index_router

    return build_index_router(PlaneIndexService(cp))
