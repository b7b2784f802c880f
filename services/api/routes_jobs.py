"""/v1/jobs: submit, list, show, cancel, retry, delete, logs (paged + SSE), metrics, cluster sizes, events."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal, get_args

from fastapi import APIRouter, Header, Query, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from services.api import submit as submit_mod
from services.api.guard import AuthFirstRoute
from services.api.liveness import no_worker_reason
from services.api.schemas import ClusterSizesOut, JobList, JobOut, JobSubmit, LogsOut, MetricsOut
from services.api.serialize import PathHider, attempt_dict, decode_cursor, encode_cursor, job_dict, path_hider
from services.api.state import Caller, ControlPlane, Plane
from services.api.streams import StreamSlots, held
from services.common.auth import Principal
from services.common.errors import ERROR_SCHEMA, ApiError
from services.common.tail import FileTail
from services.corpus import api as corpus_api
from services.db import jobs as store
from services.db.jobs import Conflict, LimitReached
from services.db.tables import TERMINAL, Job
from services.queue.publish import publish

_ERR = {"content": {"application/json": {"schema": ERROR_SCHEMA}}}
ERRORS: dict[int | str, dict[str, Any]] = {c: {"description": d, **_ERR} for c, d in
                                           [(401, "unauthorized"), (404, "not found"), (409, "conflict"),
                                            (413, "body too large"), (422, "invalid input"),
                                            (429, "too many jobs")]}

router = APIRouter(tags=["jobs"], responses=ERRORS, route_class=AuthFirstRoute)
StatusName = Literal["QUEUED", "STARTING", "RUNNING", "CANCELLING", "SUCCEEDED", "FAILED", "CANCELLED"]
LOG_FILES = {"job": "job.log", "train": "train.log"}


def _owned(cp: ControlPlane, who: Principal, job_id: str) -> Job:
    """The job ``job_id`` names for the caller (their client id or a server id they own); another key's job
    is a plain 404, exactly like a missing one."""
    job = store.find_owned(cp.db, who.id, job_id)
    if job is None:
        raise ApiError(404, "not_found", f"job {job_id!r} not found", "job_id")
    return job


@router.post("/jobs", status_code=201, response_model=JobOut, summary="Submit a training job")
def submit_job(body: JobSubmit, response: Response, cp: Plane, who: Caller,
               idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> dict[str, Any]:
    """Validate the config exactly like `excb train`, store the job QUEUED, publish it; idempotent on
    ``job_id`` or the ``Idempotency-Key`` header within the caller's key (a repeat returns the first job
    with 200). The server always picks the run dir, so a job never sees another job's files.
    ``"kind": "embed"`` submits a corpus embedding job instead (services/corpus/api.py)."""
    if corpus_api.is_corpus_body(body):
        return corpus_api.submit_corpus(body, response, cp, who, idempotency_key)
    settings = cp.settings
    existing = submit_mod.existing_submission(cp.db, who.id, body.job_id, idempotency_key)
    if existing is not None:
        job_id, run_dir = existing.id, Path(existing.run_dir)
    else:
        job_id, run_dir = submit_mod.fresh_run(settings)
    try:
        config = submit_mod.build_config(body, settings, run_dir,
                                         submit_mod.caller_runs(cp.db, who.id, cp.auth.enabled))
    except ApiError as exc:  # path errors name resolved paths: shown like every other path (issue 33 item 5)
        hide = _hide(cp)
        exc.message = hide.text(exc.message) if hide is not None else exc.message
        raise
    request = {"gpus": body.gpus, "memory_limit_mb": body.memory_limit_mb or settings.default_memory_limit_mb or None,
               "metadata": body.metadata}
    return submit_mod.store_and_publish(cp, who.id, response, _hide(cp), job_id=job_id, run_dir=run_dir,
                                        client_id=body.job_id, idempotency_key=idempotency_key, name=body.name,
                                        config=config, request=request,
                                        max_attempts=body.max_attempts or settings.max_attempts)


def _hide(cp: ControlPlane) -> PathHider | None:
    """How this API shows server paths to its callers (issue 13 item 11)."""
    return path_hider(cp.settings, cp.auth.enabled)


def parse_statuses(values: list[str]) -> list[str]:
    """``?status=QUEUED,RUNNING`` as documented (and repeated ``?status=``); an unknown name is a 422."""
    statuses = [s.strip().upper() for item in values for s in item.split(",") if s.strip()]
    unknown = sorted(set(statuses) - set(get_args(StatusName)))
    if unknown:
        raise ApiError(422, "validation_error", f"unknown status {unknown[0]!r}; use "
                                                f"{', '.join(get_args(StatusName))}", "status")
    return statuses


@router.get("/jobs", response_model=JobList, summary="List jobs, newest first")
def list_jobs(cp: Plane, who: Caller,
              status: list[str] | None = Query(None, description="repeat or comma-separate: "
                                               + ", ".join(get_args(StatusName))),
              limit: int = Query(50, ge=1, le=500), cursor: str | None = Query(None, max_length=512)) -> dict[str, Any]:
    statuses = parse_statuses(status or [])
    after = decode_cursor(cursor) if cursor else None
    rows = store.list_jobs(cp.db, owner=who.id, status=statuses or None, limit=limit + 1, cursor=after)
    more = len(rows) > limit
    rows = rows[:limit]
    idle = no_worker_reason(cp) if any(j.status == "QUEUED" for j in rows) else None
    hide = _hide(cp)
    return {"items": [job_dict(j, idle, hide) for j in rows],
            "next_cursor": encode_cursor(rows[-1]) if more and rows else None}


@router.get("/jobs/{job_id}", response_model=JobOut,
            summary="Job status, progress, metrics, balance, metadata and every attempt")
def show_job(job_id: str, cp: Plane, who: Caller) -> dict[str, Any]:
    job = _owned(cp, who, job_id)
    body = job_dict(job, no_worker_reason(cp) if job.status == "QUEUED" else None, _hide(cp))
    return body | {"attempts": [attempt_dict(a) for a in store.attempts(cp.db, job.id)]}


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobOut, summary="Cancel (cooperative)")
def cancel_job(job_id: str, cp: Plane, who: Caller) -> dict[str, Any]:
    job = _owned(cp, who, job_id)
    try:
        return job_dict(store.request_cancel(cp.db, job.id), hide=_hide(cp))
    except Conflict as exc:
        raise ApiError(409, "conflict", str(exc)) from exc


@router.post("/jobs/{job_id}/retry", status_code=202, response_model=JobOut,
             summary="Run a FAILED/CANCELLED job again, resuming from its last checkpoint")
def retry_job(job_id: str, cp: Plane, who: Caller) -> dict[str, Any]:
    job = _owned(cp, who, job_id)
    try:
        job = store.retry_job(cp.db, job.id, who.id, cp.settings.max_running_jobs_per_key)
    except Conflict as exc:
        raise ApiError(409, "conflict", str(exc)) from exc
    except LimitReached as exc:
        raise submit_mod.too_many(exc) from exc
    publish(cp.celery, cp.db, job.id, cp.settings.celery_queue)
    return job_dict(store.get_job(cp.db, job.id) or job, hide=_hide(cp))


@router.delete("/jobs/{job_id}", status_code=204,
               summary="Delete a finished job with its run dir (logs, checkpoints); its model stays")
def delete_job(job_id: str, cp: Plane, who: Caller) -> Response:
    job = _owned(cp, who, job_id)
    try:
        run_dir = store.delete_job(cp.db, job.id)
    except Conflict as exc:
        raise ApiError(409, "conflict", str(exc)) from exc
    submit_mod.discard_run_dir(cp.settings, run_dir)
    return Response(status_code=204)


@router.get("/jobs/{job_id}/metrics", response_model=MetricsOut, summary="Metric time series (step rows)")
def job_metrics(job_id: str, cp: Plane, who: Caller, since_step: int | None = Query(None, ge=-1, le=2**31 - 1),
                limit: int = Query(1000, ge=1, le=10000)) -> dict[str, Any]:
    job = _owned(cp, who, job_id)
    return {"items": store.metrics_since(cp.db, job.id, since_step, limit)}


@router.get("/jobs/{job_id}/cluster-sizes", response_model=ClusterSizesOut, summary="Latest sorted K*s curve")
def cluster_sizes(job_id: str, cp: Plane, who: Caller) -> dict[str, Any]:
    job = _owned(cp, who, job_id)
    if not job.cluster_sizes:
        raise ApiError(404, "not_found", "no cluster-size curve logged yet", "cluster_sizes")
    return job.cluster_sizes


@router.get("/jobs/{job_id}/logs", response_model=LogsOut, summary="Log text from a byte offset")
def job_logs(job_id: str, cp: Plane, who: Caller,
             offset: int = Query(0, ge=0, le=2**40), limit: int = Query(65536, ge=1, le=1 << 20),
             source: Literal["job", "train"] = "job") -> dict[str, Any]:
    job = _owned(cp, who, job_id)
    data, size = _read_log(Path(job.run_dir) / LOG_FILES[source], offset, limit)
    return {"offset": offset, "next_offset": offset + len(data), "size": size,
            "text": data.decode("utf-8", errors="replace")}


def _read_log(path: Path, offset: int, limit: int) -> tuple[bytes, int]:
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            fh.seek(min(offset, size))
            return fh.read(limit), size
    except FileNotFoundError:
        return b"", 0


STREAM_PING_SECONDS = 15  # comment lines keep proxies and load balancers from closing an idle stream
STREAM_RETRY_MS = 1000  # what EventSource (and our client) waits before reconnecting


def _sse(event: str, data: Any, event_id: str | None = None) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data, default=str), event=event, id=event_id)


# The largest positions an event id of ours can carry (a log byte offset, a metrics step: the DB's int32);
# a reconnect naming more did not get its id from this server: the stream starts again from the beginning.
MAX_EVENT_OFFSET = 2**40
MAX_EVENT_STEP = 2**31 - 1


def _resume_offset(last_event_id: str | None, offset: int) -> int:
    """A log stream's event id is the byte offset after its line: a reconnect resumes there."""
    if last_event_id is None:
        return offset
    try:
        resume = max(0, int(last_event_id.strip()))
    except ValueError:
        raise ApiError(422, "validation_error", "Last-Event-ID of a log stream is a byte offset",
                       "Last-Event-ID") from None
    return resume if resume <= MAX_EVENT_OFFSET else offset


