"""Job-store operations shared by the API, the workers and the reaper.

Every state change is a single conditional UPDATE (compare-and-set on status and, for workers, on the
fencing token ``lease_token``), so concurrent actors can never both win a transition.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any, Sequence, cast

from sqlalchemy import CursorResult, Result, and_, delete, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.db.session import Database
from services.db.tables import ACTIVE, TERMINAL, Job, JobAttempt, JobMetric, utcnow


def _rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE/DELETE matched. Session.execute is typed to return Result for any statement; for DML it
    returns a CursorResult (SQLAlchemy's documented type for it), which is what carries ``rowcount``."""
    return cast(CursorResult[Any], result).rowcount


class Conflict(Exception):
    """The request clashes with the job's state or with another job (maps to 409)."""


class LimitReached(Exception):
    """The owner already has its quota of queued or running jobs (maps to 429)."""


@dataclass(frozen=True)
class Lease:
    """What a worker holds while it runs a job: the fencing token and the attempt number."""

    job_id: str
    token: int
    attempt: int


# --- API side ---------------------------------------------------------------------------------------

def scoped(owner: str | None, name: str) -> str:
    """A client-chosen name (job id, idempotency key) within its owner's namespace."""
    return f"{owner or ''}:{name}"


def create_job(db: Database, *, job_id: str, client_id: str | None = None, owner: str | None,
               idempotency_key: str | None, name: str | None, config: dict[str, Any], request: dict[str, Any],
               run_dir: str, max_attempts: int, max_active: int | None = None) -> tuple[Job, bool]:
    """Insert a QUEUED job under the server id ``job_id``; return ``(job, created)``.

    A repeated Idempotency-Key or client ``job_id`` *of the same owner* returns the first job (409 when its
    config differs); another owner's names are a different namespace, so they neither clash nor leak.
    ``max_active`` (per owner) is checked in the inserting transaction: concurrent submits cannot overshoot."""
    scoped_key = scoped(owner, idempotency_key) if idempotency_key else None
    ref = scoped(owner, client_id) if client_id else None
    existing = _find_duplicate(db, ref, scoped_key)
    if existing is not None:
        return _check_same(existing, config), False
    now = utcnow()
    job = Job(id=job_id, idempotency_key=scoped_key, client_ref=ref, owner=owner, name=name, status="QUEUED",
              config=config, request=request, run_dir=run_dir, attempt=0, failures=0, max_attempts=max_attempts,
              lease_token=0, cancel_requested=False, publish_count=0, progress={}, latest_metrics={}, balance={},
              artifacts={}, created_at=now, updated_at=now)
    try:
        with db.session() as s:
            _admit(s, owner, max_active)
            s.add(job)
    except IntegrityError:
        existing = _find_duplicate(db, ref, scoped_key)
        if existing is None:
            raise
        return _check_same(existing, config), False
    return job, True


def _find_duplicate(db: Database, ref: str | None, scoped_key: str | None) -> Job | None:
    with db.session() as s:
        if scoped_key is not None:
            hit = s.scalar(select(Job).where(Job.idempotency_key == scoped_key))
            if hit is not None:
                return hit
        return s.scalar(select(Job).where(Job.client_ref == ref)) if ref is not None else None


def _check_same(job: Job, config: dict[str, Any]) -> Job:
    if {k: v for k, v in job.config.items() if k != "out"} != {k: v for k, v in config.items() if k != "out"}:
        raise Conflict(f"job {public_id(job)!r} already exists with a different config")
    return job


def public_id(job: Job) -> str:
    """The id the owner knows the job by: the client's ``job_id`` when one was given, else the server id."""
    return job.client_ref.partition(":")[2] if job.client_ref else job.id


def find_by_key(db: Database, owner: str | None, idempotency_key: str) -> Job | None:
    """The job first submitted with this Idempotency-Key by this owner."""
    with db.session() as s:
        return s.scalar(select(Job).where(Job.idempotency_key == scoped(owner, idempotency_key)))


def find_client_job(db: Database, owner: str | None, client_id: str) -> Job | None:
    """The owner's job submitted with this client ``job_id``."""
    with db.session() as s:
        return s.scalar(select(Job).where(Job.client_ref == scoped(owner, client_id)))


def find_owned(db: Database, owner: str | None, ref: str) -> Job | None:
    """The job ``ref`` names for ``owner``: their client ``job_id`` first, else a server id they own.

    ``owner=None`` (auth off) sees every job by server id. Another owner's job is None, exactly like a
    missing one, so existence never crosses keys."""
    job = find_client_job(db, owner, ref) or get_job(db, ref)
    if job is None or (owner is not None and job.owner != owner):
        return None
    return job


