"""The corpus jobs' Celery side: the ``excb.corpus_chunk`` task (a helper embedding one chunk) and
:func:`run_if_corpus`, which ``excb.run_job`` calls first so a corpus job's own message runs its coordinator
instead of the trainer. ``services/worker/tasks.py`` imports this module (which registers the task with the
worker's app) and calls :func:`run_if_corpus`."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from services.corpus.runner import TASK_EMBED_CHUNK, CorpusJob, is_corpus_config, run_chunk
from services.db import jobs as store
from services.db.session import Database
from services.queue.publish import publish
from services.settings import Settings, get_settings
from services.worker import liveness
from services.worker.database import database
from services.worker.runner import celery_stopping, worker_name

log = logging.getLogger("excb.corpus")


def run_if_corpus(db: Database, settings: Settings, job_id: str, celery_app: Any) -> str | None:
    """Run job ``job_id``'s coordinator when it is a corpus job; None for any other job (the trainer's)."""
    job = store.get_job(db, job_id)
    if job is None or not is_corpus_config(job.config):
        return None
    def send_chunk(jid: str, index: int) -> None:
        celery_app.send_task(TASK_EMBED_CHUNK, args=[jid, index], queue=settings.celery_queue)

    def republish(delay: float) -> None:
        publish(celery_app, db, job_id, settings.celery_queue, countdown=delay)

    return CorpusJob(db, settings, job_id, worker_name(), send_chunk, republish, celery_stopping).run()


@shared_task(name=TASK_EMBED_CHUNK, acks_late=True, reject_on_worker_lost=True)
def embed_chunk_task(job_id: str, index: int) -> str:
    """``excb.corpus_chunk(job_id, index)``: late ack, so a chunk whose worker died is delivered again (and then
    finds its chunk done, claimed, or still to do)."""
    liveness.CURRENT_JOB = job_id  # GET /v1/workers shows helpers on the job too
    try:
        outcome = run_chunk(database(), get_settings(), job_id, int(index), worker_name(), celery_stopping)
    finally:
        liveness.CURRENT_JOB = None
    log.info("corpus job %s chunk %d: %s", job_id, index, outcome)
    return outcome
