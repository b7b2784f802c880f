"""Issue 13: what a hostile API key (or no key) must not get from the control plane. Real job store
(SQLite and PostgreSQL), real app; the body-size test runs a real uvicorn process and reads its peak RSS."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from support import HANG_GUARD_S
from support.services import REPO, free_port

SHORT = {"preset": "cpu-small", "data": "digits", "max_steps": 50}
A = {"Authorization": "Bearer alpha-secret"}
B = {"Authorization": "Bearer beta-secret"}


def _keys_file(tmp_path: Path) -> Path:
    keys = tmp_path / "keys.txt"
    keys.write_text("alpha-secret\nbeta-secret\n")
    return keys


@pytest.fixture
def two_keys(db_url: str, make_stack: Any, tmp_path: Path) -> Any:
    # These tests read each job's run dir from its response: show server paths (hidden by default with keys).
    stack = make_stack(db_url, None, api_keys_file=_keys_file(tmp_path), max_running_jobs_per_key=5,
                       server_paths_in_responses="on")
    stack.client = stack.start_api()
    return stack


def _run_dir(job: dict[str, Any]) -> Path:
    return Path(job["config"]["out"])


def test_client_job_ids_are_scoped_per_key(two_keys: Any) -> None:
    """B reusing A's job id gets a job of its own: no 409 that reveals A's id, no view of A's files."""
    c = two_keys.client
    a = c.post("/v1/jobs", json={**SHORT, "job_id": "team-a-nightly"}, headers=A)
    assert a.status_code == 201, a.text
    (_run_dir(a.json())).mkdir(parents=True)
    (_run_dir(a.json()) / "job.log").write_text("A's private log\n")
    b = c.post("/v1/jobs", json={**SHORT, "max_steps": 7, "job_id": "team-a-nightly"}, headers=B)
    assert b.status_code == 201, b.text  # today: 409 "job id is taken"
    assert b.json()["id"] == "team-a-nightly" and b.headers["location"] == "/v1/jobs/team-a-nightly"
    assert _run_dir(b.json()) != _run_dir(a.json())
    seen_by_b = c.get("/v1/jobs/team-a-nightly", headers=B).json()
    assert seen_by_b["config"]["max_steps"] == 7
    assert c.get("/v1/jobs/team-a-nightly", headers=A).json()["config"]["max_steps"] == 50
    assert "A's private" not in c.get("/v1/jobs/team-a-nightly/logs", headers=B).json()["text"]
    assert "A's private" in c.get("/v1/jobs/team-a-nightly/logs", headers=A).json()["text"]
    # A server id names the job too, but only for its owner.
    server_id = _run_dir(a.json()).name
    assert c.get(f"/v1/jobs/{server_id}", headers=A).status_code == 200
    assert c.get(f"/v1/jobs/{server_id}", headers=B).status_code == 404
    # Idempotent repeat within one key still returns the first job.
    again = c.post("/v1/jobs", json={**SHORT, "job_id": "team-a-nightly"}, headers=A)
    assert again.status_code == 200 and _run_dir(again.json()) == _run_dir(a.json())
    assert [j["id"] for j in c.get("/v1/jobs", headers=B).json()["items"]] == ["team-a-nightly"]


def test_delete_removes_the_run_dir_and_a_reused_id_starts_fresh(two_keys: Any) -> None:
    """After A deletes its job, nothing of it (log, checkpoint) is reachable by a later job of that id."""
    c = two_keys.client
    first = c.post("/v1/jobs", json={**SHORT, "job_id": "nightly"}, headers=A).json()
    old = _run_dir(first)
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "last.pt").write_bytes(b"A's weights")
    (old / "job.log").write_text("A's private log\n")
    c.post("/v1/jobs/nightly/cancel", headers=A)
    assert c.delete("/v1/jobs/nightly", headers=A).status_code == 204
    assert not old.exists()  # today: the run dir stays and the next job of this id resumes from it
    runs = old.parent
    assert not [p for p in runs.rglob("*") if p.is_file()], "the deleted job's files are still on disk"
    for who in (B, A):
        again = c.post("/v1/jobs", json={**SHORT, "job_id": "nightly"}, headers=who)
        assert again.status_code == 201, again.text
        assert _run_dir(again.json()) != old and not _run_dir(again.json()).exists()
        assert c.get("/v1/jobs/nightly/logs", headers=who).json()["text"] == ""