def owned_ids(db: Database, owner: str | None, job_ids: Sequence[str]) -> set[str]:
    """Which of these server job ids belong to ``owner`` (operational views show a key only its own jobs)."""
    if not job_ids:
        return set()
    with db.session() as s:
        return set(s.scalars(select(Job.id).where(Job.id.in_(list(job_ids)), Job.owner == owner)))


def get_job(db: Database, job_id: str) -> Job | None:
    with db.session() as s:
        return s.get(Job, job_id)


def list_jobs(db: Database, *, owner: str | None, status: Sequence[str] | None, limit: int,
              cursor: tuple[dt.datetime, str] | None) -> list[Job]:
    """Newest first, keyset-paginated on ``(created_at, id)``."""
    q = select(Job)
    if owner is not None:
        q = q.where(Job.owner == owner)
    if status:
        q = q.where(Job.status.in_(list(status)))
    if cursor is not None:
        at, jid = cursor
        q = q.where(or_(Job.created_at < at, and_(Job.created_at == at, Job.id < jid)))
    q = q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    with db.session() as s:
        return list(s.scalars(q))


def _count_active(s: Session, owner: str | None) -> int:
    """Jobs of ``owner`` that are queued or running (the per-key limit)."""
    q = select(func.count()).select_from(Job).where(Job.status.in_(["QUEUED", *ACTIVE]))
    q = q.where(Job.owner.is_(None) if owner is None else Job.owner == owner)
    return int(s.scalar(q) or 0)


def _admit(s: Session, owner: str | None, max_active: int | None) -> None:
    """Hold the owner's admission lock for the rest of the transaction, then check its quota.

    PostgreSQL: a transaction-scoped advisory lock per owner; SQLite: ``BEGIN IMMEDIATE`` (the database
    write lock, taken before the count). Either way count + write is one atomic step."""
    if max_active is None or owner is None:
        return
    if s.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"excb-admit:{owner}".encode()).digest()[:8], "big", signed=True)
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
    else:
        s.execute(text("BEGIN IMMEDIATE"))
    if _count_active(s, owner) >= max_active:
        raise LimitReached(f"this key already has {max_active} queued or running jobs")


def mark_published(db: Database, job_id: str, due_in: float = 0.0) -> None:
    """Record that a Celery message for this QUEUED job was handed to the broker (the outbox mark). A message
    due later (a retry's back-off) is marked at its due time, so the reaper's lost-message sweep does not
    publish it again early."""
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status == "QUEUED")
                  .values(enqueued_at=utcnow() + dt.timedelta(seconds=max(0.0, due_in)),
                          publish_count=Job.publish_count + 1))


def request_cancel(db: Database, job_id: str) -> Job:
    """QUEUED -> CANCELLED at once; STARTING/RUNNING -> CANCELLING (the worker finishes it); terminal -> 409."""
    now = utcnow()
    with db.session() as s:
        res = s.execute(update(Job).where(Job.id == job_id, Job.status == "QUEUED")
                        .values(status="CANCELLED", cancel_requested=True, finished_at=now, updated_at=now))
        if _rowcount(res) == 0:
            res = s.execute(update(Job).where(Job.id == job_id, Job.status.in_(["STARTING", "RUNNING"]))
                            .values(status="CANCELLING", cancel_requested=True, updated_at=now))
    job = get_job(db, job_id)
    assert job is not None
    if job.status in TERMINAL and job.status != "CANCELLED":
        raise Conflict(f"job is {job.status}; only queued or running jobs can be cancelled")
    return job


def retry_job(db: Database, job_id: str, owner: str | None = None, max_active: int | None = None) -> Job:
    """FAILED/CANCELLED -> QUEUED with a fresh failure budget; the trainer resumes from its last checkpoint.
    A retried job counts against ``max_active`` like a new one (checked atomically, as in create_job)."""
    now = utcnow()
    with db.session() as s:
        _admit(s, owner, max_active)
        res = s.execute(update(Job).where(Job.id == job_id, Job.status.in_(["FAILED", "CANCELLED"]))
                        .values(status="QUEUED", failures=0, cancel_requested=False, error=None, enqueued_at=None,
                                finished_at=None, lease_owner=None, updated_at=now))
    job = get_job(db, job_id)
    assert job is not None
    if _rowcount(res) == 0:
        raise Conflict(f"job is {job.status}; only FAILED or CANCELLED jobs can be retried")
    return job


