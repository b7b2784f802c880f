"""Issue 15 §5, jobs that run for days: the whole log, and live streams that outlive the stream cap.

A real uvicorn control plane with EXCB_STREAM_MAX_SECONDS=1, a job whose log keeps growing for several
seconds (written the way the worker appends it), and the real `excb jobs logs` CLI in another process."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from support import HANG_GUARD_S
from support import embed as es
from support.services import REPO

LINES = 2400  # ~240 KiB: well past the old 64 KiB first page


def _line(i: int) -> str:
    return f"step {i:05d} " + "x" * 88


def _grow_log(run_dir: Path, db: Any, job_id: str, seconds: float) -> None:
    """Append LINES lines over ``seconds`` (partial lines included), then mark the job SUCCEEDED."""
    from services.db.tables import Job

    run_dir.mkdir(parents=True, exist_ok=True)
    per_tick = LINES // 40
    with (run_dir / "job.log").open("ab", buffering=0) as fh:
        for start in range(0, LINES, per_tick):
            chunk = "".join(_line(i) + "\n" for i in range(start, min(LINES, start + per_tick))).encode()
            fh.write(chunk[:-7])  # a line split across two writes must still come out whole, once
            time.sleep(seconds / 80)
            fh.write(chunk[-7:])
            time.sleep(seconds / 80)
    with db.session() as s, s.begin():
        s.execute(update(Job).where(Job.id == job_id).values(status="SUCCEEDED"))


@pytest.mark.slow
def test_follow_and_events_survive_the_stream_cap(make_stack: Any, tmp_path: Path, monkeypatch: Any) -> None:
    from services.api import routes_jobs
    from services.api.app import create_app
    from services.api.client import ApiClient
    from services.db import jobs as store

    monkeypatch.setattr(routes_jobs, "STREAM_PING_SECONDS", 0.3)
    stack = make_stack(f"sqlite:///{tmp_path / 'long.sqlite'}", None, stream_max_seconds=1)
    app = create_app(stack.settings(), reaper=False)
    db = app.state.plane.db
    with es.UvicornThread(app) as srv:
        job = httpx.post(f"{srv.url}/v1/jobs", json={"data": "digits", "max_steps": 5}, timeout=30).json()
        row = store.find_owned(db, None, job["id"])
        assert row is not None
        writer = threading.Thread(target=_grow_log, args=(Path(row.run_dir), db, row.id, 4.0))
        cli = [sys.executable, "-m", "excb.cli", "jobs", "--url", srv.url, "logs", job["id"]]
        env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
        follow = subprocess.Popen(cli + ["--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env)
        events: list[tuple[str, Any]] = []
        reader = threading.Thread(target=lambda: events.extend(
            ApiClient(srv.url).stream(f"/v1/jobs/{job['id']}/events")))
        t0 = time.monotonic()
        writer.start()
        reader.start()
        out, err = follow.communicate(timeout=HANG_GUARD_S)
        writer.join(30)
        reader.join(60)
        elapsed = time.monotonic() - t0
        expected = [_line(i) for i in range(LINES)]
        printed = out.splitlines()
        assert follow.returncode == 0, err[-2000:]
        assert printed[:-1] == expected and printed[-1] == f"{job['id']}: SUCCEEDED"  # no gap, no repeat
        assert elapsed > 3  # the streams lived 1 s each: several reconnects happened
        logged = [d["line"] for e, d in events if e == "log"]
        assert logged == expected and events[-1] == ("end", {"status": "SUCCEEDED"})

        whole = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
        assert whole.returncode == 0 and whole.stdout.splitlines() == expected  # every page, not 64 KiB
        assert len(whole.stdout) > 3 * 65536

        with httpx.stream("GET", f"{srv.url}/v1/jobs/{job['id']}/logs/stream",
                          headers={"Last-Event-ID": str(len(whole.stdout.encode()) - 2 * (len(_line(0)) + 1))}) as resp:
            raw = resp.read().decode()
        assert "retry: 1000" in raw and raw.count("event: log") == 2 and "event: end" in raw
        assert f"id: {len(whole.stdout.encode())}" in raw  # ids are byte offsets

        running = httpx.post(f"{srv.url}/v1/jobs", json={"data": "digits", "max_steps": 5}, timeout=30).json()
        with httpx.stream("GET", f"{srv.url}/v1/jobs/{running['id']}/logs/stream", timeout=10) as resp:
            raw = resp.read().decode()  # a QUEUED job: the stream stays open (pings) until the 1 s cap
        assert ": ping" in raw and "event: end" not in raw
        assert httpx.get(f"{srv.url}/v1/jobs/{job['id']}/logs/stream",
                         headers={"Last-Event-ID": "x"}).status_code == 422
        shown = httpx.get(f"{srv.url}/v1/jobs/{job['id']}").json()
        assert shown["metadata"] == {} and shown["attempts"] == []  # no worker ran it
        (tmp_path / "job.yaml").write_text("data: digits\nmax_steps: 5\n")
        jobs_cli = [sys.executable, "-m", "excb.cli", "jobs", "--url", srv.url]
        sub = subprocess.run(jobs_cli + ["--json", "submit", str(tmp_path / "job.yaml"), "--meta", "team=vision",
                                         "--meta", "n=3"], capture_output=True, text=True, env=env,
                             timeout=HANG_GUARD_S)
        assert sub.returncode == 0, sub.stderr[-2000:]
        labelled = json.loads(sub.stdout)["id"]
        status = subprocess.run(jobs_cli + ["status", labelled], capture_output=True, text=True, env=env,
                                timeout=HANG_GUARD_S)
        assert 'metadata: {"n": 3, "team": "vision"}' in status.stdout, status.stdout
        bad = subprocess.run(jobs_cli + ["submit", str(tmp_path / "job.yaml"), "--meta", "novalue"],
                             capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
        assert bad.returncode == 2 and bad.stderr.startswith("excb: --meta")
        for too_big in ({"k": "x" * 17000}, {f"k{i}": i for i in range(65)}):
            r = httpx.post(f"{srv.url}/v1/jobs", json={"data": "digits", "metadata": too_big}, timeout=30)
            assert r.status_code == 422 and r.json()["error"]["field"].startswith("metadata"), r.text
    db.dispose()


def test_pull_a_model_bundle(make_stack: Any, tmp_path: Path) -> None:
    """GET /v1/models/{id}/bundle (owner only, like the model routes) and `excb jobs pull ID --out DIR`."""
    import hashlib
    import shutil

    from services.api.app import create_app
    from services.common.auth import hash_key
    from services.db import jobs as store
    from services.db import models as model_store
    from services.db.tables import Job, ModelRow

    (tmp_path / "keys").write_text("alpha-secret\nbeta-secret\n")
    stack = make_stack(f"sqlite:///{tmp_path / 'pull.sqlite'}", None, api_keys_file=tmp_path / "keys")
    app = create_app(stack.settings(), reaper=False)
    db = app.state.plane.db
    a = {"Authorization": "Bearer alpha-secret"}
    owner = "key-" + hash_key("alpha-secret")[:16]
    bundle = stack.home / "models" / "m-pull"
    shutil.copytree(es.bundle(), bundle)
    (bundle / "escape").symlink_to("/etc/hostname")  # never shipped: links are left out of the tar
    sha = hashlib.sha256((bundle / "model.onnx").read_bytes()).hexdigest()
    with es.UvicornThread(app) as srv:
        job = httpx.post(f"{srv.url}/v1/jobs", json={"data": "digits", "max_steps": 5}, headers=a, timeout=30).json()
        model_store.add_model(db, ModelRow(id="m-pull", owner=owner, status="READY", bundle_dir=str(bundle), sha256=sha,
                                           model_json={}))
        row = store.find_owned(db, owner, job["id"])
        assert row is not None
        with db.session() as s, s.begin():
            s.execute(update(Job).where(Job.id == row.id).values(status="SUCCEEDED", model_id="m-pull"))

        other = httpx.get(f"{srv.url}/v1/models/m-pull/bundle", headers={"Authorization": "Bearer beta-secret"})
        assert other.status_code == 404 and other.json()["error"]["type"] == "not_found"
        assert httpx.get(f"{srv.url}/v1/models/m-pull/bundle").status_code == 401
        env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
               "EXCB_API_TOKEN": "alpha-secret"}
        pulled = subprocess.run([sys.executable, "-m", "excb.cli", "jobs", "--url", srv.url, "pull", job["id"],
                                 "--out", str(tmp_path / "home-copy")], capture_output=True, text=True, env=env,
                                timeout=HANG_GUARD_S)
        assert pulled.returncode == 0, pulled.stderr[-2000:]
        got = tmp_path / "home-copy" / "m-pull"
        assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in es.bundle().iterdir())
        assert hashlib.sha256((got / "model.onnx").read_bytes()).hexdigest() == sha
        assert not list((stack.home / "tmp").glob("bundle-*"))  # the server's temporary tar is gone
    db.dispose()
