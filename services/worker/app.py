"""The workers' Celery app: the shared broker settings (services/queue/broker.py) plus what only a worker
process needs, its consumer heartbeat, logging in the project's format and the modules its tasks live in.

Tasks are registered by the modules in :data:`TASK_MODULES` (Celery imports them when the worker starts; this
module imports none of them, so they may import ``app``): ``services.worker.tasks`` holds the job and index-build
tasks. A new kind of task adds its module here."""

from __future__ import annotations

from typing import Any

from celery.signals import setup_logging

from services.common.logging import configure_if_unset, configure_logging
from services.queue.broker import TASK_RUN_JOB, make_celery
from services.settings import get_settings
from services.worker.liveness import ConsumerHeartbeat

__all__ = ["TASK_MODULES", "TASK_RUN_JOB", "app"]

TASK_MODULES: tuple[str, ...] = ("services.worker.tasks",)


@setup_logging.connect
def _one_log_format(**_: Any) -> None:
    """Workers log like the API and the embed service (services.common.logging), not in Celery's own format:
    connecting this signal is how Celery is told to leave logging alone."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)


_settings = get_settings()
configure_if_unset(_settings.log_level, _settings.log_json)  # the worker's start-up warnings too
app = make_celery(_settings, include=TASK_MODULES)
app.steps["consumer"].add(ConsumerHeartbeat)  # worker liveness for /readyz, /v1/workers, the health check
