"""Turn a submitted job body into a validated, path-safe TrainConfig (the same schema as `excb train`)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastapi import Response

from excb.config import ConfigError, resolve
from services.api.schemas import WRAPPER_KEYS, JobSubmit
from services.api.serialize import PathHider, job_dict
from services.api.state import ControlPlane
from services.common.errors import ApiError
from services.common.paths import PathNotAllowed, resolve_in_roots, resolve_source, split_source
from services.db import jobs as store
from services.db.session import Database
from services.db.tables import Job
from services.queue.publish import publish
from services.settings import Settings

TRASH_DIR = ".deleted"  # under runs/: where a deleted job's run dir waits for removal

log = logging.getLogger("excb.api")


def new_job_id() -> str:
    return f"j-{uuid.uuid4().hex[:16]}"


def runs_root(settings: Settings) -> Path:
    return Path(settings.runs_dir).expanduser().resolve()


def fresh_run(settings: Settings) -> tuple[str, Path]:
    """A new server job id and its run dir, which must not exist yet: a job never starts in (and so never
    resumes from) a directory another job wrote."""
    while True:
        job_id = new_job_id()
        run_dir = runs_root(settings) / job_id
        if not run_dir.exists():
            return job_id, run_dir


def discard_run_dir(settings: Settings, run_dir: str) -> None:
    """Move a deleted job's run dir aside at once (one rename: logs and checkpoints vanish atomically),
    then remove it. Directories outside ``runs/`` are never touched."""
    root = runs_root(settings)
    path = Path(run_dir)
    if not path.is_relative_to(root) or path == root or not path.is_dir():
        return
    trash = root / TRASH_DIR / f"{path.name}.{uuid.uuid4().hex[:8]}"
    try:
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, trash)
    except OSError as exc:
        log.warning("could not move aside the run dir %s of a deleted job: %s", path, exc)
        return
    shutil.rmtree(trash, ignore_errors=True)


@dataclass(frozen=True)
class CallerRuns:
    """The submitting key's runs: ``find(ref)`` is the run dir of its job named ``ref`` (client or server id),
    None for a missing job or another key's; ``all_runs``: no API keys (one tenant), every run dir is its own."""

    find: Callable[[str], Path | None] = lambda _ref: None
    all_runs: bool = True


def caller_runs(db: Database, owner: str | None, keyed: bool) -> CallerRuns:
    """The run dirs a request of ``owner`` may name (warm starts, data sources): its own jobs' (issue 33 item 1);
    ``keyed``: API keys are on (without them there is one tenant and every run dir is its own)."""
    def find(ref: str) -> Path | None:
        job = store.find_owned(db, owner, ref)
        return Path(job.run_dir) if job is not None else None

    return CallerRuns(find, all_runs=not keyed)


def build_config(body: JobSubmit, settings: Settings, run_dir: Path,
                 runs: CallerRuns = CallerRuns()) -> dict[str, Any]:
    """Validate the config part of ``body``; ``out`` is always the server's run dir for the job."""
    raw = {k: v for k, v in (body.model_extra or {}).items() if k not in WRAPPER_KEYS}
    if "out" in raw:
        raw.pop("out")  # the server owns where runs are written
    try:
        cfg = resolve(raw, list(body.overrides))
    except ConfigError as exc:
        raise ApiError(422, "validation_error", f"{exc.field}: {exc.message}", exc.field) from exc
    except (ValueError, TypeError) as exc:  # anything else the schema could not digest is still bad input
        raise ApiError(422, "validation_error", str(exc), None) from exc
    data = cfg.model_dump(mode="json")
    check_job_bounds(data)
    data["out"] = str(run_dir)
    data["data"]["source"] = safe_source(cfg.data.source, settings, runs)
    if cfg.checkpoint:
        data["checkpoint"] = safe_checkpoint(cfg.checkpoint, settings, runs)
    return data


def safe_checkpoint(value: str, settings: Settings, runs: CallerRuns) -> str:
    """``checkpoint=`` (a warm start) over the API: the caller's own job (its id), a path inside one of the
    caller's run dirs, or a file in a data root; never another key's run (issue 33 item 1) nor any other file.
    Another key's run answers exactly like one that does not exist (404), so a leaked id reveals nothing."""
    own = runs.find(value)
    if own is not None:
        return str(own)
    try:
        path = resolve_in_roots(value, [settings.runs_dir, *settings.data_roots], field="checkpoint")
    except PathNotAllowed as exc:
        raise ApiError(422, "path_not_allowed", exc.message, exc.field) from exc
    if _in_server_state(path, settings):  # the server's state: the caller's runs only
        if not path.exists() or not _in_own_run(path, settings, runs, any_run=runs.all_runs):
            raise ApiError(404, "not_found", f"checkpoint {value!r}: no job, run or file of yours", "checkpoint")
    elif not path.exists():
        raise ApiError(422, "path_not_allowed", f"{value!r} does not exist inside the data roots", "checkpoint")
    return str(path)


