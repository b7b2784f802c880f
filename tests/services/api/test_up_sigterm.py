"""`excb up` stopped with SIGTERM (docker stop, systemd, the soak's API restart): its workers are stopped first,
so a running job checkpoints and goes back to QUEUED as preempted (no failure counted). uvicorn re-raises the
SIGTERM it shut down on; with the default action the process died right there, the workers died by PDEATHSIG and
the job stayed RUNNING under a dead lease until the reaper counted it as lost (found by benchmarks/soak.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from support import HANG_GUARD_S
from support.live import tail, wait_ready
from support.services import free_port, tiny_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sigterm_preempts_the_running_job_before_exit(tmp_path: Path) -> None:
    from services.db import jobs as store
    from services.db.session import Database

    home, log, port = tmp_path / "home", tmp_path / "up.log", free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("EXCB_REDIS_URL", "EXCB_DATABASE_URL")}
    env.update({"OMP_NUM_THREADS": "1", "EXCB_LOG_JSON": "false", "EXCB_CANCEL_GRACE_SECONDS": "60",
                "EXCB_HEARTBEAT_SECONDS": "1", "EXCB_PROGRESS_INTERVAL_SECONDS": "0.5"})
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "excb.cli", "up", "--port", str(port), "--home", str(home)],
                                env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log)
        job_id = httpx.post(f"{base}/v1/jobs", json=tiny_job(max_steps=5000), timeout=30).json()["id"]
        deadline = time.monotonic() + 300
        while (httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()["progress"].get("step") or 0) < 4:
            assert time.monotonic() < deadline, tail(log)
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=HANG_GUARD_S)  # a hang guard: the worker gets the grace above to checkpoint
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    db = Database(f"sqlite:///{home / 'excb.sqlite'}", run_migrations=False)
    job = store.find_owned(db, None, job_id)
    assert job is not None
    attempts = store.attempts(db, job.id)
    db.dispose()
    assert (job.status, job.failures, job.lease_owner) == ("QUEUED", 0, None), (job.status, job.error, tail(log))
    # (a worker in warm shutdown may still take the republished message once: preempted again at once)
    assert attempts and {a.outcome for a in attempts} == {"preempted"}, tail(log)
    assert proc.returncode == 0, tail(log)
