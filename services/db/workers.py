"""Worker liveness rows: written by each Celery worker's heartbeat, by `excb up`'s supervisor when a worker it
started dies, and read by /readyz, /v1/workers and the job views ("queued, but no worker is alive")."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import and_, or_, select, update

from services.db.session import Database
from services.db.tables import ACTIVE, Job, JobAttempt, WorkerRow, utcnow

ALIVE = "alive"


@dataclass(frozen=True)
class Identity:
    """Who a heartbeat is from: ``name`` (``host:pid``, the jobs' ``lease_owner``) and its Celery node name."""

    name: str
    node: str | None
    host: str
    pid: int
    queue: str | None


def beat(db: Database, who: Identity, job_id: str | None) -> None:
    """Upsert this worker's row as alive now (one row per process; only that process writes it while alive)."""
    now = utcnow()
    with db.session() as s:
        row = s.get(WorkerRow, who.name)
        if row is None:
            s.add(WorkerRow(name=who.name, node=who.node, host=who.host, pid=who.pid, queue=who.queue,
                            state=ALIVE, job_id=job_id, started_at=now, heartbeat_at=now))
            return
        row.state, row.job_id, row.heartbeat_at, row.detail = ALIVE, job_id, now, None


def mark(db: Database, name: str, state: str, detail: str | None = None) -> None:
    """Record that a worker stopped (its consumer ended) or died (seen by a supervisor); keeps its last beat."""
    with db.session() as s:
        s.execute(update(WorkerRow).where(WorkerRow.name == name).values(state=state, detail=detail, job_id=None))


def recent(db: Database, since_seconds: float) -> list[WorkerRow]:
    """Workers alive by state or heard from within ``since_seconds``, newest heartbeat first."""
    cutoff = utcnow() - dt.timedelta(seconds=since_seconds)
    q = select(WorkerRow).where(or_(WorkerRow.heartbeat_at >= cutoff, WorkerRow.state == ALIVE))
    with db.session() as s:
        return list(s.scalars(q.order_by(WorkerRow.heartbeat_at.desc()).limit(200)))


def is_live(row: WorkerRow, stall_seconds: float, now: dt.datetime | None = None) -> bool:
    """Alive by its own word and heard from within the stall window."""
    now = now or utcnow()
    return row.state == ALIVE and (now - row.heartbeat_at).total_seconds() <= stall_seconds


def leased_jobs(db: Database, worker_name: str) -> list[tuple[Job, int | None]]:
    """Active jobs whose lease ``worker_name`` holds, each with the pid of its current attempt's trainer."""
    q = (select(Job, JobAttempt.pid)
         .join(JobAttempt, and_(JobAttempt.job_id == Job.id, JobAttempt.lease_token == Job.lease_token), isouter=True)
         .where(Job.lease_owner == worker_name, Job.status.in_(list(ACTIVE))))
    with db.session() as s:
        return [(job, pid) for job, pid in s.execute(q)]