# Upper bounds a job submitted over the API must respect (issue 13 item 12): the training schema accepts any
# positive value for `excb train` on one's own machine; a shared service refuses sizes that can only exhaust it.
JOB_BOUNDS: dict[str, int] = {
    "batch_size": 65_536, "epochs": 100_000, "max_steps": 100_000_000, "data.num_workers": 64,
    "data.shuffle_buffer": 1_000_000, "data.cache_mb": 8192, "model.num_clusters": 1_048_576,
    "model.projector_hidden_dim": 65_536, "model.predictor_hidden_dim": 65_536, "augment.global_size": 1024,
    "augment.local_size": 1024,
}


def check_job_bounds(config: dict[str, Any]) -> None:
    """422 for a value over :data:`JOB_BOUNDS` or any non-finite number (``lr=Infinity``, NaN)."""
    for key, limit in JOB_BOUNDS.items():
        value = _dotted(config, key)
        if isinstance(value, (int, float)) and value > limit:
            raise ApiError(422, "validation_error", f"{key}: {value} is above this service's limit of {limit}", key)
    for key, value in _numbers(config, ""):
        if not math.isfinite(value):
            raise ApiError(422, "validation_error", f"{key}: must be a finite number", key)


def _dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _numbers(node: Any, prefix: str) -> list[tuple[str, float]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _numbers(v, f"{prefix}{k}.")]
    if isinstance(node, (list, tuple)):
        return [kv for i, v in enumerate(node) for kv in _numbers(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), float(node))] if isinstance(node, float) else []


def safe_source(source: str, settings: Settings, runs: CallerRuns = CallerRuns()) -> str:
    """Built-in data sets pass; any path (folder, ``list:FILE``, ``fashion-mnist:ROOT``, ``shards:DIR``) must lie in
    a data root, every file it reads included (``services.common.paths.resolve_source``, as `excb index build`).

    With API keys, a data root that encloses the server's home (``excb up --data-root .``) does not open the
    other tenants' state to training: a source inside the home or the models folder must lie in one of the
    caller's own run dirs, else it is the same 404 as a checkpoint of another key's (issue 33 item 1)."""
    try:
        resolved = resolve_source(source, settings.data_roots)
    except PathNotAllowed as exc:
        raise ApiError(422, "path_not_allowed", exc.message, exc.field) from exc
    path = Path(split_source(resolved)[1])
    if path.is_absolute() and _in_server_state(path, settings) and not runs.all_runs \
            and not _in_own_run(path, settings, runs, any_run=False):
        raise ApiError(404, "not_found", f"data source {source!r}: no data set of yours", "data.source")
    return resolved


def _in_server_state(path: Path, settings: Settings) -> bool:
    """Whether ``path`` (resolved) lies in the server's home or its models folder."""
    state = (settings.home, settings.resolved_models_dir)
    return any(path.is_relative_to(Path(p).expanduser().resolve()) for p in state)


def _in_own_run(path: Path, settings: Settings, runs: CallerRuns, any_run: bool) -> bool:
    """Whether ``path`` lies inside a run dir under ``runs/`` that the caller owns (``any_run``: any run dir)."""
    root = runs_root(settings)
    if not path.is_relative_to(root) or path == root:
        return False
    run = root / path.relative_to(root).parts[0]
    return any_run or runs.find(run.name) == run


def too_many(exc: store.LimitReached) -> ApiError:
    """The answer when the caller already has its most jobs running (max_running_jobs_per_key)."""
    return ApiError(429, "too_many_jobs", str(exc), headers={"Retry-After": "60"})


def existing_submission(db: Database, owner: str | None, client_id: str | None, key: str | None) -> Job | None:
    """The caller's own earlier submission with this client job id or Idempotency-Key, if any (any job kind)."""
    if key is not None:
        job = store.find_by_key(db, owner, key)
        if job is not None:
            return job
    return store.find_client_job(db, owner, client_id) if client_id is not None else None


def store_and_publish(cp: ControlPlane, owner: str | None, response: Response, hide: PathHider | None, *, job_id: str,
                      run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Store a job QUEUED (idempotent: an earlier identical submission answers 200) and publish its message; the
    answer every job kind gives: the job's view, ``Location``, 201 or 200. ``fields``: ``create_job``'s keyword
    arguments for the row (client_id, idempotency_key, name, config, request, max_attempts)."""
    try:
        job, created = store.create_job(cp.db, job_id=job_id, owner=owner, run_dir=str(run_dir),
                                        max_active=cp.settings.max_running_jobs_per_key, **fields)
    except store.Conflict as exc:
        raise ApiError(409, "conflict", str(exc), "job_id") from exc
    except store.LimitReached as exc:
        raise too_many(exc) from exc
    if created:
        publish(cp.celery, cp.db, job.id, cp.settings.celery_queue)
        job = store.get_job(cp.db, job.id) or job
    else:
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{store.public_id(job)}"
    return job_dict(job, hide=hide)
