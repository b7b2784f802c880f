"""Celery tasks (the module services/worker/app.py includes). A message carries only ids; everything else is
read from the DB (a job, under a lease) or the models folder (an index build)."""

from __future__ import annotations

import logging

from celery.signals import worker_shutting_down

from services.corpus import tasks as corpus_tasks  # its excb.corpus_chunk task; corpus jobs' coordinator
from services.index import jobs as index_jobs
from services.settings import get_settings
from services.worker import liveness
from services.worker.app import TASK_RUN_JOB, app
from services.worker.database import database
from services.worker.runner import SHUTDOWN, JobRunner

log = logging.getLogger("excb.worker")


@worker_shutting_down.connect
def _on_shutdown(**_: object) -> None:
    SHUTDOWN.set()


@app.task(name=TASK_RUN_JOB, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(self, job_id: str) -> str:
    """Run (or skip, if it is a duplicate delivery) one training job."""
    liveness.CURRENT_JOB = job_id
    try:
        outcome = corpus_tasks.run_if_corpus(database(), get_settings(), job_id, app) \
            or JobRunner(database(), get_settings(), job_id, celery=app).run()
    finally:
        liveness.CURRENT_JOB = None
    log.info("job %s: %s", job_id, outcome)
    return outcome


@app.task(name=index_jobs.TASK_BUILD_INDEX, acks_late=False)
def build_index(model_id: str, source: str, name: str, sample: int, seed: int) -> str:
    """``POST /v1/models/{id}/index``: build the index the control plane queued (services/index/jobs.py)."""
    return index_jobs.build_requested(get_settings(), model_id, source, name, sample, seed)
