"""``POST /v1/models/{id}/index`` on the control plane: queue an index build of a folder under the data roots
(or a built-in data set) for a model the caller owns. A worker runs it (``services.index.jobs.queue_build`` sends
the Celery task ``excb.build_index``); ``GET /v1/models/{id}/index`` (services/index/routes.py) shows its state and,
once built, what it holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.api.guard import AuthFirstRoute
from services.api.routes_models import owned_model
from services.api.state import Caller, Plane
from services.api.submit import caller_runs, safe_source
from services.common.errors import ApiError
from services.index.build import DEFAULT_SAMPLE, MAX_SAMPLE
from services.index.jobs import queue_build
from services.index.store import DEFAULT_NAME, valid_name

router = APIRouter(tags=["models"], route_class=AuthFirstRoute)


class IndexBuildRequest(BaseModel):
    """What to index: ``source`` is a folder (relative to a data root), ``list:FILE`` or a built-in data set."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., min_length=1, max_length=4096)
    name: str = Field(DEFAULT_NAME, max_length=64, description="index name; a rebuild replaces it atomically")
    sample: int = Field(DEFAULT_SAMPLE, ge=1, le=MAX_SAMPLE, description="at most this many images (seeded sample)")
    seed: int = Field(0, ge=0, le=2**31 - 1)


@router.post("/models/{model_id}/index", status_code=202, summary="Queue an index build for this model")
def build_index(model_id: str, body: IndexBuildRequest, cp: Plane, who: Caller) -> JSONResponse:
    row = owned_model(cp, who, model_id)
    if not valid_name(body.name):
        raise ApiError(422, "validation_error", "name: 1-64 characters of [A-Za-z0-9._-]", "name")
    if not (Path(row.bundle_dir) / "model.onnx").is_file():
        raise ApiError(409, "conflict", f"bundle of {model_id} is missing on disk")
    source = safe_source(body.source, cp.settings, caller_runs(cp.db, who.id, cp.auth.enabled))
    queue_build(cp.celery, cp.settings, row.id, source, asked=body.source, name=body.name, sample=body.sample,
                seed=body.seed)
    status_url = f"/v1/models/{row.id}/index?index={body.name}"
    body_out: dict[str, Any] = {"model": row.id, "index": body.name, "state": "queued", "sample": body.sample,
                                "seed": body.seed, "status_url": status_url}
    return JSONResponse(body_out, status_code=202, headers={"Location": status_url})
