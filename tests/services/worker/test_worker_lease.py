"""Lease, fencing token, attempt budget and reaper rules of the job store, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from sqlalchemy import update

from services.db import jobs as store
from services.db.session import Database
from services.db.tables import Job


def _job(db: Database, job_id: str = "j1", max_attempts: int = 3) -> None:
    store.create_job(db, job_id=job_id, owner=None, idempotency_key=None, name=None, config={"x": 1},
                     request={}, run_dir="/tmp/none", max_attempts=max_attempts)


def _age_heartbeat(db: Database, job_id: str, seconds: float) -> None:
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id)
                  .values(heartbeat_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds)))


def test_duplicate_delivery_gets_no_lease(db_url: str) -> None:
    db = Database(db_url)
    _job(db)
    lease = store.acquire(db, "j1", "w1")
    assert lease is not None and lease.attempt == 1
    assert store.acquire(db, "j1", "w2") is None  # the second message exits at once
    assert store.get_job(db, "j1").lease_owner == "w1"


def test_concurrent_acquire_has_one_winner(db_url: str) -> None:
    db = Database(db_url)
    _job(db)
    results: list[Any] = []
    barrier = threading.Barrier(6)

    def grab(i: int) -> None:
        barrier.wait()
        results.append(store.acquire(db, "j1", f"w{i}"))

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1
    assert len(store.attempts(db, "j1")) == 1


def test_reaped_worker_is_fenced_out(db_url: str) -> None:
    db = Database(db_url)
    _job(db)
    old = store.acquire(db, "j1", "w1")
    assert old is not None and store.fenced_update(db, old, status="RUNNING")
    assert store.stalled_jobs(db, 60) == []
    _age_heartbeat(db, "j1", 120)
    [stalled] = store.stalled_jobs(db, 60)
    assert store.reap(db, stalled) == "QUEUED"
    assert store.reap(db, stalled) == "LOST"  # a second reaper pass (or replica) does nothing
    assert store.heartbeat(db, old) == (False, False)  # the zombie can neither heartbeat ...
    assert not store.fenced_update(db, old, status="SUCCEEDED")  # ... nor commit
    job = store.get_job(db, "j1")
    assert job.status == "QUEUED" and job.failures == 1 and job.error["type"] == "worker_lost"
    new = store.acquire(db, "j1", "w2")
    assert new is not None and new.attempt == 2 and new.token > old.token
    outcomes = [a.outcome for a in store.attempts(db, "j1")]
    assert outcomes == ["worker_lost", None]


def test_attempt_budget_ends_in_failed(db_url: str) -> None:
    db = Database(db_url)
    _job(db, max_attempts=2)
    for expected in ("QUEUED", "FAILED"):
        lease = store.acquire(db, "j1", "w")
        assert lease is not None
        assert store.release_for_retry(db, lease, count_failure=True,
                                       error={"type": "crashed", "message": "x"}) == expected
    assert store.acquire(db, "j1", "w") is None
    job = store.get_job(db, "j1")
    assert job.status == "FAILED" and job.attempt == 2 and job.failures == 2


def test_preemption_does_not_spend_the_budget(db_url: str) -> None:
    db = Database(db_url)
    _job(db, max_attempts=1)
    for _ in range(3):
        lease = store.acquire(db, "j1", "w")
        assert lease is not None
        assert store.release_for_retry(db, lease, count_failure=False, error=None) == "QUEUED"
    assert store.get_job(db, "j1").attempt == 3


def test_a_retry_is_not_leased_before_its_back_off_is_over(db_url: str) -> None:
    """A counted retry released with a back-off: a message that comes early (the submit's duplicate, a republish)
    gets no lease; once due, the job is leased; the lost-message sweep leaves it alone meanwhile."""
    db = Database(db_url)
    _job(db)
    lease = store.acquire(db, "j1", "w1")
    assert lease is not None
    err = {"type": "disk_full", "message": "disk full"}
    assert store.release_for_retry(db, lease, count_failure=True, error=err, due_in=60) == "QUEUED"
    assert store.acquire(db, "j1", "w2") is None
    assert "j1" not in store.unpublished_jobs(db, 5)
    with db.session() as s:  # the back-off is over
        s.execute(update(Job).where(Job.id == "j1")
                  .values(enqueued_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))
    again = store.acquire(db, "j1", "w2")
    assert again is not None and again.attempt == 2


def test_cancel_flag_and_unpublished_sweep(db_url: str) -> None:
    db = Database(db_url)
    _job(db, "a")
    _job(db, "b")
    assert sorted(store.unpublished_jobs(db, 60)) == ["a", "b"]
    store.mark_published(db, "a")
    assert store.unpublished_jobs(db, 60) == ["b"]
    lease = store.acquire(db, "a", "w")
    assert lease is not None
    assert store.request_cancel(db, "a").status == "CANCELLING"
    assert store.heartbeat(db, lease) == (True, True)
    _age_heartbeat(db, "a", 120)
    [stalled] = store.stalled_jobs(db, 60)
    assert store.reap(db, stalled) == "CANCELLED"  # a lost worker of a cancelling job ends it
