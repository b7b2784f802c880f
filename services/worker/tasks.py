"""Celery tasks. The message carries only the job id; everything else is read from the DB under a lease."""

from __future__ import annotations

import logging
from functools import lru_cache

from celery.signals import worker_shutting_down

from services.db.session import Database, default_url
from services.settings import get_settings
from services.worker import liveness
from services.worker.app import TASK_RUN_JOB, app
from services.worker.runner import SHUTDOWN, JobRunner

log = logging.getLogger("excb.worker")


@lru_cache(maxsize=1)
def database() -> Database:
    """One engine per worker process (migrations run once, under the cross-process lock)."""
    settings = get_settings()
    return Database(settings.database_url or default_url(settings.home))


@worker_shutting_down.connect
def _on_shutdown(**_: object) -> None:
    SHUTDOWN.set()


@app.task(name=TASK_RUN_JOB, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(self, job_id: str) -> str:
    """Run (or skip, if it is a duplicate delivery) one training job."""
    liveness.CURRENT_JOB = job_id
    try:
        outcome = JobRunner(database(), get_settings(), job_id).run()
    finally:
        liveness.CURRENT_JOB = None
    log.info("job %s: %s", job_id, outcome)
    return outcome


from services.index.jobs import register_task  # noqa: E402 - POST /v1/models/{id}/index builds run here too

register_task(app)
