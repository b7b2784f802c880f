"""Issue 18 on the embedded default (`excb up`: SQLite job store + the SQLite Celery transport, real processes):
kill -9 of the Celery worker mid-job, of the trainer child, and of the worker three times in a row.

Bounds (stated here, printed by each test): with the default back-off (1 s, doubling) the worker is restarted
and the job's next attempt is RUNNING within ``RESUME_BOUND_S`` of the kill; the tiny job then ends within
``DONE_BOUND_S``. /readyz reports "no live worker" while the worker is down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from support.services import REPO, free_port, tiny_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RESUME_BOUND_S = 60.0   # kill -9 -> attempt 2 RUNNING (restart back-off + Celery start + lease + trainer start)
DONE_BOUND_S = 240.0    # kill -9 -> SUCCEEDED for a 60-step tiny job on one loaded CPU core


class Up:
    """One `excb up` process with its own home, port and log."""

    def __init__(self, tmp: Path, **env: str) -> None:
        self.home, self.log_path = tmp / "home", tmp / "up.log"
        self.base = f"http://127.0.0.1:{free_port()}"
        self.env = {k: v for k, v in os.environ.items() if k not in ("EXCB_REDIS_URL", "EXCB_DATABASE_URL")}
        self.env.update({"OMP_NUM_THREADS": "1", "EXCB_EXPORT_PARITY_IMAGES": "16", "EXCB_LOG_JSON": "true",
                         "EXCB_REAPER_INTERVAL_SECONDS": "1", "EXCB_HEARTBEAT_SECONDS": "1",
                         "EXCB_RETRY_BACKOFF_SECONDS": "1",  # a counted retry's wait (10 s by default)
                         "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env})
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "excb.cli", "up", "--port", self.base.rsplit(":", 1)[1],
                                      "--home", str(self.home)], env=self.env, cwd=tmp, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(self.base + path, params=params, timeout=10)

    def wait(self, check: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"excb up exited with {self.proc.returncode}\n{self.tail()}")
            try:
                got = check()
            except httpx.HTTPError:
                got = None
            if got:
                return got
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.tail()}")

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/v1/jobs/{job_id}").json()

    def live_worker(self, job_id: str | None = None) -> dict[str, Any] | None:
        items = self.get("/v1/workers").json()["items"]
        return next((w for w in items if w["live"] and (job_id is None or w["job_id"] == job_id)), None)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                row = json.loads(line)
                if row.get("event") == name:
                    out.append(row)
        return out

    def run_dir(self) -> Path:
        dirs = list((self.home / "runs").iterdir())
        assert len(dirs) == 1, dirs
        return dirs[0]

    def resumed_at(self) -> int:
        """The checkpoint step the last attempt resumed from (the trainer's "resumed from ... at step N")."""
        lines = [ln for ln in (self.run_dir() / "train.log").read_text().splitlines() if "resumed from" in ln]
        assert lines, "attempt 2 must resume from the checkpoint"
        return int(lines[-1].split(" at step ")[1].split()[0])

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    u = Up(tmp_path)
    try:
        u.wait(lambda: u.get("/readyz").status_code == 200, 120, "readyz (a live worker)", every=0.5)
        yield u
    finally:
        u.stop()


def _submit_and_wait_for_checkpoint(up: Up, steps: int, at_step: int) -> str:
    job_id = httpx.post(up.base + "/v1/jobs", json=tiny_job(max_steps=steps), timeout=30).json()["id"]
    up.wait(lambda: (up.job(job_id)["progress"].get("step") or 0) >= at_step
            and (up.run_dir() / "checkpoints" / "last.pt").is_file(), 180, f"step {at_step} and a checkpoint")
    return job_id


def test_kill9_worker_is_restarted_and_the_job_resumes_from_its_checkpoint(up: Up) -> None:
    job_id = _submit_and_wait_for_checkpoint(up, steps=60, at_step=10)
    worker = up.wait(lambda: up.live_worker(job_id), 30, "the worker running the job")
    step_at_kill = up.job(job_id)["progress"]["step"]
    os.kill(worker["pid"], signal.SIGKILL)
    t_kill = time.monotonic()

    # while the worker is down, readiness says so, with the reason
    down = up.wait(lambda: (r := up.get("/readyz")).status_code == 503 and r.json(), 10, "readyz 503", every=0.05)
    t_unready = time.monotonic() - t_kill
    message = down["error"]["message"]
    assert "no live worker" in message and "killed by SIGKILL" in message, message

    up.wait(lambda: (j := up.job(job_id))["attempt"] == 2 and j["status"] == "RUNNING", RESUME_BOUND_S,
            "attempt 2 RUNNING", every=0.1)
    t_resume = time.monotonic() - t_kill
    restarted = up.live_worker()
    assert restarted is not None and restarted["pid"] != worker["pid"]
    t_ready = up.wait(lambda: up.get("/readyz").status_code == 200, 30, "readyz 200 again") and \
        time.monotonic() - t_kill

    done = up.wait(lambda: (j := up.job(job_id))["status"] in ("SUCCEEDED", "FAILED") and j, DONE_BOUND_S,
                   "the job to finish", every=0.5)
    t_done = time.monotonic() - t_kill
    assert done["status"] == "SUCCEEDED" and done["attempt"] == 2 and done["failures"] == 1, done
    assert done["progress"]["step"] == 60
    resumed = up.resumed_at()
    assert 4 <= resumed < 60 and resumed % 4 == 0, resumed  # a checkpoint (every 4 steps), not step 0
    job_log = (up.run_dir() / "job.log").read_text()
    assert "--- attempt 2" in job_log

    exited = up.events("worker_exited")
    assert len(exited) == 1 and exited[0]["exit_code"] == -9 and exited[0]["pid"] == worker["pid"]
    assert f"{job_id}:QUEUED" in exited[0]["jobs"] and exited[0]["crash_loop"] is False
    assert len(up.events("worker_restarted")) == 1 and not up.events("worker_crash_loop")
    sup = up.get("/v1/workers").json()["supervisor"][0]
    assert sup["state"] == "running" and sup["restarts"] == 1 and sup["last_exit"] == "killed by SIGKILL"
    print(f"\nworker kill -9 at step {step_at_kill}: readyz 503 after {t_unready:.2f}s, attempt 2 RUNNING after "
          f"{t_resume:.1f}s (resumed from the step-{resumed} checkpoint), readyz 200 after {t_ready:.1f}s, "
          f"SUCCEEDED after {t_done:.1f}s")


def test_kill9_trainer_child_resumes_on_the_same_worker(up: Up, tmp_path: Path) -> None:
    from services.db import jobs as store
    from services.db.session import Database, default_url

    job_id = _submit_and_wait_for_checkpoint(up, steps=60, at_step=10)
    worker = up.wait(lambda: up.live_worker(job_id), 30, "the worker running the job")
    db = Database(default_url(up.home), run_migrations=False)
    try:
        trainer = store.attempts(db, job_id)[-1].pid
    finally:
        db.dispose()
    assert trainer and trainer != worker["pid"]
    os.kill(trainer, signal.SIGKILL)
    t_kill = time.monotonic()
    up.wait(lambda: (j := up.job(job_id))["attempt"] == 2 and j["status"] == "RUNNING", RESUME_BOUND_S,
            "attempt 2 RUNNING", every=0.1)
    t_resume = time.monotonic() - t_kill
    done = up.wait(lambda: (j := up.job(job_id))["status"] in ("SUCCEEDED", "FAILED") and j, DONE_BOUND_S,
                   "the job to finish", every=0.5)
    t_done = time.monotonic() - t_kill
    assert done["status"] == "SUCCEEDED" and done["attempt"] == 2, done
    resumed = up.resumed_at()
    assert resumed >= 4 and resumed % 4 == 0, resumed
    assert not up.events("worker_exited"), "the worker itself survives a trainer crash"
    assert up.live_worker()["pid"] == worker["pid"]
    print(f"\ntrainer kill -9: attempt 2 RUNNING after {t_resume:.1f}s (from the step-{resumed} checkpoint), "
          f"SUCCEEDED after {t_done:.1f}s")


def test_worker_killed_three_times_is_a_reported_crash_loop_and_the_job_fails_on_its_budget(up: Up) -> None:
    job_id = _submit_and_wait_for_checkpoint(up, steps=2000, at_step=4)
    gaps = []
    for attempt in (1, 2, 3):
        worker = up.wait(lambda n=attempt: (w := up.live_worker(job_id)) and up.job(job_id)["attempt"] == n and w,
                         RESUME_BOUND_S, f"attempt {attempt} running on a live worker", every=0.1)
        os.kill(worker["pid"], signal.SIGKILL)
        t_kill = time.monotonic()
        if attempt < 3:
            up.wait(lambda n=attempt: up.job(job_id)["attempt"] == n + 1, RESUME_BOUND_S, f"attempt {attempt + 1}")
            gaps.append(round(time.monotonic() - t_kill, 1))
    failed = up.wait(lambda: (j := up.job(job_id))["status"] == "FAILED" and j, 10, "FAILED")
    assert failed["attempt"] == 3 and failed["failures"] == 3 and failed["error"]["type"] == "worker_lost"
    assert "killed by SIGKILL" in failed["error"]["message"]
    loops = up.events("worker_crash_loop")
    assert len(loops) == 1 and loops[0]["level"] == "ERROR" and loops[0]["deaths"] == 3, loops
    workers = up.wait(lambda: (w := up.get("/v1/workers").json())["supervisor"][0]["restarts"] == 3 and w,
                      30, "the third restart")
    assert workers["supervisor"][0]["crash_loop"] is True
    assert up.get("/v1/info").json()["workers"]["crash_loop"] is True
    print(f"\nthree kills: kill -> next attempt RUNNING after {gaps} s; crash loop reported; job FAILED "
          f"(attempt 3, failures 3)")