def delete_job(db: Database, job_id: str) -> str:
    """Delete a terminal job (its metrics and attempts go with it) and return its run dir; 409 otherwise.

    The caller removes the run dir: the row is gone first, so no worker can lease the job any more."""
    with db.session() as s:
        run_dir = s.scalar(select(Job.run_dir).where(Job.id == job_id, Job.status.in_(list(TERMINAL))))
        res = s.execute(delete(Job).where(Job.id == job_id, Job.status.in_(list(TERMINAL))))
        if _rowcount(res) == 0 or run_dir is None:
            raise Conflict("only SUCCEEDED, FAILED or CANCELLED jobs can be deleted")
        s.execute(delete(JobMetric).where(JobMetric.job_id == job_id))
        s.execute(delete(JobAttempt).where(JobAttempt.job_id == job_id))
    return run_dir


def metrics_since(db: Database, job_id: str, since_step: int | None, limit: int) -> list[dict[str, Any]]:
    q = select(JobMetric).where(JobMetric.job_id == job_id)
    if since_step is not None:
        q = q.where(JobMetric.step > since_step)
    q = q.order_by(JobMetric.step).limit(limit)
    with db.session() as s:
        return [m.data for m in s.scalars(q)]


def attempts(db: Database, job_id: str) -> list[JobAttempt]:
    with db.session() as s:
        return list(s.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.id)))


# --- worker side (every write fenced by the lease token) -------------------------------------------------

# A retry is due at its publisher's clock; a worker whose clock is behind by less than this still takes it.
CLOCK_SKEW_SECONDS = 1.0


def acquire(db: Database, job_id: str, worker: str) -> Lease | None:
    """QUEUED -> STARTING with ``attempt+1`` and a new fencing token; None if the job is not ours to run.

    A duplicate delivery (job already leased, finished or cancelled) gets None and must exit at once. So does a
    message that comes before a retry is due (``enqueued_at`` in the future: release_for_retry's back-off): the
    message published for the due time runs it, an older duplicate must not skip the back-off.
    """
    now = utcnow()
    due = or_(Job.enqueued_at.is_(None), Job.enqueued_at <= now + dt.timedelta(seconds=CLOCK_SKEW_SECONDS))
    with db.session() as s:
        res = s.execute(update(Job)
                        .where(Job.id == job_id, Job.status == "QUEUED", Job.cancel_requested.is_(False),
                               Job.failures < Job.max_attempts, due)
                        .values(status="STARTING", attempt=Job.attempt + 1, lease_token=Job.lease_token + 1,
                                lease_owner=worker, heartbeat_at=now, updated_at=now, error=None,
                                started_at=func.coalesce(Job.started_at, now)))
        if _rowcount(res) != 1:
            return None
        job = s.get(Job, job_id, populate_existing=True)
        assert job is not None
        s.add(JobAttempt(job_id=job_id, attempt=job.attempt, lease_token=job.lease_token, worker=worker,
                         started_at=now))
        return Lease(job_id, job.lease_token, job.attempt)


def settle_unrunnable(db: Database, job_id: str) -> None:
    """A QUEUED job that may not start (cancel flag, attempt budget spent) is moved to its terminal state."""
    now = utcnow()
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status == "QUEUED", Job.cancel_requested.is_(True))
                  .values(status="CANCELLED", finished_at=now, updated_at=now))
        s.execute(update(Job).where(Job.id == job_id, Job.status == "QUEUED", Job.failures >= Job.max_attempts)
                  .values(status="FAILED", finished_at=now, updated_at=now,
                          error={"type": "attempts_exhausted", "message": "attempt limit reached"}))


def fenced_update(db: Database, lease: Lease, **values: Any) -> bool:
    """Write ``values`` only while ``lease`` is still current; False means the lease was lost."""
    values.setdefault("updated_at", utcnow())
    with db.session() as s:
        res = s.execute(update(Job).where(Job.id == lease.job_id, Job.lease_token == lease.token,
                                          Job.status.in_(list(ACTIVE))).values(**values))
        return _rowcount(res) == 1


def heartbeat(db: Database, lease: Lease, **values: Any) -> tuple[bool, bool]:
    """Fenced heartbeat; returns ``(still_ours, cancel_requested)``."""
    ok = fenced_update(db, lease, heartbeat_at=utcnow(), **values)
    if not ok:
        return False, False
    with db.session() as s:
        flag = s.scalar(select(Job.cancel_requested).where(Job.id == lease.job_id))
    return True, bool(flag)


def end_attempt(db: Database, lease: Lease, outcome: str, detail: str | None = None, pid: int | None = None) -> None:
    with db.session() as s:
        values: dict[str, Any] = {"ended_at": utcnow(), "outcome": outcome, "detail": detail}
        s.execute(update(JobAttempt).where(JobAttempt.job_id == lease.job_id,
                                           JobAttempt.lease_token == lease.token).values(**values))


def set_attempt_pid(db: Database, lease: Lease, pid: int) -> None:
    with db.session() as s:
        s.execute(update(JobAttempt).where(JobAttempt.job_id == lease.job_id,
                                           JobAttempt.lease_token == lease.token).values(pid=pid))


