"""The README's main command: `excb up` (SQLite + server-less Celery transport, one worker, embed service and
dashboard on one port), driven by the `excb jobs` CLI: submit -> SUCCEEDED -> the model answers GET /embed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from support import HANG_GUARD_S
from support.live import excb_up, tail, wait_embed
from support.services import tiny_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_excb_up_end_to_end(tmp_path: Path) -> None:
    with excb_up(tmp_path, OMP_NUM_THREADS="1", EXCB_REAPER_INTERVAL_SECONDS="1",
                 EXCB_EMBED__RESCAN_SECONDS="1") as up:
        base, env = up.base, up.env
        job_file = tmp_path / "job.yaml"
        job_file.write_text(yaml.safe_dump(tiny_job(max_steps=8)))
        cli = [sys.executable, "-m", "excb.cli", "jobs", "--url", base]
        sub = subprocess.run(cli + ["submit", str(job_file), "optim.lr=0.001", "--follow"], env=env,
                             capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:] + tail(up.log)
        assert "excb jobs status" in sub.stdout and "SUCCEEDED" in sub.stdout  # prints what to run next
        job_id = sub.stdout.split()[1]
        job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
        assert job["status"] == "SUCCEEDED" and job["config"]["optim"]["lr"] == 0.001
        status = subprocess.run(cli + ["status", job_id], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert "SUCCEEDED" in status.stdout and job["model_id"] in status.stdout
        listing = subprocess.run(cli + ["list"], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert job_id in listing.stdout
        r = wait_embed(base, job["model_id"])
        body = r.json()
        assert len(body["data"]) == 1 and len(body["data"][0]["embedding"]) > 0
        assert job["model_id"] in str(body.get("model", ""))
        assert httpx.get(f"{base}/v1/info").json()["broker"] == "sqlalchemy (embedded)"
        _fitted_job_runs(cli, env, tmp_path)
        assert httpx.get(f"{base}/embed", params={"uri": "../../etc/passwd"}).status_code in (403, 404, 422)


def _fitted_job_runs(cli: list[str], env: dict[str, str], tmp_path: Path) -> None:
    """No preset, a budget: the worker fits the recipe to the data (8 px digits -> 28 px input) and plans steps."""
    job_file = tmp_path / "fitted.yaml"
    job_file.write_text(yaml.safe_dump({"data": "digits", "budget": "20s", "model": {"width": 8},
                                        "augment": {"num_local_crops": 2}, "kmeans": {"samples": 256}}))
    sub = subprocess.run(cli + ["--json", "submit", str(job_file), "--follow"], env=env, capture_output=True,
                         text=True, timeout=HANG_GUARD_S)
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    base = cli[cli.index("--url") + 1]
    jobs = httpx.get(f"{base}/v1/jobs").json()
    job = next(j for j in jobs["items"] if j["config"].get("budget") == "20s")
    assert job["status"] == "SUCCEEDED"
    run_dir = Path(job["config"]["out"])
    recipe = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recipe["recipe"] == "fitted" and recipe["augment"]["global_size"] == 28
    assert recipe["max_steps"] == job["progress"]["total_steps"] > 10


def test_excb_up_is_one_service(tmp_path: Path) -> None:
    """Issue 15 §2 on the real `excb up`: one /metrics with the embed series, one OpenAPI with the embed routes,
    one /v1/info; and a SUCCEEDED job's model answers GET /embed within 2 s with every polling timer off
    (no rescan; activation follows active.json's file-system event and the request path's check)."""
    with excb_up(tmp_path, OMP_NUM_THREADS="1", EXCB_EMBED__RESCAN_SECONDS="0",
                 EXCB_REAPER_INTERVAL_SECONDS="30") as up:
        base = up.base
        labels = {"team": "vision", "ticket": 42, "tags": ["nightly"]}
        r = httpx.post(f"{base}/v1/jobs", json=tiny_job(max_steps=8) | {"metadata": labels}, timeout=30)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        job, succeeded_at = _poll_until_terminal(base, job_id)
        assert job["status"] == "SUCCEEDED", str(job) + tail(up.log)
        assert job["metadata"] == labels  # §5: metadata set at submit, attempts with worker and outcome
        [attempt] = job["attempts"]
        assert attempt["number"] == 1 and attempt["outcome"] == "succeeded" and attempt["worker"]
        assert attempt["started_at"] <= attempt["ended_at"]
        activated_before_any_request = httpx.get(f"{base}/v1/info", timeout=10).json()["embed"]["latest"]
        first_ok, codes = _first_embed_ok(base, job["model_id"], succeeded_at + 10)
        latency = first_ok - succeeded_at
        print(f"SUCCEEDED -> first GET /embed 200: {latency:.3f} s (codes before: {codes}); "
              f"/v1/info latest right after SUCCEEDED: {activated_before_any_request}")
        assert latency < 2.0, (latency, codes)

        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        for series in ("excb_embed_images_total{", "excb_model_loaded{", "excb_embed_queue_depth{", "excb_jobs{",
                       'service="embed"', 'service="api"'):
            assert series in metrics, series
        assert metrics.count("# TYPE excb_http_requests_total counter") == 1  # one registry, one family
        paths = httpx.get(f"{base}/openapi.json", timeout=10).json()["paths"]
        for path in ("/embed", "/v1/embed", "/v1/embeddings", "/v1/jobs", "/v1/models/{model_id}/activate"):
            assert path in paths, path
        info = httpx.get(f"{base}/v1/info", timeout=10).json()
        assert info["service"] == "excb-control-plane" and info["broker"] == "sqlalchemy (embedded)"
        assert info["embed"]["latest"] == job["model_id"]
        assert [m["id"] for m in info["embed"]["models"]] == [job["model_id"]]


def _poll_until_terminal(base: str, job_id: str) -> tuple[dict, float]:
    """The job and the moment it was first seen terminal (polled every 20 ms, as a client would)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return job, time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def _first_embed_ok(base: str, model_id: str, deadline: float) -> tuple[float, list[int]]:
    codes: list[int] = []
    while time.monotonic() < deadline:
        r = httpx.get(f"{base}/embed", params={"uri": "seven.png", "model": model_id}, timeout=10)
        if r.status_code == 200:
            return time.monotonic(), codes
        codes.append(r.status_code)
        time.sleep(0.02)
    raise AssertionError(f"GET /embed never answered 200 for {model_id}: {codes[-5:]}")
