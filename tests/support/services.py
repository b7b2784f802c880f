"""Fixtures that start real components: a unique PostgreSQL database or SQLite file, a Redis db / private
redis-server, Celery worker processes and the control-plane app (reaper included)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from support import REPO_ROOT as REPO

PG_ADMIN_URL = os.environ.get("EXCB_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_DB = int(os.environ.get("EXCB_TEST_REDIS_DB", "13"))

# Tiny training config: a job takes seconds on one CPU core.
TINY_JOB: dict[str, Any] = {
    "preset": "cpu-small", "data.source": "digits", "max_steps": 24, "batch_size": 32, "epochs": 1000,
    "model.width": 8, "model.num_clusters": 32, "model.projector_hidden_dim": 32, "model.bottleneck_dim": 16,
    "model.predictor_hidden_dim": 32, "augment.global_size": 16, "augment.local_size": 8,
    "augment.num_local_crops": 1, "checkpoint_every_steps": 4, "histogram_every_steps": 4,
    "kmeans.samples": 256, "kmeans.iterations": 5, "data.num_workers": 0, "data.limit": 512,
}


def tiny_job(**changes: Any) -> dict[str, Any]:
    """TINY_JOB as a nested dict (dotted keys expanded), with ``changes`` applied (dotted keys allowed)."""
    tree: dict[str, Any] = {}
    for key, value in {**TINY_JOB, **changes}.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (dropped afterwards)."""
    if not _reachable("127.0.0.1", 5432):
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    import psycopg

    name = f"excb_t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both job-store backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'excb.sqlite'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The shared Redis, a db number reserved for these tests (queues are unique per test)."""
    if not _reachable(REDIS_HOST, REDIS_PORT):
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    yield url


class PrivateRedis:
    """A redis-server of our own (no persistence) that a test may restart without disturbing anyone."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server binary not installed")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda: _reachable("127.0.0.1", self.port), 10, "private redis-server")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


class Stack:
    """Settings env + control-plane app + Celery worker processes for one integration test."""

    def __init__(self, tmp: Path, database_url: str, redis_url: str | None, **settings: Any) -> None:
        self.home = tmp / "home"
        self.data_root = tmp / "data"
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update({
            "EXCB_HOME": str(self.home), "EXCB_DATABASE_URL": database_url,
            "EXCB_CELERY_QUEUE": f"excb.test.{uuid.uuid4().hex[:8]}",
            "EXCB_DATA_ROOTS": json.dumps([str(self.data_root)]),
            "EXCB_HEARTBEAT_SECONDS": "0.5", "EXCB_STALL_SECONDS": "6", "EXCB_PROGRESS_INTERVAL_SECONDS": "0.5",
            "EXCB_REAPER_INTERVAL_SECONDS": "1", "EXCB_REQUEUE_AFTER_SECONDS": "5",
            "EXCB_CANCEL_GRACE_SECONDS": "20", "EXCB_LOG_JSON": "false", "OMP_NUM_THREADS": "1",
            "EXCB_RETRY_BACKOFF_SECONDS": "0.5",  # a counted retry's wait (10 s by default; a test may set its own)
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        })
        if redis_url:
            self.env["EXCB_REDIS_URL"] = redis_url
        else:
            self.env.pop("EXCB_REDIS_URL", None)
        for key, value in settings.items():
            self.env[f"EXCB_{key.upper()}"] = str(value)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.client: Any = None
        self._client_cm: Any = None

    def settings(self) -> Any:
        from services.settings import Settings

        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(self.env)
            return Settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def start_api(self) -> Any:
        from fastapi.testclient import TestClient

        from services.api.app import create_app

        self.app = create_app(self.settings())
        self._client_cm = TestClient(self.app)
        self.client = self._client_cm.__enter__()
        return self.client

    def start_worker(self, name: str | None = None) -> subprocess.Popen[bytes]:
        from services.api.embedded import worker_command

        name = name or f"w{len(self.workers)}-{uuid.uuid4().hex[:6]}@localhost"
        log = open(self.home.parent / f"{name.split('@')[0]}.log", "wb")
        proc = subprocess.Popen(worker_command(self.env["EXCB_CELERY_QUEUE"], name), env=self.env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(proc)
        return proc

    def wait_status(self, job_id: str, statuses: set[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job.get("status") in statuses:
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} did not reach {statuses} in {timeout}s; last: {job.get('status')} "
                             f"error={job.get('error')}\n{self.logs(job_id)}")

    def wait(self, job_id: str, check: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if check(job):
                return job
            time.sleep(0.2)
        raise AssertionError(f"condition not met for {job_id} in {timeout}s; last: {job}\n{self.logs(job_id)}")

    def logs(self, job_id: str) -> str:
        text = self.client.get(f"/v1/jobs/{job_id}/logs", params={"offset": 0, "limit": 1 << 20}).json()
        worker_logs = "".join(p.read_text(errors="replace")[-3000:] for p in self.home.parent.glob("w*.log"))
        return f"--- job.log\n{text.get('text', '')[-4000:]}\n--- worker logs\n{worker_logs}"

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._client_cm is not None:
            self._client_cm.__exit__(None, None, None)
            self.app.state.plane.db.dispose()


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Factory: ``make_stack(database_url, redis_url_or_None, **settings)``; everything is torn down after."""
    stacks: list[Stack] = []

    def factory(database_url: str, redis_url: str | None, **settings: Any) -> Stack:
        stack = Stack(tmp_path / f"s{len(stacks)}", database_url, redis_url, **settings)
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        stack.stop()


def database_at_revision(url: str, revision: str) -> None:
    """Create the job store at ``url`` migrated only up to ``revision`` (an older schema to upgrade from)."""
    from alembic import command

    from services.db.session import Database, _migration_lock, alembic_config

    db = Database(url, run_migrations=False)
    cfg = alembic_config()
    with _migration_lock(db.engine) as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()
    db.dispose()