def test_migration_keeps_old_job_ids_reachable(tmp_path: Path) -> None:
    """Rows written before client ids were scoped keep answering under their old id, for their owner only."""
    from sqlalchemy import text

    from services.db import jobs as store
    from services.db.session import Database
    from support.services import database_at_revision

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    database_at_revision(url, "0002")
    db = Database(url, run_migrations=False)
    with db.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO jobs (id, owner, status, config, request, run_dir, attempt, failures, max_attempts, "
            "lease_token, cancel_requested, publish_count, progress, latest_metrics, balance, artifacts, "
            "created_at, updated_at) VALUES ('team-a-nightly', 'key-a', 'SUCCEEDED', '{}', '{}', '/r', 0, 0, 3, "
            "0, 0, 0, '{}', '{}', '{}', '{}', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"))
    db.dispose()
    db = Database(url)
    try:
        job = store.find_owned(db, "key-a", "team-a-nightly")
        assert job is not None and store.public_id(job) == "team-a-nightly"
        assert store.find_owned(db, "key-b", "team-a-nightly") is None
    finally:
        db.dispose()


def test_body_cap_and_auth_before_body(make_stack: Any, tmp_path: Path) -> None:
    """In process: 401 wins over a big body; an authenticated body over the cap is a 413 in the error shape."""
    stack = make_stack(f"sqlite:///{tmp_path / 'c.sqlite'}", None, api_keys_file=_keys_file(tmp_path),
                       max_body_bytes=64 * 1024)
    c = stack.start_api()
    big = {**SHORT, "name": "x" * 200, "overrides": ["a=" + "1" * 100_000]}
    assert c.post("/v1/jobs", json=big).status_code == 401
    r = c.post("/v1/jobs", json=big, headers=A)
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap is counted while streaming
        yield b'{"preset": "cpu-small", "name": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    r = c.post("/v1/jobs", content=chunks(), headers={**A, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
    assert c.post("/v1/jobs", json=SHORT, headers=A).status_code == 201


# --- a real server process: memory stays bounded whatever the body -----------------------------------

