"""End-to-end jobs with real Celery worker processes, real Redis and a real job store.

Each scenario trains a tiny network for real (digits, a few dozen steps) in the worker's child process.
The job stores alternate between SQLite and PostgreSQL across scenarios so both are exercised.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from support import HANG_GUARD_S
from support.services import tiny_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST = {"export_parity_images": 16}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _attempt_pids(stack: Any, job_id: str) -> list[dict[str, Any]]:
    from services.db import jobs as store

    return [{"attempt": a.attempt, "pid": a.pid, "token": a.lease_token, "outcome": a.outcome,
             "started": a.started_at, "ended": a.ended_at}
            for a in store.attempts(stack.app.state.plane.db, job_id)]


def test_job_succeeds_registers_model_and_reports_progress(pg_url: str, redis_url: str, make_stack: Any) -> None:
    stack = make_stack(pg_url, redis_url, **FAST)
    c = stack.start_api()
    stack.start_worker()
    job = c.post("/v1/jobs", json=tiny_job(max_steps=12)).json()
    done = stack.wait_status(job["id"], {"SUCCEEDED", "FAILED"}, HANG_GUARD_S)
    assert done["status"] == "SUCCEEDED", done["error"]
    assert done["attempt"] == 1 and done["model_id"]
    assert done["progress"]["step"] == 12 and done["progress"]["total_steps"] == 12
    assert done["progress"]["percent"] == 100.0
    assert "loss" in done["latest_metrics"] and done["balance"]["num_clusters"] == 32.0
    series = c.get(f"/v1/jobs/{job['id']}/metrics").json()["items"]
    assert [r["step"] for r in series] == list(range(1, 13))
    curve = c.get(f"/v1/jobs/{job['id']}/cluster-sizes").json()
    assert curve["step"] == 12 and len(curve["rank"]) == len(curve["relative_size"]) == 32
    model = c.get(f"/v1/models/{done['model_id']}").json()
    assert model["active"] and model["job_id"] == job["id"] and model["model_json"]["parity"]["passed"]
    bundle = Path(model["bundle_dir"])
    assert (bundle / "model.onnx").is_file() and model["sha256"] == model["model_json"]["sha256"]
    assert Path(done["artifacts"]["checkpoint"]).is_file()
    logs = c.get(f"/v1/jobs/{job['id']}/logs", params={"limit": 1 << 20}).json()["text"]
    assert "attempt 1" in logs
    events = _sse_events(c, f"/v1/jobs/{job['id']}/events")
    kinds = {e for e, _ in events}
    assert {"status", "metrics", "cluster_sizes", "end"} <= kinds
    assert [d for e, d in events if e == "status"][-1]["status"] == "SUCCEEDED"
    streamed = [d["line"] for e, d in _sse_events(c, f"/v1/jobs/{job['id']}/logs/stream") if e == "log"]
    assert any("attempt 1" in line for line in streamed)


def _sse_events(client: Any, path: str) -> list[tuple[str, Any]]:
    import json

    out: list[tuple[str, Any]] = []
    with client.stream("GET", path) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                out.append((event or "message", json.loads(line[5:])))
    return out


def test_cancel_mid_training_checkpoints_and_frees_the_cpu(make_stack: Any, tmp_path: Path, redis_url: str) -> None:
    stack = make_stack(f"sqlite:///{tmp_path / 'c.sqlite'}", redis_url, **FAST)
    c = stack.start_api()
    stack.start_worker()
    job = c.post("/v1/jobs", json=tiny_job(max_steps=5000)).json()
    running = stack.wait(job["id"], lambda j: (j["progress"].get("step") or 0) >= 3, 120)
    pid = _attempt_pids(stack, job["id"])[0]["pid"]
    assert _alive(pid)
    step_at_cancel = running["progress"]["step"]
    t0 = time.monotonic()
    r = c.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] in ("CANCELLING", "CANCELLED")
    done = stack.wait_status(job["id"], {"CANCELLED", "FAILED", "SUCCEEDED"}, HANG_GUARD_S)
    elapsed = time.monotonic() - t0
    assert done["status"] == "CANCELLED"
    assert not _alive(pid)  # the trainer is gone: the CPU is free
    # it stopped on SIGTERM at a step boundary, well before the grace period would have SIGKILLed it; how many
    # steps that is depends on the machine's speed, so the bound is on time, not on steps
    assert elapsed < stack.settings().cancel_grace_seconds / 2, elapsed
    assert step_at_cancel <= done["progress"]["step"] < 5000, done["progress"]
    ckpt = Path(done["artifacts"]["checkpoint"])
    assert ckpt.is_file()
    from excb.training.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt)
    assert int(state.get("step", 0)) >= step_at_cancel
    assert int(state["step"]) == done["progress"]["step"]  # saved where it stopped, not an older periodic one
    print(f"cancel -> CANCELLED in {elapsed:.1f}s, {done['progress']['step'] - step_at_cancel} steps after the request")
    # a cancelled job can be retried: it resumes from that checkpoint
    c.post(f"/v1/jobs/{job['id']}/cancel")


def test_kill9_worker_resumes_elsewhere_from_checkpoint(pg_url: str, redis_url: str, make_stack: Any) -> None:
    stack = make_stack(pg_url, redis_url, **FAST)
    c = stack.start_api()
    first = stack.start_worker("first@localhost")
    job = c.post("/v1/jobs", json=tiny_job(max_steps=40)).json()
    stack.wait(job["id"], lambda j: (j["progress"].get("step") or 0) >= 10, 180)
    attempt1 = _attempt_pids(stack, job["id"])[0]
    run_dir = Path(stack.settings().runs_dir).resolve() / job["id"]
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    os.kill(first.pid, signal.SIGKILL)
    t_kill = time.monotonic()
    first.wait()
    time.sleep(0.5)
    assert not _alive(attempt1["pid"]), "the trainer of a killed worker must die with it"
    stack.start_worker("second@localhost")
    resumed = stack.wait(job["id"], lambda j: j["attempt"] == 2 and j["status"] == "RUNNING", HANG_GUARD_S)
    t_resume = time.monotonic() - t_kill
    done = stack.wait_status(job["id"], {"SUCCEEDED", "FAILED"}, HANG_GUARD_S)
    assert done["status"] == "SUCCEEDED" and done["attempt"] == 2, done
    attempts = _attempt_pids(stack, job["id"])
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert attempts[0]["outcome"] == "worker_lost" and attempts[1]["outcome"] == "succeeded"
    assert attempts[1]["token"] > attempts[0]["token"]
    assert attempts[0]["ended"] <= attempts[1]["started"]  # never two live runs
    log = (run_dir / "train.log").read_text()
    assert "resum" in log.lower(), "attempt 2 must resume from the checkpoint"
    print(f"kill -9 -> attempt 2 RUNNING after {t_resume:.1f}s (stall window 6s); resumed={resumed['progress']}")


def test_redis_restart_with_queued_jobs_loses_nothing(private_redis: Any, make_stack: Any, tmp_path: Path) -> None:
    stack = make_stack(f"sqlite:///{tmp_path / 'r.sqlite'}", private_redis.url, **FAST)
    c = stack.start_api()
    ids = [c.post("/v1/jobs", json=tiny_job(max_steps=3)).json()["id"] for _ in range(2)]
    private_redis.stop()  # no persistence: the queued messages are gone
    private_redis.start()
    stack.start_worker()
    for jid in ids:
        done = stack.wait_status(jid, {"SUCCEEDED", "FAILED"}, HANG_GUARD_S)
        assert done["status"] == "SUCCEEDED", done["error"]


def test_always_crashing_job_fails_after_attempt_limit(make_stack: Any, tmp_path: Path, redis_url: str) -> None:
    stack = make_stack(f"sqlite:///{tmp_path / 'x.sqlite'}", redis_url, max_attempts=3)
    c = stack.start_api()
    stack.start_worker()
    job = c.post("/v1/jobs", json={**tiny_job(), "memory_limit_mb": 1}).json()
    done = stack.wait_status(job["id"], {"FAILED", "SUCCEEDED"}, HANG_GUARD_S)
    assert done["status"] == "FAILED" and done["attempt"] == 3 and done["failures"] == 3
    assert done["error"]["type"] == "out_of_memory"
    time.sleep(3)  # no endless loop: nothing restarts it
    again = c.get(f"/v1/jobs/{job['id']}").json()
    assert again["attempt"] == 3 and again["status"] == "FAILED"
    assert [a["outcome"] for a in _attempt_pids(stack, job["id"])] == ["out_of_memory"] * 3


def test_sigterm_to_worker_checkpoints_and_requeues(make_stack: Any, tmp_path: Path, redis_url: str) -> None:
    """A rolling deploy: SIGTERM -> trainer checkpoints, job back to QUEUED without spending its budget."""
    stack = make_stack(f"sqlite:///{tmp_path / 't.sqlite'}", redis_url, **FAST)
    c = stack.start_api()
    worker = stack.start_worker("leaving@localhost")
    job = c.post("/v1/jobs", json=tiny_job(max_steps=20)).json()
    stack.wait(job["id"], lambda j: (j["progress"].get("step") or 0) >= 4, 120)
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(timeout=HANG_GUARD_S) == 0
    back = c.get(f"/v1/jobs/{job['id']}").json()
    assert back["status"] == "QUEUED" and back["failures"] == 0, back
    assert [a["outcome"] for a in _attempt_pids(stack, job["id"])] == ["preempted"]
    stack.start_worker("arriving@localhost")
    done = stack.wait_status(job["id"], {"SUCCEEDED", "FAILED"}, HANG_GUARD_S)
    assert done["status"] == "SUCCEEDED" and done["attempt"] == 2 and done["failures"] == 0
