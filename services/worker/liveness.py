"""Worker liveness: a heartbeat that runs only while the worker's Celery consumer runs.

The heartbeat is a Celery *consumer* bootstep, so it starts when the consumer has its broker connection and
stops when the consumer stops (shutdown, or the connection lost and the consumer restarting). It writes the
worker's row in the ``workers`` table every ``heartbeat_seconds`` (what /readyz, /v1/workers and the job views
read) and, when ``EXCB_WORKER_HEALTH_FILE`` is set, touches that file: the container health check
(`excb worker-health`) fails once the file is older than the stall window. The solo pool runs a job in the
main thread, so this is a thread of its own and keeps beating during a run.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from celery import bootsteps

from services.common.periodic import Periodic
from services.db import workers as worker_store
from services.settings import Settings, get_settings
from services.worker.database import database

log = logging.getLogger("excb.worker")

# The job this process is running now (set by the task); shown in /v1/workers.
CURRENT_JOB: str | None = None


def identity(node: str | None, queue: str | None) -> worker_store.Identity:
    """This process as the job store names it (``host:pid`` is also what ``lease_owner`` holds)."""
    host = socket.gethostname()
    return worker_store.Identity(name=f"{host}:{os.getpid()}", node=node, host=host, pid=os.getpid(), queue=queue)


def touch(path: Path) -> None:
    """Create or refresh the health file (its mtime is the heartbeat)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a"):
        pass
    os.utime(path, None)


def check_health(path: Path | None, max_age: float, now: float | None = None) -> tuple[bool, str]:
    """``(healthy, reason)`` from the health file's age: missing or stale means the consumer is gone."""
    if path is None:
        return False, "EXCB_WORKER_HEALTH_FILE is not set: the worker writes no heartbeat file"
    try:
        age = (now if now is not None else time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return False, f"{path} missing: the worker's Celery consumer is not running"
    if age > max_age:
        return False, f"{path} is {age:.0f}s old (limit {max_age:.0f}s): the worker's consumer stopped beating"
    return True, f"consumer heartbeat {age:.1f}s ago"


class HeartbeatThread(Periodic):
    """Beats into the DB and the health file at once and then every ``heartbeat_seconds`` until stopped."""

    def __init__(self, who: worker_store.Identity, settings: Settings) -> None:
        super().__init__("excb-worker-heartbeat", self.beat, settings.heartbeat_seconds, first_now=True)
        self.who, self.settings = who, settings

    def beat(self) -> None:
        """The health file and the DB row, each tried on its own; a failure is a warning, retried next beat."""
        if self.settings.worker_health_file is not None:
            try:
                touch(self.settings.worker_health_file)
            except OSError as exc:
                log.warning("cannot touch %s: %s", self.settings.worker_health_file, exc)
        try:
            worker_store.beat(database(), self.who, CURRENT_JOB)
        except Exception as exc:  # the DB is down: the jobs' own heartbeats decide what happens to them
            log.warning("worker heartbeat failed: %s", exc)

    def stop(self, join_timeout: float | None = 5) -> None:
        super().stop(join_timeout)


class ConsumerHeartbeat(bootsteps.StartStopStep):
    """The consumer bootstep that owns the heartbeat thread (registered in services.worker.app)."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.thread: HeartbeatThread | None = None

    def start(self, parent: Any) -> None:
        settings = get_settings()
        self.thread = HeartbeatThread(identity(getattr(parent, "hostname", None), settings.celery_queue), settings)
        self.thread.start()
        log.info("worker %s consuming; heartbeat every %.1fs", self.thread.who.name, settings.heartbeat_seconds)

    def stop(self, parent: Any) -> None:
        thread, self.thread = self.thread, None
        if thread is None:
            return
        thread.stop()
        settings = thread.settings
        if settings.worker_health_file is not None:
            settings.worker_health_file.unlink(missing_ok=True)
        try:
            worker_store.mark(database(), thread.who.name, "stopped", "consumer stopped")
        except Exception as exc:
            log.warning("could not mark worker %s stopped: %s", thread.who.name, exc)

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)
