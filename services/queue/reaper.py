"""The sweeper: requeues jobs whose worker stopped heartbeating and republishes QUEUED jobs whose message
may have been lost (broker restart, publish failure, API killed between commit and publish).

It runs as a thread inside each control-plane process rather than as celery beat: it needs the DB, not the
broker, to decide anything, and every action is a compare-and-set on the job row, so several API replicas
sweeping at once cannot double-requeue. Duplicate messages it may create are dropped by the worker's lease.
"""

from __future__ import annotations

import logging

from celery import Celery

from services.common.periodic import Periodic
from services.db import jobs as store
from services.db.session import Database
from services.queue.publish import publish
from services.settings import Settings

log = logging.getLogger("excb.reaper")


def sweep(db: Database, celery: Celery, settings: Settings) -> dict[str, int]:
    """One pass; returns counts per action (for logs, metrics and tests)."""
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "published": 0}
    for job in store.stalled_jobs(db, settings.stall_seconds):
        outcome = store.reap(db, job)
        log.warning("job %s: no heartbeat since %s -> %s", job.id, job.heartbeat_at, outcome)
        key = {"QUEUED": "requeued", "FAILED": "failed", "CANCELLED": "cancelled"}.get(outcome)
        if key:
            counts[key] += 1
    for job_id in store.unpublished_jobs(db, settings.requeue_after_seconds):
        if publish(celery, db, job_id, settings.celery_queue):
            counts["published"] += 1
    return counts


class Reaper(Periodic):
    """Calls :func:`sweep` every ``reaper_interval_seconds`` until stopped."""

    def __init__(self, db: Database, celery: Celery, settings: Settings) -> None:
        super().__init__("excb-reaper", lambda: sweep(db, celery, settings), settings.reaper_interval_seconds)
