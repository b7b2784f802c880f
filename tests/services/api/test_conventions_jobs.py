"""Issue 32, "Jobs (as Ray Jobs users expect)": the Python SDK (``services.api.client.Client``) and the `excb jobs`
verbs it backs, against a real control plane on a real socket (uvicorn) and, where a job must run, a real Celery
worker process; Celery's own ``inspect ping`` against a worker on the real Redis broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

import support.embed as es
from support import HANG_GUARD_S
from support.services import REPO, tiny_job

SHORT = {"preset": "cpu-small", "data": "digits", "max_steps": 50}


def _excb(server: Any, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EXCB_API_URL": server.url, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "excb.cli", "jobs", *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=HANG_GUARD_S)


@pytest.fixture
def plane(make_stack: Any, tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """(stack, server): the control plane of ``stack`` served by uvicorn on a free port."""
    from services.api.app import create_app

    stack = make_stack(f"sqlite:///{tmp_path / 'jobs.sqlite'}", None, export_parity_images=16)
    app = create_app(stack.settings())
    stack.app = app
    try:
        with es.UvicornThread(app) as server:
            yield stack, server
    finally:
        app.state.plane.db.dispose()


def test_cli_submit_from_stdin_list_status_config_delete(plane: tuple[Any, Any]) -> None:
    """Before: `excb jobs submit -` looked for a file named '-', `status` without an id and `delete`/`config` were
    usage errors. No worker runs: the jobs stay QUEUED, so `config` shows the submitted config and says so."""
    _, server = plane
    first = _excb(server, "--json", "submit", "-", "max_steps=20", stdin=yaml.safe_dump(SHORT))
    assert first.returncode == 0, first.stderr
    a = json.loads(first.stdout)
    assert a["status"] == "QUEUED" and a["requested"]["max_steps"] == 20
    b = json.loads(_excb(server, "--json", "submit", "-", stdin=json.dumps(SHORT)).stdout)
    bad = _excb(server, "submit", "-", stdin="- just\n- a list\n")
    assert bad.returncode == 2 and bad.stderr.startswith("excb: ") and "mapping" in bad.stderr

    listed = _excb(server, "status")  # no id: the list, newest first
    assert listed.returncode == 0, listed.stderr
    rows = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert rows == [b["id"], a["id"]]
    assert _excb(server, "cancel", a["id"]).returncode == 0
    queued = _excb(server, "list", "--status", "QUEUED")
    assert [line.split()[0] for line in queued.stdout.splitlines()[1:]] == [b["id"]]

    cfg = _excb(server, "config", a["id"])
    assert cfg.returncode == 0 and "has not reported its effective config" in cfg.stderr
    assert yaml.safe_load(cfg.stdout)["max_steps"] == 20

    running = _excb(server, "delete", b["id"])  # QUEUED: not finished, refused with the API's one line
    assert running.returncode == 2 and "409 conflict" in running.stderr
    gone = _excb(server, "delete", a["id"])
    assert gone.returncode == 0 and f"{a['id']}: deleted" in gone.stdout
    missing = _excb(server, "status", a["id"])
    assert missing.returncode == 1 and "404 not_found" in missing.stderr


@pytest.mark.slow
def test_sdk_runs_a_job_to_its_model(plane: tuple[Any, Any], tmp_path: Path) -> None:
    """Before: no ``Client`` with these verbs (ImportError). A real worker trains a tiny job; the SDK submits,
    follows its log, waits, reads typed status with the effective config, pulls the bundle and deletes the job;
    `excb jobs config` prints what ran."""
    from services.api.client import ApiClientError, Client, Job

    stack, server = plane
    stack.start_worker()
    with Client(server.url) as client:
        job = client.submit(tiny_job(), ["max_steps=8"], metadata={"team": "vision"})
        assert isinstance(job, Job) and job.status == "QUEUED" and job.metadata == {"team": "vision"}
        lines = list(client.logs(job.id, follow=True))
        assert any("attempt 1" in line for line in lines), lines[-20:]
        done = client.wait(job.id, timeout=HANG_GUARD_S)
        assert done.status == "SUCCEEDED", done.error
        assert done.effective is not None and done.effective["max_steps"] == 8 and done.model_id
        assert done.progress.step == 8 and done.created_at <= done.finished_at
        assert "".join(client.logs(job.id)).count("\n") >= len(lines) - 1
        assert [j.id for j in client.list_jobs(status="SUCCEEDED")] == [job.id]
        target = client.pull(job.id, tmp_path / "pulled")
        assert target == tmp_path / "pulled" / done.model_id and (target / "model.onnx").is_file()

        shown = _excb(server, "--json", "config", job.id)
        assert shown.returncode == 0 and shown.stderr == "" and json.loads(shown.stdout) == done.effective

        client.delete(job.id)
        with pytest.raises(ApiClientError) as info:
            client.status(job.id)
        assert info.value.status == 404 and info.value.type == "not_found"


def test_wait_times_out_with_the_status_it_saw(plane: tuple[Any, Any]) -> None:
    from services.api.client import Client

    _, server = plane
    with Client(server.url) as client:
        job = client.submit(SHORT)
        with pytest.raises(TimeoutError, match="still QUEUED"):
            client.wait(job.id, timeout=1, poll_seconds=0.2)
        assert client.cancel(job.id).status == "CANCELLED"
        assert client.wait(job.id, timeout=HANG_GUARD_S).status == "CANCELLED"


def test_celery_inspect_ping_reaches_a_worker_on_redis(pg_url: str, redis_url: str, make_stack: Any) -> None:
    """Celery's own tools work on the Redis broker: `celery -A services.worker.app inspect ping` gets the
    worker's pong (README "Coming from TEI / Infinity / Ray / LightlyTrain": the embedded transport has no
    broadcast)."""
    stack = make_stack(pg_url, redis_url)
    stack.start_api()
    worker = stack.start_worker("pingme@localhost")
    out = None
    for _ in range(60):  # the worker takes a few seconds to start consuming; each try waits 2 s for replies
        out = subprocess.run([sys.executable, "-m", "celery", "-A", "services.worker.app", "inspect", "ping",
                              "-d", "pingme@localhost", "--timeout", "2"], capture_output=True, text=True,
                             env=stack.env, cwd=REPO, timeout=HANG_GUARD_S)
        if out.returncode == 0:
            break
        assert worker.poll() is None, "the worker died"
    assert out is not None and out.returncode == 0, out.stdout + out.stderr
    assert "pingme@localhost" in out.stdout and "pong" in out.stdout


def test_cli_sends_the_one_server_key(make_stack: Any, tmp_path: Path) -> None:
    """Before: `excb jobs` sent only EXCB_API_TOKEN, so with the server's one key in EXCB_API_KEY (the shell that
    ran `excb up`) every verb was a 401. EXCB_API_TOKEN, when set, still wins."""
    from services.api.app import create_app

    stack = make_stack(f"sqlite:///{tmp_path / 'key.sqlite'}", None, api_key="one-key")
    app = create_app(stack.settings())
    try:
        with es.UvicornThread(app) as server:
            env = {**os.environ, "EXCB_API_URL": server.url, "EXCB_API_KEY": "one-key",
                   "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            env.pop("EXCB_API_TOKEN", None)
            run = [sys.executable, "-m", "excb.cli", "jobs", "list"]
            ok = subprocess.run(run, capture_output=True, text=True, env=env, cwd=REPO, timeout=HANG_GUARD_S)
            assert ok.returncode == 0, ok.stderr
            bad = subprocess.run(run, capture_output=True, text=True, env={**env, "EXCB_API_TOKEN": "other"},
                                 cwd=REPO, timeout=HANG_GUARD_S)
            assert bad.returncode == 1 and "401 unauthorized" in bad.stderr
    finally:
        app.state.plane.db.dispose()
