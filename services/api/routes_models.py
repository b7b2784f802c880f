"""/v1/models: registered bundles (list, show, activate). Serving-side balance lives in the embed service."""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from excb.inference.onnx_runtime import BundleError
from services.api.guard import AuthFirstRoute
from services.api.model_sync import sync_once
from services.api.routes_jobs import ERRORS
from services.api.schemas import ModelList, ModelOut
from services.api.serialize import PathHider, model_dict, path_hider
from services.api.state import Caller, ControlPlane, Plane
from services.common.active_model import read_active_id, write_active
from services.common.auth import Principal
from services.common.errors import ApiError
from services.common.openai_shapes import model_entry
from services.db import models as model_store
from services.db.tables import ModelRow
from services.embed.manifest import ModelRecord, record_model
from services.embed.registry import servable_bundle

router = APIRouter(tags=["models"], responses=ERRORS, route_class=AuthFirstRoute)


def owned_model(cp: ControlPlane, who: Principal, model_id: str) -> ModelRow:
    """The model row ``model_id`` when the caller owns it (or keys are off); another key's is the same 404 as none."""
    row = model_store.get_model(cp.db, model_id)
    if row is None or (who.id is not None and row.owner != who.id):
        raise ApiError(404, "not_found", f"model {model_id!r} not found", "model_id")
    return row


@router.get("/models", response_model=ModelList, summary="Registered models, newest first")
def list_models(cp: Plane, who: Caller) -> dict[str, Any]:
    rows = model_store.list_models(cp.db, who.id)
    hide = path_hider(cp.settings, cp.auth.enabled)
    active = read_active_id(cp.settings.resolved_models_dir)
    return {"items": [model_dict(m, hide, active) for m in rows], "object": "list",
            "data": [model_entry(m.id, m.created_at, m.id == active, owned_by=m.owner or "excb") for m in rows]}


@router.get("/models/{model_id}", response_model=ModelOut, summary="One model's metadata (model.json)")
def show_model(model_id: str, cp: Plane, who: Caller) -> dict[str, Any]:
    return model_dict(owned_model(cp, who, model_id), path_hider(cp.settings, cp.auth.enabled),
                      read_active_id(cp.settings.resolved_models_dir))


@router.post("/models/{model_id}/activate", response_model=ModelOut, summary="Serve this model from now on")
def activate_model(model_id: str, request: Request, cp: Plane, who: Caller) -> dict[str, Any]:
    row = owned_model(cp, who, model_id)
    if not (Path(row.bundle_dir) / "model.onnx").exists():
        raise ApiError(409, "conflict", f"bundle of {model_id} is missing on disk")
    hide = path_hider(cp.settings, cp.auth.enabled)
    try:  # what every embed service would refuse is not pointed at (issue 33 item 4: it was a 500)
        servable_bundle(Path(row.bundle_dir), row.id, ModelRecord(sha256=row.sha256 or "", owner=row.owner))
    except BundleError as exc:
        raise _refused(model_id, exc, hide) from exc
    models_dir = cp.settings.resolved_models_dir
    record_model(models_dir, row.id, row.sha256 or "", row.owner)  # the owner's default model from now on
    write_active(models_dir, row.id, Path(row.bundle_dir), row.sha256 or "")
    embed_app = getattr(request.app.state, "embed_app", None)
    if embed_app is not None:  # embedded mode: switch the in-process embed service now
        try:
            sync_once(cp.db, embed_app.state.embed.registry, models_dir)
        except BundleError as exc:  # ONNX Runtime could not load it after all: the answer says why
            raise _refused(model_id, exc, hide) from exc
    return model_dict(row, hide, row.id)


def _refused(model_id: str, exc: BundleError, hide: PathHider | None) -> ApiError:
    reason = hide.text(str(exc)) if hide is not None else str(exc)
    return ApiError(409, "bundle_invalid", f"model {model_id} cannot be served: {reason}", "model_id")


@router.get("/models/{model_id}/bundle", summary="Download the model's bundle (a tar of its directory)",
            response_class=FileResponse,
            responses={200: {"content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "tar with one directory, the model id; X-Bundle-SHA256 = model.onnx"}})
def download_bundle(model_id: str, cp: Plane, who: Caller) -> FileResponse:
    """So a remote user can take the model home (`excb jobs pull`): the same ownership as the model routes."""
    row = owned_model(cp, who, model_id)
    bundle = Path(row.bundle_dir)
    if not (bundle / "model.onnx").is_file():
        raise ApiError(409, "conflict", f"bundle of {model_id} is missing on disk")
    tar_path = bundle_tar(bundle, row.id, Path(cp.settings.home))
    return FileResponse(tar_path, media_type="application/x-tar", filename=f"{row.id}.tar",
                        headers={"X-Bundle-SHA256": row.sha256 or ""},
                        background=BackgroundTask(os.unlink, tar_path))


def bundle_tar(bundle: Path, name: str, home: Path) -> Path:
    """A temporary tar of the bundle's regular files under ``name/`` (links are left out: nothing outside the
    bundle can ride along); the caller deletes it."""
    tmp_dir = home / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="bundle-", suffix=".tar", dir=tmp_dir)
    with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w") as tar:
        for path in sorted(bundle.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=f"{name}/{path.relative_to(bundle).as_posix()}", recursive=False)
    return Path(tmp)
