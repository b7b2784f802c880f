"""`excb up`'s worker supervisor: the back-off / crash-loop arithmetic, and the supervisor itself on real
child processes (stand-ins for Celery workers that a test can kill -9 in a second), a real SQLite job store
and the embedded broker: a dead worker is restarted with back-off, its job is taken back at once, repeated
deaths are reported as a crash loop. Also the worker health-file check the container health check runs."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from services.worker.retry import exit_text
from services.worker.supervisor import RestartPolicy, WorkerSupervisor
from support import HANG_GUARD_S

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _policy(**kw: Any) -> RestartPolicy:
    args = {"base": 1.0, "cap": 8.0, "stable": 60.0, "loop_deaths": 3, "window": 300.0, **kw}
    return RestartPolicy(**args)


def test_backoff_doubles_per_death_in_a_row_and_is_capped() -> None:
    p = _policy()
    delays = [p.on_death(started_at=t, now=t + 5) for t in (0, 10, 20, 30, 40, 50)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_backoff_resets_after_a_stable_run() -> None:
    p = _policy()
    assert p.on_death(0, 1) == 1.0 and p.on_death(2, 3) == 2.0
    assert p.on_death(started_at=10, now=10 + 60) == 1.0  # up for `stable` seconds: recovered
    assert p.on_death(71, 72) == 2.0


def test_crash_loop_needs_enough_deaths_inside_the_window() -> None:
    p = _policy(window=100.0)
    p.on_death(0, 1)
    p.on_death(2, 3)
    assert not p.crash_loop(now=3, up_since=None)
    p.on_death(4, 5)
    assert p.crash_loop(now=5, up_since=None) and p.recent_deaths(5) == 3
    assert p.crash_loop(now=10, up_since=6)  # restarted but not proven yet
    assert not p.crash_loop(now=70, up_since=6)  # up for `stable` seconds: over
    assert not p.crash_loop(now=104, up_since=None)  # the first deaths left the window
    p2 = _policy(window=10.0)
    for t in (0, 20, 40, 60):  # deaths spread out: never a loop, though the back-off keeps growing
        p2.on_death(t, t + 1)
        assert not p2.crash_loop(t + 1, None)


def test_exit_text_names_the_signal() -> None:
    assert exit_text(-9) == "killed by SIGKILL" and exit_text(-15) == "killed by SIGTERM"
    assert exit_text(3) == "exited with 3"


# --- the supervisor on real processes ------------------------------------------------------------------------

@pytest.fixture
def plane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any, Any]]:
    from services.db.session import Database, default_url
    from services.queue.broker import make_celery
    from services.settings import Settings

    monkeypatch.setenv("EXCB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EXCB_CELERY_QUEUE", "excb.test.supervisor")
    monkeypatch.setenv("EXCB_WORKER_RESTART_BACKOFF_SECONDS", "0.5")
    monkeypatch.setenv("EXCB_WORKER_RESTART_BACKOFF_MAX_SECONDS", "2")
    monkeypatch.setenv("EXCB_WORKER_CRASH_LOOP_RESTARTS", "3")
    monkeypatch.setenv("EXCB_MAX_ATTEMPTS", "3")
    settings = Settings()
    db = Database(default_url(settings.home))
    yield db, make_celery(settings), settings
    db.dispose()


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait(check: Any, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _running_pid(sup: WorkerSupervisor) -> int | None:
    snap = sup.snapshot()[0]
    return snap["pid"] if snap["state"] == "running" else None


def _lease_for(db: Any, pid: int, job_id: str) -> Any:
    """A QUEUED job leased by the (stand-in) worker ``pid``, as the real worker's runner would."""
    from services.db import jobs as store

    store.create_job(db, job_id=job_id, owner=None, idempotency_key=None, name=None, config={"max_steps": 1},
                     request={}, run_dir=f"/nonexistent/{job_id}", max_attempts=3)
    lease = store.acquire(db, job_id, f"{socket.gethostname()}:{pid}")
    assert lease is not None
    assert store.fenced_update(db, lease, status="RUNNING")
    return lease


def test_killed_worker_is_restarted_with_backoff_and_its_job_taken_back(
        plane: tuple[Any, Any, Any], caplog: pytest.LogCaptureFixture) -> None:
    from services.db import jobs as store
    from services.db import workers as worker_store

    db, celery, settings = plane
    sup = WorkerSupervisor(db, celery, settings, 1, lambda node: SLEEPER, _spawn)
    caplog.set_level(logging.INFO, logger="excb.supervisor")
    sup.start_workers()
    try:
        first = _running_pid(sup)
        assert first is not None
        _lease_for(db, first, "j-kill")
        who = worker_store.Identity(f"{socket.gethostname()}:{first}", "n", "h", first, "q")
        worker_store.beat(db, who, "j-kill")
        os.kill(first, signal.SIGKILL)
        t_kill = time.monotonic()
        # the job is taken back at once (no stall window), counted as one failure, and republished
        _wait(lambda: store.get_job(db, "j-kill").enqueued_at is not None, 5, "the job QUEUED and republished")
        t_requeued = time.monotonic() - t_kill
        job = store.get_job(db, "j-kill")
        assert job.failures == 1 and job.error["type"] == "worker_lost"
        assert job.status == "QUEUED" and "killed by SIGKILL" in job.error["message"]
        assert [a.outcome for a in store.attempts(db, "j-kill")] == ["worker_lost"]
        row = {r.name: r for r in worker_store.recent(db, 60)}[f"{socket.gethostname()}:{first}"]
        assert row.state == "dead" and not worker_store.is_live(row, 30)
        snap = sup.snapshot()[0]
        assert snap["state"] == "restarting" and snap["last_exit"] == "killed by SIGKILL"
        _wait(lambda: _running_pid(sup) not in (None, first), 5, "the restart")
        t_restart = time.monotonic() - t_kill
        assert 0.4 <= t_restart < 3.0, t_restart  # back-off base 0.5 s
        events = [r.__dict__ for r in caplog.records if r.name == "excb.supervisor"]
        exited = next(e for e in events if e.get("event") == "worker_exited")
        assert exited["exit_code"] == -9 and exited["restart_in_s"] == 0.5 and "j-kill:QUEUED" in exited["jobs"]
        assert any(e.get("event") == "worker_restarted" for e in events)
        assert not any(e.get("event") == "worker_crash_loop" for e in events)
        print(f"kill -9 -> job QUEUED {t_requeued:.2f}s, worker restarted {t_restart:.2f}s")
    finally:
        sup.stop(5)
    assert all(s.proc is None or s.proc.poll() is not None for s in sup.slots)


