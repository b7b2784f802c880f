"""Request/response models of the control plane (what OpenAPI documents and schemathesis exercises)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from excb.config import SHORT_KEYS, TrainConfig
from services.common.openai_shapes import OpenAIModel

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

# Keys of the job request that are not TrainConfig fields (the "wrapper").
WRAPPER_KEYS = ("job_id", "name", "gpus", "memory_limit_mb", "max_attempts", "overrides", "metadata")
METADATA_MAX_BYTES = 16 * 1024  # as JSON: the row is read on every job listing
METADATA_MAX_KEYS = 64
MAX_MEMORY_LIMIT_MB = 16 * 1024 * 1024  # 16 TiB: above any machine; a larger number is a mistake, not a limit


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """A JSON schema with its local ``#/$defs/X`` references replaced by the definitions themselves."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**_inline_refs(defs[ref.rsplit("/", 1)[1]], defs), **_inline_refs(rest, defs)}
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def training_fields(schema: dict[str, Any]) -> None:
    """OpenAPI for ``POST /v1/jobs``: TrainConfig's fields beside the wrapper's (validation stays
    ``excb.config.resolve``'s; before, the spec showed only the wrapper), the server-owned ``out`` left out and
    each short key (``data: digits``) accepted as the scalar it stands for."""
    train = TrainConfig.model_json_schema()
    props = _inline_refs(train["properties"], train.get("$defs", {}))
    props.pop("out", None)
    for short, dotted in SHORT_KEYS.items():
        section, _, leaf = dotted.partition(".")
        if short in props:
            continue
        props[short] = {**props[section]["properties"][leaf], "description": f"short for {dotted}"}
    if "data" in props:  # data: a section, or the source alone
        props["data"] = {"anyOf": [props["data"], {"type": "string", "description": "short for data.source"}]}
    schema.setdefault("properties", {}).update({k: v for k, v in props.items() if k not in schema["properties"]})
    schema["examples"] = [{"preset": "cpu-small", "data": "digits", "max_steps": 50}]


class JobSubmit(BaseModel):
    """A job: a training config (exactly what `excb train --config` reads, short keys allowed) plus a few
    wrapper fields. Everything not listed here is validated by ``excb.config.TrainConfig``."""

    model_config = ConfigDict(extra="allow", json_schema_extra=training_fields)

    job_id: str | None = Field(None, pattern=JOB_ID_PATTERN, description="client-chosen id (idempotent submit)")
    name: str | None = Field(None, max_length=255)
    gpus: int = Field(0, ge=0, le=64, description=">1 runs the trainer under torchrun, one process per GPU")
    memory_limit_mb: int | None = Field(None, ge=1, le=MAX_MEMORY_LIMIT_MB,
                                        description="kill (and retry) the trainer above this RSS (at most 16 TiB)")
    max_attempts: int | None = Field(None, ge=1, le=20, description="retry budget for crashes / lost workers")
    overrides: list[str] = Field(default_factory=list, description="`key=value` overrides, as on the CLI")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description=f"free-form labels kept with the job and returned as is (at most "
                                          f"{METADATA_MAX_KEYS} keys, {METADATA_MAX_BYTES} bytes as JSON)")

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Free-form but bounded: it is stored in the job row and sent with every job response."""
        if len(value) > METADATA_MAX_KEYS:
            raise ValueError(f"at most {METADATA_MAX_KEYS} keys")
        if len(json.dumps(value, allow_nan=False)) > METADATA_MAX_BYTES:
            raise ValueError(f"at most {METADATA_MAX_BYTES} bytes as JSON")
        return value


class Progress(BaseModel):
    epoch: float | None = None
    step: int | None = None
    total_steps: int | None = None
    percent: float | None = None
    eta_seconds: float | None = None
    # corpus embedding jobs ("kind": "embed", services/corpus): chunks committed, images embedded (undecodable
    # ones included and counted in ``errors``), this attempt's rate
    chunks_done: int | None = None
    chunks_total: int | None = None
    images: int | None = None
    images_total: int | None = None
    errors: int | None = None
    images_per_second: float | None = None


class ErrorInfo(BaseModel):
    type: str
    message: str


class AttemptOut(BaseModel):
    """One start of the job: which worker ran it, when, and how it ended (``reason``: the detail)."""

    number: int
    worker: str | None
    started_at: dt.datetime
    ended_at: dt.datetime | None
    outcome: str | None = Field(None, description="succeeded, failed, preempted, cancelled, lease_lost, ...; "
                                                  "null while it runs")
    reason: str | None


class StepsOut(BaseModel):
    """How the run's length was chosen."""

    max_steps: int | None
    epochs: int | None
    budget: str | None
    chosen_by: Literal["budget", "budget_pending", "config"] = Field(
        description="budget: timed on the worker; budget_pending: being timed; config: as configured")
    corrected_at_step: int | None = None
    seconds_per_step: float | None = None
    seconds_before_training: float | None = None
    line: str = Field(description="one line for a person, e.g. 'max_steps=412: budget 30s at 0.061 s/step ...'")


class RecipeOut(BaseModel):
    """The recipe the trainer fitted (excb/training/recipe.py), as `excb train --dry-run` prints it."""

    fitted: bool = Field(description="false for a preset or recipe=off: the config ran as given")
    data: str | None = Field(None, description="the data profile the recipe was fitted to")
    device: str | None = None
    reasons: list[str] = Field(description="one line per fitted choice: `key=value: why`")
    kept: list[str] = Field(default_factory=list, description="keys set in the submit, which the recipe keeps")
    steps: StepsOut


class JobOut(BaseModel):
    id: str
    name: str | None
    status: str
    attempt: int
    max_attempts: int
    failures: int
    requested: dict[str, Any] = Field(description="the training config as submitted (validated, resolved)")
    effective: dict[str, Any] | None = Field(
        description="what runs: the run's config.yaml after the recipe and the budget, reported by the worker; "
                    "null until the trainer has written it")
    recipe: RecipeOut | None = Field(description="the fitted recipe's reasons and the step count; null until known")
    config: dict[str, Any] = Field(description="the same as `requested` (kept for existing clients); read "
                                               "`effective` for what runs")
    request: dict[str, Any]
    progress: Progress
    latest_metrics: dict[str, Any]
    balance: dict[str, Any]
    artifacts: dict[str, Any]
    model_id: str | None
    error: ErrorInfo | None
    status_detail: str | None = Field(
        None, description="why the job is where it is; on a QUEUED job, says when no live worker will run it")
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    metadata: dict[str, Any] = Field(default_factory=dict, description="what the submit set")
    attempts: list[AttemptOut] | None = Field(None, description="every start, oldest first (GET /v1/jobs/{id})")


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class MetricsOut(BaseModel):
    items: list[dict[str, Any]]


class ClusterSizesOut(BaseModel):
    step: int | None
    rank: list[float]
    relative_size: list[float]


class LogsOut(BaseModel):
    offset: int
    next_offset: int
    size: int
    text: str


class ModelOut(BaseModel):
    id: str
    job_id: str | None
    status: str
    active: bool
    bundle_dir: str
    sha256: str | None
    created_at: dt.datetime
    model_json: dict[str, Any]


class ModelList(BaseModel):
    """``items`` is excb's; ``object`` + ``data`` are the OpenAI list shape, so the official client's
    ``models.list()`` works on the same path (issue 15)."""

    items: list[ModelOut]
    object: Literal["list"] = "list"
    data: list[OpenAIModel]
