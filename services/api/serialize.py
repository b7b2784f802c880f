"""DB rows -> API dicts (one place, so the REST responses and the SSE events agree)."""

from __future__ import annotations

import base64
import copy
import datetime as dt
from pathlib import Path
from typing import Any

from services.common.errors import ApiError
from services.db.jobs import public_id
from services.db.tables import Job, JobAttempt, ModelRow
from services.settings import Settings


class PathHider:
    """Server paths as callers may see them (issue 13 item 11): relative to ``runs/``, ``models/`` or the data
    root they lie in, else only the file name. Keys need ids, not the server's directory layout."""

    def __init__(self, settings: Settings) -> None:
        self.home = home = Path(settings.home).expanduser().resolve()
        self.bases = [(home / "runs", "runs/"), (settings.resolved_models_dir, "models/")]
        self.bases += [(Path(r).expanduser().resolve(), "") for r in settings.data_roots]

    def path(self, text: str) -> str:
        p = Path(text)
        if not p.is_absolute():
            return text
        for base, prefix in self.bases:
            if p.is_relative_to(base):
                return prefix + p.relative_to(base).as_posix()
        return p.name

    def text(self, message: str) -> str:
        """A message (an error's reason) with the server paths in it shown relative to runs/, models/, a data
        root or the home, longest base first (issue 33 item 5: 422 path errors named absolute paths)."""
        for base, prefix in sorted([*self.bases, (self.home, "")], key=lambda b: -len(str(b[0]))):
            message = message.replace(f"{base}/", prefix).replace(str(base), prefix.rstrip("/") or ".")
        return message

    def source(self, source: str) -> str:
        prefix = next((x for x in ("list:", "fashion-mnist:", "shards:") if source.startswith(x)), "")
        return prefix + self.path(source[len(prefix):])

    def job(self, body: dict[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(body)
        for key in ("config", "requested", "effective"):
            if isinstance(body.get(key), dict):
                self._config(body[key])
        body["artifacts"] = self.deep(body.get("artifacts") or {})
        if isinstance(body.get("error"), dict) and isinstance(body["error"].get("message"), str):
            body["error"]["message"] = self.text(body["error"]["message"])
        return body

    def deep(self, value: Any) -> Any:
        """``value`` with every absolute path string in it (at any depth) shown as :meth:`path` would: model.json's
        ``source`` names the run dir and checkpoint, artifacts name files."""
        if isinstance(value, dict):
            return {k: self.deep(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.deep(v) for v in value]
        return self.path(value) if isinstance(value, str) and value.startswith("/") else value


    def _config(self, config: dict[str, Any]) -> None:
        for key in ("out", "checkpoint"):  # the run dir, the warm start (a run of the caller's or a data file)
            if isinstance(config.get(key), str):
                config[key] = self.path(config[key])
        data = config.get("data")
        if isinstance(data, dict) and isinstance(data.get("source"), str):
            data["source"] = self.source(data["source"])


def path_hider(settings: Settings, auth_enabled: bool) -> PathHider | None:
    """None = show server paths (no API keys, or ``server_paths_in_responses=on``)."""
    mode = settings.server_paths_in_responses
    if mode == "on" or (mode == "auto" and not auth_enabled):
        return None
    return PathHider(settings)


def status_detail(job: Job, no_worker: str | None) -> str | None:
    """One line on why the job is where it is: above all, a QUEUED job that no live worker will pick up."""
    if job.status == "QUEUED":
        if no_worker:
            return f"queued, but it cannot start: {no_worker}"
        if job.attempt and job.error:
            return f"queued again for attempt {job.attempt + 1} after {job.error.get('type')}"
        return "queued: waiting for a free worker"
    if job.status in ("STARTING", "RUNNING", "CANCELLING") and job.lease_owner:
        return f"{job.status.lower()} on worker {job.lease_owner}"
    return None


def job_dict(job: Job, no_worker: str | None = None, hide: PathHider | None = None) -> dict[str, Any]:
    """``no_worker``: why no worker is live (services.api.liveness.no_worker_reason), shown on QUEUED jobs;
    ``hide``: rewrite server paths for the caller."""
    body = _job_body(job, no_worker)
    return hide.job(body) if hide is not None else body


def _job_body(job: Job, no_worker: str | None) -> dict[str, Any]:
    progress = {"epoch": None, "step": None, "total_steps": None, "percent": None, "eta_seconds": None}
    progress.update(job.progress or {})
    return {
        "id": public_id(job), "name": job.name, "status": job.status, "attempt": job.attempt,
        "max_attempts": job.max_attempts, "failures": job.failures,
        "requested": job.config, "effective": job.effective_config, "recipe": job.recipe,
        "config": job.config,  # = requested, unchanged for the clients that read it; what runs is "effective"
        "request": job.request or {}, "progress": progress, "latest_metrics": job.latest_metrics or {},
        "balance": job.balance or {}, "artifacts": job.artifacts or {}, "model_id": job.model_id,
        "error": job.error, "status_detail": status_detail(job, no_worker),
        "created_at": _iso(job.created_at), "updated_at": _iso(job.updated_at),
        "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at),
        "metadata": (job.request or {}).get("metadata") or {},
    }


def attempt_dict(row: JobAttempt) -> dict[str, Any]:
    return {"number": row.attempt, "worker": row.worker, "started_at": _iso(row.started_at),
            "ended_at": _iso(row.ended_at), "outcome": row.outcome, "reason": row.detail}


def model_dict(row: ModelRow, hide: PathHider | None = None, active_id: str | None = None) -> dict[str, Any]:
    """``active``: whether ``active_id`` (read from the models dir's pointer, the one place that says it) is this
    row."""
    return {"id": row.id, "job_id": row.job_id, "status": row.status, "active": row.id == active_id,
            "bundle_dir": hide.path(row.bundle_dir) if hide is not None and row.bundle_dir else row.bundle_dir,
            "sha256": row.sha256, "created_at": _iso(row.created_at),
            "model_json": hide.deep(row.model_json or {}) if hide is not None else row.model_json or {}}


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        at, job_id = base64.urlsafe_b64decode(padded.encode()).decode().split("|", 1)
        parsed = dt.datetime.fromisoformat(at)
        if parsed.tzinfo is None:
            raise ValueError("naive")
        return parsed, job_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, "validation_error", "cursor: not a cursor returned by this API", "cursor") from exc
