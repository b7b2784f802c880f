"""`excb up`: the whole system on one machine, no Redis and no Docker.

One process serves the control plane, the embed service (same port) and the dashboard, and runs the reaper
thread; worker processes (`celery worker --pool=solo`, one job each) are started beside it by a supervisor
thread that restarts them when they die and requeues their job at once (services/worker/supervisor.py), and
stopped with SIGTERM on exit (a running job checkpoints and goes back to QUEUED). State lives under ``--home``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from services.common.process import die_with_parent

log = logging.getLogger("excb.up")


def worker_command(queue: str, name: str) -> list[str]:
    """A Celery worker that runs one job at a time in its main process (solo pool, prefetch 1); ``--quiet``
    drops the start-up banner (``excb up`` prints its own summary line)."""
    return [sys.executable, "-m", "celery", "-A", "services.worker.app", "--quiet", "worker", "--pool=solo",
            "--concurrency=1", "--prefetch-multiplier=1", "-Q", queue, "-n", name, "--loglevel=INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]


def _configure_env(home: Path | None, data_roots: list[Path]) -> None:
    """Settings travel to the worker processes through the environment."""
    if home is not None:
        os.environ["EXCB_HOME"] = str(home.expanduser().resolve())
    if data_roots:
        os.environ["EXCB_DATA_ROOTS"] = json.dumps([str(p.expanduser().resolve()) for p in data_roots])


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    """A worker in its own process group that dies with `excb up` (no orphan keeps consuming)."""
    return subprocess.Popen(argv, preexec_fn=die_with_parent)


def run_embedded(host: str, port: int, home: Path | None, data_roots: list[Path], workers: int = 1,
                 api_key: str | None = None) -> int:
    """Start the supervised workers, then serve HTTP until interrupted; returns the exit status. ``api_key``
    stays in this process (the workers need none), beside EXCB_API_KEY / the keys file."""
    from pydantic import SecretStr

    from services.common.logging import configure_logging
    from services.settings import get_settings

    _configure_env(home, data_roots)
    get_settings.cache_clear()
    settings = get_settings()
    if api_key:
        settings = settings.model_copy(update={"api_key": SecretStr(api_key)})
    configure_logging(settings.log_level, settings.log_json)  # before the imports below log anything

    import uvicorn

    from services.api.app import create_app
    from services.worker.supervisor import WorkerSupervisor

    Path(settings.home).mkdir(parents=True, exist_ok=True)
    app = create_app(settings, embedded=True)  # migrates the DB before any worker opens it
    cp = app.state.plane
    supervisor = WorkerSupervisor(cp.db, cp.celery, settings, max(1, workers),
                                  lambda node: worker_command(settings.celery_queue, node), _spawn)
    cp.supervisor = supervisor
    supervisor.start_workers()
    log.info("excb up: http://%s:%d (home %s, %d supervised worker(s), broker %s)", host, port, settings.home,
             len(supervisor.slots), "redis" if settings.redis_url else "embedded sqlite")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # before uvicorn, which restores it and re-raises into it
    try:
        uvicorn.run(app, host=host, port=port, log_config=None)
    except SystemExit:
        pass
    finally:
        supervisor.stop(settings.cancel_grace_seconds + 10)
    return 0


def _stop_on_sigterm(signum: int, _frame: object) -> None:
    """uvicorn re-raises the SIGTERM it shut down on: with the default action the process died there, before the
    ``finally`` that stops the workers (their jobs stayed RUNNING until the reaper counted them lost)."""
    raise SystemExit(0)
