"""Hand a job id to the broker. The DB row is written first; a failed publish is retried by the reaper."""

from __future__ import annotations

import logging

from celery import Celery

from services.db import jobs as store
from services.db.session import Database
from services.queue.broker import TASK_RUN_JOB

log = logging.getLogger("excb.publish")


def publish(celery: Celery, db: Database, job_id: str, queue: str, countdown: float = 0.0) -> bool:
    """Send ``run_job(job_id)``, due in ``countdown`` seconds (a retry's back-off); mark the outbox row on success.
    Never raises: False means 'reaper will retry'."""
    try:
        celery.send_task(TASK_RUN_JOB, args=[job_id], queue=queue, retry=True, countdown=countdown or None,
                         retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
    except Exception as exc:  # broker down: the job stays QUEUED and unpublished
        log.warning("publish of %s failed (%s); the reaper will retry", job_id, exc)
        return False
    store.mark_published(db, job_id, due_in=countdown)
    return True
