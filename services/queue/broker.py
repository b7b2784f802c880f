"""The Celery app's broker and settings, shared by the control plane (which publishes) and the workers.

Broker: Redis when ``EXCB_REDIS_URL`` is set, else kombu's SQLAlchemy transport on a SQLite file under
``Settings.home`` (embedded mode: no server to run).

Why the SQLAlchemy transport for embedded mode: it is a real Celery transport that many processes can share
through one SQLite file with transactional gets (the filesystem transport relies on ``rename``/locks per
message and has no way to list queue depth cheaply). Lost messages (either transport) are harmless because the
job row is the truth and the reaper republishes QUEUED jobs (see services/queue/reaper.py).

Settings follow reliability.md rows 1-4, 8, 11, 13: late ack + reject on worker loss, prefetch 1, one task per
child, JSON only, no result backend, a visibility timeout far above any job (the DB lease is the real guard).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from celery import Celery

from services.settings import Settings

TASK_RUN_JOB = "excb.run_job"


def broker_url(settings: Settings) -> str:
    """Redis if configured, else the embedded SQLite-backed transport."""
    if settings.redis_url:
        return settings.redis_url
    home = Path(settings.home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqla+sqlite:///{home / 'broker.sqlite'}"


def _transport_options(settings: Settings) -> dict[str, object]:
    """Redis: a visibility timeout above any job. SQLAlchemy: options go to ``create_engine`` (busy timeout)."""
    if settings.redis_url:
        return {"visibility_timeout": settings.visibility_timeout_seconds, "polling_interval": 0.5}
    return {"connect_args": {"timeout": 30}}


def make_celery(settings: Settings, include: Sequence[str] = ()) -> Celery:
    """Build the app from settings (tests build one per Redis db / queue). ``include``: the modules that define
    tasks, imported when a worker starts (services/worker/app.py names them); a publisher needs none, it sends
    tasks by name."""
    app = Celery("excb", broker=broker_url(settings), include=list(include))
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings),
        task_default_queue=settings.celery_queue,
        task_routes={TASK_RUN_JOB: {"queue": settings.celery_queue}},
        broker_pool_limit=2,
    )
    return app
