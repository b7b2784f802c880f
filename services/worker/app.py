"""The workers' Celery app: the shared broker settings (services/queue/broker.py) plus what only a worker
process needs, its consumer heartbeat and logging in the project's format."""

from __future__ import annotations

from typing import Any

from celery.signals import setup_logging

from services.common.logging import configure_if_unset, configure_logging
from services.queue.broker import TASK_RUN_JOB, make_celery
from services.settings import get_settings
from services.worker.liveness import ConsumerHeartbeat

__all__ = ["TASK_RUN_JOB", "app"]


@setup_logging.connect
def _one_log_format(**_: Any) -> None:
    """Workers log like the API and the embed service (services.common.logging), not in Celery's own format:
    connecting this signal is how Celery is told to leave logging alone."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)


_settings = get_settings()
configure_if_unset(_settings.log_level, _settings.log_json)  # the worker's start-up warnings too
app = make_celery(_settings)
app.steps["consumer"].add(ConsumerHeartbeat)  # worker liveness for /readyz, /v1/workers, the health check