@router.get("/jobs/{job_id}/logs/stream", summary="Live log lines (SSE event `log`, id = next byte offset)",
            response_class=EventSourceResponse)
async def job_logs_stream(job_id: str, request: Request, cp: Plane, who: Caller, offset: int = Query(0, ge=0, le=2**40),
                          source: Literal["job", "train"] = "job",
                          max_seconds: float = Query(3600, gt=0, le=86400),
                          last_event_id: Annotated[str | None, Header(max_length=64)] = None) -> EventSourceResponse:
    """Ends with event ``end`` when the job is terminal. A stream also closes at ``max_seconds`` (capped by
    EXCB_STREAM_MAX_SECONDS) without ``end``: reconnect with ``Last-Event-ID`` (or ``offset``) to go on."""
    job = await run_in_threadpool(_owned, cp, who, job_id)
    path = Path(job.run_dir) / LOG_FILES[source]
    max_seconds = min(max_seconds, cp.settings.stream_max_seconds)
    start = _resume_offset(last_event_id, offset)

    async def lines() -> AsyncIterator[ServerSentEvent]:
        follower = FileTail(path, start, chunk=1 << 20)
        deadline = time.monotonic() + max_seconds
        while time.monotonic() < deadline:
            for line, end in follower.text_lines():
                yield _sse("log", {"line": line, "offset": end}, str(end))
            current = await run_in_threadpool(store.get_job, cp.db, job.id)
            if current is None or current.status in TERMINAL:
                for line, end in follower.text_lines(final=True):
                    yield _sse("log", {"line": line, "offset": end}, str(end))
                yield _sse("end", {"status": current.status if current else "DELETED"}, str(follower.offset))
                return
            await asyncio.sleep(0.5)

    return _stream(request, cp, who, lines(), max_seconds)


