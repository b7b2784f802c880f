"""``POST /v1/jobs`` with ``"kind": "embed"``: a corpus embedding job. The body names a model (one of the
caller's) and a data source (under the data roots, the same rules as a training job's ``data.source``,
``services.api.submit.safe_source``); the job is stored and published like any job, so listing, status, cancel,
retry, delete and tenancy are the job routes'. Its progress carries chunks done/total, images, images/s, ETA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field

from services.api import submit as submit_mod
from services.api.schemas import JOB_ID_PATTERN, JobSubmit
from services.api.serialize import path_hider
from services.api.state import ControlPlane
from services.common.auth import Principal
from services.common.body import validate_as
from services.common.errors import ApiError
from services.corpus.embed import DEFAULT_BATCH_SIZE
from services.corpus.plan import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE
from services.corpus.runner import KIND, model_row

# JobSubmit fields that mean nothing to an embedding job: refused when set, so a typo is not silently ignored.
_TRAINING_ONLY = ("gpus", "memory_limit_mb", "overrides")


class CorpusSubmit(BaseModel):
    """What a corpus job body holds (``kind`` selects it; anything else is a 422)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["embed"]
    model: str = Field(min_length=1, max_length=64, description="id of one of the caller's models")
    source: str = Field(min_length=1, max_length=4096,
                        description="folder, list:FILE or shards:DIR under the data roots (or a built-in data set)")
    chunk_size: int = Field(DEFAULT_CHUNK_SIZE, ge=1, le=MAX_CHUNK_SIZE,
                            description="images per chunk (files sources; a shard is one chunk)")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, le=1024, description="images per ONNX Runtime run")
    job_id: str | None = Field(None, pattern=JOB_ID_PATTERN)
    name: str | None = Field(None, max_length=255)
    max_attempts: int | None = Field(None, ge=1, le=20)
    metadata: dict[str, Any] = Field(default_factory=dict)


def is_corpus_body(body: JobSubmit) -> bool:
    return (body.model_extra or {}).get("kind") == KIND


def submit_corpus(body: JobSubmit, response: Response, cp: ControlPlane, who: Principal,
                  idempotency_key: str | None) -> dict[str, Any]:
    """Validate, store QUEUED and publish a corpus job (idempotent like a training submit)."""
    settings = cp.settings
    for key in _TRAINING_ONLY:
        if key in body.model_fields_set:
            raise ApiError(422, "validation_error", f"{key}: not used by an embedding job", key)
    spec = validate_as(CorpusSubmit, {**(body.model_extra or {}),
                                      **body.model_dump(include={"job_id", "name", "max_attempts", "metadata"},
                                                        exclude_unset=True)})
    hide = path_hider(settings, cp.auth.enabled)
    row = model_row(cp.db, spec.model)
    if row is None or (who.id is not None and row.owner != who.id) or \
            not (Path(row.bundle_dir) / "model.onnx").exists():
        raise ApiError(404, "not_found", f"model {spec.model!r} not found", "model")
    try:
        source = submit_mod.safe_source(spec.source, settings, submit_mod.caller_runs(cp.db, who.id, cp.auth.enabled))
    except ApiError as exc:
        exc.message = hide.text(exc.message) if hide is not None else exc.message
        exc.field = "source" if exc.field == "data.source" else exc.field
        raise
    config = {"kind": KIND, "model_id": row.id, "data": {"source": source}, "chunk_size": spec.chunk_size,
              "batch_size": spec.batch_size}
    existing = submit_mod.existing_submission(cp.db, who.id, spec.job_id, idempotency_key)
    if existing is not None:
        job_id, run_dir = existing.id, Path(existing.run_dir)
    else:
        job_id, run_dir = submit_mod.fresh_run(settings)
    return submit_mod.store_and_publish(cp, who.id, response, hide, job_id=job_id, run_dir=run_dir,
                                        client_id=spec.job_id, idempotency_key=idempotency_key, name=spec.name,
                                        config=config, request={"metadata": spec.metadata},
                                        max_attempts=spec.max_attempts or settings.max_attempts)