def release_for_retry(db: Database, lease: Lease, *, count_failure: bool, error: dict[str, Any] | None,
                      due_in: float = 0.0) -> str:
    """Give the job back: QUEUED (to be published again) or FAILED when the failure budget is spent. ``due_in``:
    the retry's back-off; until then ``acquire`` refuses the job (the caller publishes a message due then).

    Returns the new status, or ``"LOST"`` when the lease had already been taken away.
    """
    now = utcnow()
    due = now + dt.timedelta(seconds=due_in) if due_in > 0 else None
    bump = 1 if count_failure else 0
    with db.session() as s:
        fence = (Job.id == lease.job_id, Job.lease_token == lease.token, Job.status.in_(list(ACTIVE)))
        res = s.execute(update(Job).where(*fence, Job.failures + bump >= Job.max_attempts)
                        .values(status="FAILED", failures=Job.failures + bump, finished_at=now, updated_at=now,
                                lease_owner=None, error=error or {"type": "attempts_exhausted",
                                                                  "message": "attempt limit reached"}))
        if _rowcount(res) == 1:
            return "FAILED"
        res = s.execute(update(Job).where(*fence)
                        .values(status="QUEUED", failures=Job.failures + bump, lease_owner=None, enqueued_at=due,
                                updated_at=now, error=error))
        return "QUEUED" if _rowcount(res) == 1 else "LOST"


def replace_metrics(db: Database, job_id: str, rows: list[dict[str, Any]]) -> None:
    """Store step rows; a resumed run re-logs steps after its checkpoint, so newer rows replace older ones."""
    if not rows:
        return
    first = min(int(r["step"]) for r in rows)
    latest: dict[int, dict[str, Any]] = {int(r["step"]): r for r in rows}
    with db.session() as s:
        s.execute(delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step >= first))
        s.add_all([JobMetric(job_id=job_id, step=step, data=row) for step, row in sorted(latest.items())])


# --- reaper ----------------------------------------------------------------------------------------------

def stalled_jobs(db: Database, stall_seconds: float) -> list[Job]:
    cutoff = utcnow() - dt.timedelta(seconds=stall_seconds)
    with db.session() as s:
        return list(s.scalars(select(Job).where(Job.status.in_(list(ACTIVE)), Job.heartbeat_at < cutoff)))


def reap(db: Database, job: Job, reason: str | None = None) -> str:
    """Take a stalled job away from its (lost) worker: bump the token so the zombie is fenced out, then
    CANCELLED (if cancel was asked), FAILED (budget spent) or QUEUED for another worker. ``reason`` replaces
    the "no heartbeat" message when the caller knows why (a supervisor saw the worker process exit)."""
    now = utcnow()
    with db.session() as s:
        fence = (Job.id == job.id, Job.lease_token == job.lease_token, Job.status.in_(list(ACTIVE)))
        base = {"lease_token": Job.lease_token + 1, "lease_owner": None, "updated_at": now}
        lost = {"type": "worker_lost",
                "message": reason or f"no heartbeat from {job.lease_owner} since {job.heartbeat_at}"}
        outcome = "LOST"
        if job.cancel_requested:
            res = s.execute(update(Job).where(*fence).values(status="CANCELLED", finished_at=now, **base))
            outcome = "CANCELLED" if _rowcount(res) else "LOST"
        else:
            res = s.execute(update(Job).where(*fence, Job.failures + 1 >= Job.max_attempts)
                            .values(status="FAILED", failures=Job.failures + 1, finished_at=now, error=lost, **base))
            if _rowcount(res):
                outcome = "FAILED"
            else:
                res = s.execute(update(Job).where(*fence).values(status="QUEUED", failures=Job.failures + 1,
                                                                 enqueued_at=None, error=lost, **base))
                outcome = "QUEUED" if _rowcount(res) else "LOST"
        if outcome != "LOST":
            s.execute(update(JobAttempt).where(JobAttempt.job_id == job.id, JobAttempt.lease_token == job.lease_token,
                                               JobAttempt.ended_at.is_(None))
                      .values(ended_at=now, outcome="worker_lost"))
        return outcome


def unpublished_jobs(db: Database, requeue_after_seconds: float) -> list[str]:
    """QUEUED jobs never published, or published so long ago that the message may have been lost."""
    cutoff = utcnow() - dt.timedelta(seconds=requeue_after_seconds)
    with db.session() as s:
        q = select(Job.id).where(Job.status == "QUEUED", or_(Job.enqueued_at.is_(None), Job.enqueued_at < cutoff))
        return list(s.scalars(q.order_by(Job.created_at)))
