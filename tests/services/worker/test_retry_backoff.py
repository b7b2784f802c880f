"""A counted retry waits (issue 33's soak: a full run directory burned a job's three attempts in 34 ms): real
Redis, the control plane and a real Celery worker process; the full disk is a real ENOSPC (the run's job.log is a
link to /dev/full, whose every write fails with ENOSPC), no fault hook."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from services.db.jobs import CLOCK_SKEW_SECONDS
from services.worker.retry import retry_delay
from support import HANG_GUARD_S


def test_retry_delay_doubles_per_failure_and_is_capped() -> None:
    assert [retry_delay(n, 10.0, 300.0) for n in (1, 2, 3, 5, 6, 40)] == [10.0, 20.0, 40.0, 160.0, 300.0, 300.0]
    assert retry_delay(3, 0.0, 300.0) == 0.0  # back-off off


def test_a_full_run_directory_is_retried_after_a_back_off_and_says_disk_full(redis_url: str, make_stack: Any,
                                                                            tmp_path: Path) -> None:
    from services.db import jobs as store
    from support.services import tiny_job

    base, cap = 3.0, 4.0
    stack = make_stack(f"sqlite:///{tmp_path / 'full.sqlite'}", redis_url, max_attempts=3,
                       retry_backoff_seconds=base, retry_backoff_max_seconds=cap)
    c = stack.start_api()
    r = c.post("/v1/jobs", json=tiny_job(max_steps=3))
    assert r.status_code == 201, r.text
    run_dir = Path(r.json()["config"]["out"])
    run_dir.mkdir(parents=True, exist_ok=True)
    os.symlink("/dev/full", run_dir / "job.log")  # the worker's first write into the run directory: ENOSPC
    stack.start_worker()
    done = stack.wait_status(r.json()["id"], {"FAILED", "SUCCEEDED"}, HANG_GUARD_S)
    assert done["status"] == "FAILED" and done["error"]["type"] == "disk_full", done["error"]
    assert done["error"]["message"].startswith("disk full: "), done["error"]["message"]
    assert "attempt 3 of 3: no attempts left" in done["error"]["message"], done["error"]["message"]
    attempts = store.attempts(stack.app.state.plane.db, run_dir.name)
    assert [a.outcome for a in attempts] == ["disk_full"] * 3, [(a.attempt, a.outcome) for a in attempts]
    gaps = [(b.started_at - a.ended_at).total_seconds() for a, b in zip(attempts, attempts[1:])]
    # the second attempt waits the base, the third twice that, capped (before: both gaps were milliseconds); the
    # submit's own duplicate message (the reaper republishes a QUEUED job after 5 s here) may not skip it either
    assert gaps[0] >= base - CLOCK_SKEW_SECONDS and gaps[1] >= cap - CLOCK_SKEW_SECONDS, gaps
    print(f"disk full: attempts started {gaps[0]:.2f}s and {gaps[1]:.2f}s after the previous one ended")


def test_a_crash_says_how_the_process_ended_and_what_budget_is_left() -> None:
    """A SIGKILL leaves only the attempt's header in the log: the error names the signal, not the header."""
    from services.worker.retry import budget_note
    from services.worker.runner import _crash_message

    killed = _crash_message(-9, "train", "--- attempt 3 on vm:1 (token 3)")
    assert killed == "the train process ended, killed by SIGKILL", killed
    crashed = _crash_message(137, "export", "--- export to m\nTraceback: boom")
    assert crashed.endswith("exited with 137: Traceback: boom"), crashed
    assert budget_note(1, 3) == " (attempt 1 of 3: retried from its last checkpoint)"
    assert "attempt 3 of 3: no attempts left" in budget_note(3, 3)


def test_a_trainer_traceback_from_a_full_disk_is_recognised() -> None:
    """What the runner reads in a dead trainer's log tail: a real ENOSPC traceback (a child writing to /dev/full)
    is a full disk, another error is not. (A trainer run against /dev/full is not used: the worker tails the
    run's files, and /dev/full reads as endless zeros.)"""
    import subprocess
    import sys

    from services.worker.retry import mentions_disk_full

    full = subprocess.run([sys.executable, "-c", "f = open('/dev/full', 'w'); f.write('x'); f.flush()"],
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert full.returncode == 1 and mentions_disk_full(full.stderr), full.stderr
    other = subprocess.run([sys.executable, "-c", "open('/nonexistent/x', 'w')"], capture_output=True, text=True,
                           timeout=HANG_GUARD_S)
    assert other.returncode == 1 and not mentions_disk_full(other.stderr), other.stderr