def _stream(request: Request, cp: ControlPlane, who: Principal, body: AsyncIterator[ServerSentEvent],
            max_seconds: float) -> EventSourceResponse:
    """An SSE response (sse-starlette: pings, disconnect handling) holding one of the key's stream slots
    (429 + Retry-After when all are taken)."""
    slots = _slots(request, cp)
    slot = slots.acquire(who.id, max_seconds)
    return EventSourceResponse(held(slots, who.id, slot, _with_retry(body)), ping=STREAM_PING_SECONDS,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _with_retry(body: AsyncIterator[ServerSentEvent]) -> AsyncIterator[ServerSentEvent]:
    """The reconnection delay first, so a client that loses the stream knows when to come back."""
    yield ServerSentEvent(comment="stream open", retry=STREAM_RETRY_MS)
    async for event in body:
        yield event


def _slots(request: Request, cp: ControlPlane) -> StreamSlots:
    slots = getattr(request.app.state, "stream_slots", None)
    if slots is None:
        slots = request.app.state.stream_slots = StreamSlots(cp.settings.max_streams_per_key)
    return slots


@router.get("/jobs/{job_id}/events", summary="Live job events for the dashboard (SSE)",
            response_class=EventSourceResponse)
async def job_events(job_id: str, request: Request, cp: Plane, who: Caller,
                     max_seconds: float = Query(3600, gt=0, le=86400),
                     last_event_id: Annotated[str | None, Header(max_length=64)] = None) -> EventSourceResponse:
    """Events: ``status`` (the Job), ``metrics`` (one step row), ``cluster_sizes`` (curve), ``log`` (line).
    The stream ends with ``end`` after the job reaches a terminal status. Ids are ``STEP:OFFSET`` (last metrics
    step sent, log byte offset): a reconnect with ``Last-Event-ID`` resends the status and curve snapshots and
    goes on after them, so nothing is lost or repeated across the EXCB_STREAM_MAX_SECONDS cap."""
    job = await run_in_threadpool(_owned, cp, who, job_id)
    max_seconds = min(max_seconds, cp.settings.stream_max_seconds)
    step, offset = _events_cursor(last_event_id)
    return _stream(request, cp, who, _events(cp, job.id, max_seconds, step, offset), max_seconds)


def _event_id(step: int, offset: int) -> str:
    """The position after an event: last metrics step sent, log bytes sent (what a reconnect resumes from)."""
    return f"{step}:{offset}"


def _events_cursor(last_event_id: str | None) -> tuple[int, int]:
    if last_event_id is None:
        return -1, 0
    try:
        step, offset = (int(part) for part in last_event_id.split(":", 1))
    except ValueError:
        raise ApiError(422, "validation_error", "Last-Event-ID of an event stream is STEP:OFFSET",
                       "Last-Event-ID") from None
    if step > MAX_EVENT_STEP or offset > MAX_EVENT_OFFSET:
        return -1, 0
    return max(step, -1), max(offset, 0)


async def _events(cp: ControlPlane, job_id: str, max_seconds: float, last_step: int,
                  offset: int) -> AsyncIterator[ServerSentEvent]:
    last_update, last_curve = None, None
    follower: FileTail | None = None
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        job = await run_in_threadpool(store.get_job, cp.db, job_id)
        if job is None:
            yield _sse("end", {"status": "DELETED"})
            return
        follower = follower or FileTail(Path(job.run_dir) / "job.log", offset, chunk=1 << 20)
        if job.updated_at != last_update:
            last_update = job.updated_at
            idle = await run_in_threadpool(no_worker_reason, cp) if job.status == "QUEUED" else None
            yield _sse("status", job_dict(job, idle, _hide(cp)), _event_id(last_step, follower.offset))
        rows = await run_in_threadpool(store.metrics_since, cp.db, job_id, last_step, 500)
        for row in rows:
            last_step = max(last_step, int(row.get("step", last_step)))
            yield _sse("metrics", row, _event_id(last_step, follower.offset))
        curve = job.cluster_sizes
        if curve and curve.get("step") != last_curve:
            last_curve = curve.get("step")
            yield _sse("cluster_sizes", curve, _event_id(last_step, follower.offset))
        for line, end in follower.text_lines(final=job.status in TERMINAL):
            yield _sse("log", {"line": line}, _event_id(last_step, end))
        if job.status in TERMINAL:
            yield _sse("end", {"status": job.status}, _event_id(last_step, follower.offset))
            return
        await asyncio.sleep(0.5)