MiB = 1024 * 1024


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.fixture
def api_process(make_stack: Any, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the server's RSS")
    stack = make_stack(f"sqlite:///{tmp_path / 'p.sqlite'}", None, api_keys_file=_keys_file(tmp_path),
                       max_running_jobs_per_key=5)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "services.api.app:create_app",
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            env=stack.env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            try:
                status, _ = _request(port, b"GET /livez HTTP/1.1\r\nHost: t\r\n\r\n", None, 0, False)
                if status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"API did not start: {proc.stderr.read() if proc.stderr else ''!r}")
            time.sleep(0.2)
        yield proc, port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _request(port: int, head: bytes, body: bytes | None, total: int, chunked: bool) -> tuple[int, float]:
    """Send ``head``, then stream ``total`` bytes of ``body`` repeated (in a thread, until the server stops
    reading); return the response status and the seconds it took."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    started = time.monotonic()
    sock.sendall(head)

    def pump() -> None:
        sent = 0
        try:
            while body and sent < total:
                piece = body[: total - sent]
                sock.sendall((b"%x\r\n" % len(piece)) + piece + b"\r\n" if chunked else piece)
                sent += len(piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: exactly what we want

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    reply = b""
    try:
        while b"\r\n" not in reply:
            data = sock.recv(4096)
            if not data:
                break
            reply += data
    finally:
        elapsed = time.monotonic() - started
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        sender.join(30)
    return int(reply.split(b" ", 2)[1]), elapsed


def _post_head(port: int, auth: dict[str, str], length: int | None) -> bytes:
    lines = [b"POST /v1/jobs HTTP/1.1", b"Host: 127.0.0.1:%d" % port, b"Content-Type: application/json"]
    lines += [f"{k}: {v}".encode() for k, v in auth.items()]
    lines.append(b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_300mb_body_keeps_server_memory_bounded(api_process: tuple[subprocess.Popen[bytes], int]) -> None:
    """A 300 MB POST /v1/jobs (declared or chunked, with or without a key): fast 401/413, peak RSS +< 50 MB."""
    proc, port = api_process
    small = b'{"preset": "cpu-small", "data": "digits", "max_steps": 5}'
    warm = _post_head(port, A, len(small)) + small
    assert _request(port, warm, None, 0, False)[0] == 201  # imports and caches are warm before we measure
    before = _proc_kib(proc.pid, "VmHWM")
    total = 300 * MiB
    filler = b" " * MiB  # whitespace: a valid start of a JSON document, so nothing rejects it early
    cases = [("no key, Content-Length", {}, total, 401), ("no key, chunked", {}, None, 401),
             ("key, Content-Length", A, total, 413), ("key, chunked", A, None, 413)]
    for label, auth, length, expected in cases:
        status, seconds = _request(port, _post_head(port, auth, length), filler, total, length is None)
        assert status == expected, label
        assert seconds < 10, (label, seconds)
    growth_mib = (_proc_kib(proc.pid, "VmHWM") - before) / 1024
    print(f"peak RSS growth over four 300 MB bodies: {growth_mib:.1f} MiB")
    assert growth_mib < 50, growth_mib
    assert _request(port, warm, None, 0, False)[0] == 201  # and it still serves


# --- URL fetch: one deadline, its own bounded pool -------------------------------------------------------

@pytest.fixture
def drip_server() -> Iterator[int]:
    """An allow-listable server that answers 200 and then sends one byte every 0.2 s for 30 s."""
    import http.server

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(150):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_url_fetch_has_one_wall_clock_deadline(drip_server: int) -> None:
    from services.embed.fetch import FetchError, FetchPolicy, fetch_url

    policy = FetchPolicy.build([f"127.0.0.1:{drip_server}"], ["127.0.0.1/32"], 1_000_000, 1.0, 2)
    started = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetch_url(f"http://127.0.0.1:{drip_server}/slow.png", policy)
    elapsed = time.monotonic() - started
    assert info.value.code == "fetch_timeout" and info.value.status == 422
    assert elapsed < 2.0, elapsed  # today: read until the 30 s drip ends


def test_slow_url_fetches_cannot_starve_other_routes(drip_server: int, make_stack: Any, tmp_path: Path) -> None:
    """`excb up` shape (control plane + embed in one process): slow fetches beyond the fetch pool get 503
    at once, and the job routes keep answering while the fetches hang."""
    import shutil

    import httpx

    from services.api.app import create_app
    from support.embed import UvicornThread
    from support.embed import bundle as es_bundle

    stack = make_stack(f"sqlite:///{tmp_path / 'u.sqlite'}", None,
                       embed__url_allowed_hosts=f'["127.0.0.1:{drip_server}"]',
                       embed__url_allowed_networks='["127.0.0.1/32"]', embed__url_timeout_seconds="2",
                       embed__url_max_concurrent="2")
    # a URL is fetched once a model is leased (each just before its decode, services/embed/sources.py)
    shutil.copytree(es_bundle(), stack.home / "models" / "digits-a")
    app = create_app(stack.settings(), embedded=True, reaper=False)
    results: list[tuple[int, str, float]] = []

    def fetch(base: str) -> None:
        t0 = time.monotonic()
        r = httpx.get(f"{base}/embed", params={"uri": f"http://127.0.0.1:{drip_server}/x.png"}, timeout=30)
        results.append((r.status_code, r.json()["error"]["type"], time.monotonic() - t0))

    with UvicornThread(app) as server:
        threads = [threading.Thread(target=fetch, args=(server.url,)) for _ in range(5)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        t0 = time.monotonic()
        jobs = httpx.get(f"{server.url}/v1/jobs", timeout=30)
        assert jobs.status_code == 200 and time.monotonic() - t0 < 1.0
        for t in threads:
            t.join(30)
        app.state.plane.db.dispose()
    codes = sorted((status, kind) for status, kind, _ in results)
    assert codes == [(422, "fetch_timeout")] * 2 + [(503, "overloaded")] * 3, results
    assert max(seconds for _, _, seconds in results) < 4.0, results


# --- the per-key limit holds under concurrency and on retry -------------------------------------------------

def test_per_key_limit_is_atomic_on_submit_and_retry(db_url: str, make_stack: Any, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    stack = make_stack(db_url, None, api_keys_file=_keys_file(tmp_path), max_running_jobs_per_key=2)
    c = stack.start_api()
    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(lambda _: c.post("/v1/jobs", json=SHORT, headers=A).status_code, range(10)))
    assert sorted(codes) == [201] * 2 + [429] * 8, codes  # today: up to 5 x 201
    ids = [j["id"] for j in c.get("/v1/jobs", headers=A).json()["items"]]
    for jid in ids:
        c.post(f"/v1/jobs/{jid}/cancel", headers=A)
    assert c.post("/v1/jobs", json=SHORT, headers=A).status_code == 201
    assert c.post("/v1/jobs", json=SHORT, headers=A).status_code == 201
    retried = [c.post(f"/v1/jobs/{jid}/retry", headers=A).status_code for jid in ids]
    assert retried == [429, 429], retried  # today: 202, 202 (4 active with a limit of 2)
    assert c.post("/v1/jobs", json=SHORT, headers=B).status_code == 201  # the limit is per key