def test_three_deaths_in_a_row_are_a_reported_crash_loop_and_the_job_fails_on_its_budget(
        plane: tuple[Any, Any, Any], caplog: pytest.LogCaptureFixture) -> None:
    from services.db import jobs as store

    db, celery, settings = plane
    sup = WorkerSupervisor(db, celery, settings, 1, lambda node: SLEEPER, _spawn)
    caplog.set_level(logging.INFO, logger="excb.supervisor")
    sup.start_workers()
    delays = []
    try:
        for i in range(3):
            pid = _running_pid(sup)
            assert pid is not None
            job = store.get_job(db, "j-loop")
            if job is None:
                _lease_for(db, pid, "j-loop")
            else:  # the restarted worker picks the requeued job up again
                assert job.status == "QUEUED"
                lease = store.acquire(db, "j-loop", f"{socket.gethostname()}:{pid}")
                assert lease is not None and lease.attempt == i + 1
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            _wait(lambda pid=pid: _running_pid(sup) not in (None, pid), 10, f"restart #{i + 1}")
            delays.append(time.monotonic() - t0)
        job = store.get_job(db, "j-loop")
        assert job.status == "FAILED" and job.failures == 3 and job.attempt == 3  # the budget, nothing else
        assert job.error["type"] == "worker_lost"
        loops = [r for r in caplog.records if getattr(r, "event", None) == "worker_crash_loop"]
        assert len(loops) == 1 and loops[0].levelname == "ERROR" and loops[0].deaths == 3
        snap = sup.snapshot()[0]
        assert snap["crash_loop"] and snap["recent_deaths"] == 3 and snap["restarts"] == 3
        exits = [r.restart_in_s for r in caplog.records if getattr(r, "event", None) == "worker_exited"]
        assert exits == [0.5, 1.0, 2.0], exits  # the back-off doubles (what the supervisor scheduled)
        assert delays[2] > delays[0], delays  # and it shows in wall time (the middle step can drown in load)
        print(f"restart delays after each kill: {[round(d, 2) for d in delays]}")
    finally:
        sup.stop(5)


@pytest.mark.slow
def test_worker_health_file_check(tmp_path: Path) -> None:
    from services.worker.liveness import check_health, touch

    f = tmp_path / "alive"
    assert check_health(None, 30)[0] is False
    ok, why = check_health(f, 30)
    assert not ok and "missing" in why
    touch(f)
    assert check_health(f, 30)[0]
    ok, why = check_health(f, 30, now=time.time() + 31)
    assert not ok and "stale" not in why and "old" in why
    env = {**os.environ, "EXCB_WORKER_HEALTH_FILE": str(f), "EXCB_STALL_SECONDS": "30"}
    cli = [sys.executable, "-m", "excb.cli", "worker-health"]
    assert subprocess.run(cli, env=env, capture_output=True, timeout=HANG_GUARD_S).returncode == 0
    os.utime(f, (time.time() - 60, time.time() - 60))
    res = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert res.returncode == 1 and "consumer" in res.stderr


# Stands in for a Celery worker's warm shutdown: SIGTERM -> finish (here: write a line) and exit 0.
WARM = [sys.executable, "-c", "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('warm shutdown', flush=True), sys.exit(0)))\n"
        "time.sleep(120)"]


def test_a_restarted_worker_gets_the_warm_stop_too(plane: tuple[Any, Any, Any]) -> None:
    """`excb up`'s real spawn (own group + PDEATHSIG) from the supervisor thread: a worker restarted after a
    kill -9 has its death signal bound to that thread, so stop() must SIGTERM it (exit 0 after its warm shutdown)
    before the thread ends; otherwise it is SIGKILLed mid-job and its job waits for the reaper as lost (the
    exporting job reaped after an API restart in the soak, issue 33)."""
    from services.api.embedded import _spawn as up_spawn

    db, celery, settings = plane
    sup = WorkerSupervisor(db, celery, settings, 1, lambda node: WARM, up_spawn)
    sup.start_workers()
    try:
        first = _running_pid(sup)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        _wait(lambda: _running_pid(sup) not in (None, first), HANG_GUARD_S, "the restart")
        restarted = sup.slots[0].proc
        assert restarted is not None
        time.sleep(0.5)  # its SIGTERM handler is installed
    finally:
        sup.stop(HANG_GUARD_S)
    assert restarted.poll() == 0, f"the restarted worker ended with {restarted.returncode}, not a warm stop"
