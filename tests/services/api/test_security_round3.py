"""Issue 33 (security round 3), items 1, 3, 4 and 5: what one API key must not get from another, and what
crafted input must not do. Real job store, real apps (in process and on a real socket), real tar archives."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from support import embed as es

A = {"Authorization": "Bearer alpha-secret"}
B = {"Authorization": "Bearer beta-secret"}
OPS = {"Authorization": "Bearer ops-secret"}
SHORT = {"data": "digits", "max_steps": 5}


def _principal(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


# --- item 3: `excb jobs pull` never writes outside --out ---------------------------------------------------

def _add(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _tar(build: Callable[[tarfile.TarFile], None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    return buf.getvalue()


def _realpath_bypass(dest: Path) -> Callable[[tarfile.TarFile], None]:
    """The CVE-2025-4517 chain (CPython's test_realpath_limit_attack): folders with long names and short
    symlinks to them, so that the expanded path passes PATH_MAX and ``os.path.realpath`` stops resolving;
    ``filter="data"`` then accepts a symlink that leaves ``dest`` and a file written through it."""
    steps = "abcdefghijklmnop"
    component = "d" * ((os.pathconf(dest, "PC_PATH_MAX") - len(str(dest)) - 1) // (len(steps) + 1))

    def build(tar: tarfile.TarFile) -> None:
        path = ""
        for step in steps:
            _add(tar, os.path.join(path, component), tarfile.DIRTYPE)
            _add(tar, os.path.join(path, step), tarfile.SYMTYPE, link=component)
            path = os.path.join(path, component)
        long_link = os.path.join(*steps, "l" * 254)
        _add(tar, long_link, tarfile.SYMTYPE, link=os.path.join(*[".."] * len(steps)))
        _add(tar, "escape", tarfile.SYMTYPE, link=os.path.join(long_link, ".."))
        _add(tar, "escape/planted", data=b"written outside --out")
    return build


CRAFTED: dict[str, Callable[[Path], Callable[[tarfile.TarFile], None]]] = {
    "realpath-bypass": _realpath_bypass,
    "dotdot": lambda _: lambda t: _add(t, "m-1/../../planted", data=b"x"),
    "absolute": lambda d: lambda t: _add(t, str(d.parent / "planted"), data=b"x"),
    "symlink-in-bundle": lambda _: lambda t: (_add(t, "m-1/ln", tarfile.SYMTYPE, link="."),
                                              _add(t, "m-1/ln/model.onnx", data=b"x")),
    "hardlink": lambda d: lambda t: _add(t, "m-1/model.onnx", tarfile.LNKTYPE, link=str(d.parent / "victim")),
    "device": lambda _: lambda t: _add(t, "m-1/null", tarfile.CHRTYPE),
    "fifo": lambda _: lambda t: _add(t, "m-1/pipe", tarfile.FIFOTYPE),
    "outside-the-model-folder": lambda _: lambda t: _add(t, "other/model.onnx", data=b"x"),
}


class _HostileServer(http.server.ThreadingHTTPServer):
    """A control plane that answers `excb jobs pull` with whatever tar the test hands it."""

    archive = b""
    sha256 = ""


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HostileServer

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/v1/jobs/"):
            body = json.dumps({"id": "job", "status": "SUCCEEDED", "model_id": "m-1"}).encode()
            self._send(body, "application/json")
        else:
            self._send(self.server.archive, "application/x-tar", {"X-Bundle-SHA256": self.server.sha256})

    def _send(self, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile() -> Iterator[_HostileServer]:
    server = _HostileServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_pull_refuses_every_crafted_archive(hostile: _HostileServer, tmp_path: Path, kind: str) -> None:
    """Before: the realpath bypass wrote ``planted`` beside --out on this Python (3.11.7, filter="data"), and
    the other archives ended in tarfile's own exceptions (a traceback from `excb jobs pull`)."""
    from services.api.client import ApiClient, ApiClientError, pull_bundle

    out = tmp_path / "box" / "out"
    out.mkdir(parents=True)
    (tmp_path / "box" / "victim").write_text("keep me")
    hostile.archive = _tar(CRAFTED[kind](out))
    client = ApiClient(f"http://127.0.0.1:{hostile.server_address[1]}")
    with pytest.raises(ApiClientError) as info:
        pull_bundle(client, "job", out)
    assert info.value.type == "unsafe_bundle", info.value
    assert _files(tmp_path / "box") == ["out", "victim"], kind  # nothing written, inside or out
    assert (tmp_path / "box" / "victim").read_text() == "keep me"


def test_pull_says_so_when_the_download_is_no_tar(hostile: _HostileServer, tmp_path: Path) -> None:
    """Before: tarfile.ReadError reached `excb jobs pull` as a traceback."""
    from services.api.client import ApiClient, ApiClientError, pull_bundle

    hostile.archive = b"<html>a proxy's error page</html>" * 40
    with pytest.raises(ApiClientError) as info:
        pull_bundle(ApiClient(f"http://127.0.0.1:{hostile.server_address[1]}"), "job", tmp_path / "out")
    assert info.value.type == "corrupt_download" and _files(tmp_path / "out") == []


def test_pull_still_extracts_a_real_bundle(hostile: _HostileServer, tmp_path: Path) -> None:
    """The archive the server builds (services.api.routes_models.bundle_tar) comes through whole."""
    from services.api.client import ApiClient, pull_bundle
    from services.api.routes_models import bundle_tar

    bundle = tmp_path / "models" / "m-1"
    (bundle / "extra").mkdir(parents=True)
    (bundle / "model.onnx").write_bytes(b"onnx bytes")
    (bundle / "model.json").write_text("{}")
    (bundle / "extra" / "notes.txt").write_text("n")
    hostile.archive = bundle_tar(bundle, "m-1", tmp_path).read_bytes()
    hostile.sha256 = hashlib.sha256(b"onnx bytes").hexdigest()
    out = tmp_path / "out"
    client = ApiClient(f"http://127.0.0.1:{hostile.server_address[1]}")
    target = pull_bundle(client, "job", out)
    assert target == out / "m-1" and _files(out) == ["m-1", "m-1/extra", "m-1/extra/notes.txt", "m-1/model.json",
                                                      "m-1/model.onnx"]
    assert pull_bundle(client, "job", out) == target  # a second pull overwrites the files in place


# --- item 1: one key's run is no warm start for another, and /v1/workers does not name it ------------------

@pytest.fixture
def keyed(db_url: str, make_stack: Any, tmp_path: Path) -> Any:
    """Two tenants and an operator (EXCB_ADMIN_KEYS_FILE); server paths hidden, as by default with keys."""
    (tmp_path / "keys").write_text("alpha-secret\nbeta-secret\n")
    (tmp_path / "admin-keys").write_text("ops-secret\n")
    stack = make_stack(db_url, None, api_keys_file=tmp_path / "keys", admin_keys_file=tmp_path / "admin-keys",
                       max_running_jobs_per_key=5)
    stack.client = stack.start_api()
    return stack


def _a_running_job_with_a_checkpoint(stack: Any) -> tuple[str, Path]:
    """A's job, leased by a live worker, with a checkpoint on disk: its server id and run dir."""
    from services.db import workers as worker_store

    job = stack.client.post("/v1/jobs", json={**SHORT, "job_id": "a-nightly"}, headers=A).json()
    server_id = job["config"]["out"].split("/", 1)[1]
    run_dir = stack.settings().runs_dir.resolve() / server_id
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"A's weights")
    worker_store.beat(stack.app.state.plane.db, worker_store.Identity("host:1", "w@host", "host", 1, "q"), server_id)
    return server_id, run_dir


def test_workers_show_a_key_only_its_own_jobs(keyed: Any) -> None:
    """Before: GET /v1/workers named A's running job to every key."""
    server_id, _ = _a_running_job_with_a_checkpoint(keyed)
    c = keyed.client
    seen = {who: [i["job_id"] for i in c.get("/v1/workers", headers=h).json()["items"]]
            for who, h in (("B", B), ("A", A))}
    assert seen == {"B": [None], "A": [server_id]}, seen
    assert [i["job_id"] for i in c.get("/v1/workers", headers=OPS).json()["items"]] == [server_id]
    assert c.get("/v1/workers", headers=B).json()["live"] == 1  # the worker itself is no secret


def test_a_key_cannot_warm_start_from_another_keys_run(keyed: Any) -> None:
    """Before: B submitted checkpoint=<A's job id> (read off /v1/workers) and got 201, then a model warm-started
    from A's weights. Every way of naming A's run now answers like a run that does not exist."""
    server_id, run_dir = _a_running_job_with_a_checkpoint(keyed)
    c = keyed.client
    stolen = c.post("/v1/jobs", json={**SHORT, "checkpoint": server_id, "max_steps": 2}, headers=B)
    assert stolen.status_code == 404, stolen.text
    missing_ref = "j-0000000000000000"
    missing = c.post("/v1/jobs", json={**SHORT, "checkpoint": missing_ref}, headers=B)
    assert missing.status_code == 404, missing.text
    refs = [server_id, f"{server_id}/checkpoints/last.pt", str(run_dir), str(run_dir / "checkpoints" / "last.pt"),
            f"../runs/{server_id}", "a-nightly"]
    for who in (B, OPS):  # an operator's key reads operational views, not other keys' runs
        for ref in refs:
            r = c.post("/v1/jobs", json={**SHORT, "checkpoint": ref}, headers=who)
            shown = ref.replace(f"{run_dir.parent}/", "runs/")  # server paths in messages are shown relative
            expected = json.loads(missing.text.replace(missing_ref, shown))
            assert (r.status_code, r.json()) == (404, expected), (ref, r.text)
        r = c.post("/v1/jobs", json={**SHORT, "overrides": [f"checkpoint={server_id}"]}, headers=who)
        assert r.status_code == 404, r.text
    assert c.get("/v1/jobs", headers=B).json()["items"] == []
    for ref in (server_id, "a-nightly", f"{server_id}/checkpoints/last.pt"):  # the owner still may
        assert c.post("/v1/jobs", json={**SHORT, "checkpoint": ref}, headers=A).status_code == 201, ref


def test_a_data_root_around_the_home_opens_no_other_keys_files(db_url: str, make_stack: Any, tmp_path: Path) -> None:
    """``excb up --data-root .`` puts the server's home inside a data root: before, B could name a folder in A's
    run dir (or the models folder) as ``data.source`` and train on it. With keys, a source in the home must lie in
    one of the caller's own run dirs; other data in the root stays usable."""
    (tmp_path / "keys").write_text("alpha-secret\nbeta-secret\n")
    stack = make_stack(db_url, None, api_keys_file=tmp_path / "keys", data_roots=json.dumps([str(tmp_path)]),
                       max_running_jobs_per_key=5)
    stack.client = stack.start_api()
    server_id, run_dir = _a_running_job_with_a_checkpoint(stack)
    for folder in (run_dir / "imgs" / "c0", stack.settings().resolved_models_dir / "m-x" / "c0",
                   stack.data_root / "mine" / "c0"):
        folder.mkdir(parents=True)
        (folder / "a.png").write_bytes(es.digit_png(0))
    c = stack.client
    for source in (str(run_dir / "imgs"), str(stack.settings().resolved_models_dir / "m-x")):
        r = c.post("/v1/jobs", json={**SHORT, "data": source}, headers=B)
        assert r.status_code == 404 and r.json()["error"]["field"] == "data.source", r.text
    assert c.post("/v1/jobs", json={**SHORT, "data": str(run_dir / "imgs")}, headers=A).status_code == 201
    assert c.post("/v1/jobs", json={**SHORT, "data": str(stack.data_root / "mine")}, headers=B).status_code == 201


# --- item 4: crafted input is a 4xx or a clean answer, never a 500 or a broken stream ----------------------

@pytest.fixture
def open_api(make_stack: Any, tmp_path: Path) -> Any:
    stack = make_stack(f"sqlite:///{tmp_path / 'open.sqlite'}", None)
    stack.client = stack.start_api()
    return stack


def test_an_overlong_dashboard_asset_name_is_a_404(open_api: Any) -> None:
    """Before: ENAMETOOLONG from resolving the name answered 500."""
    r = open_api.client.get("/dashboard/static/" + "a" * 300 + ".js")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert open_api.client.get("/dashboard/static/js/common.js").status_code == 200


def _sse_events(text: str) -> list[tuple[str, str]]:
    """(event, id) of each event in an SSE body."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line and not line.startswith(":"))
        if "event" in fields:
            out.append((fields["event"], fields.get("id", "")))
    return out


@pytest.mark.parametrize("route, last_id", [("events", "99999999999999999999:0"),
                                            ("logs/stream", "99999999999999999999")])
def test_an_event_id_the_server_never_sent_restarts_the_stream(open_api: Any, route: str, last_id: str) -> None:
    """Before: ``Last-Event-ID: 99999999999999999999:0`` passed the parser, then the stream died after its 200
    headers (an integer overflow in the metrics query). Now: from the start, as for a first connect."""
    import httpx

    from services.api.app import create_app

    job = open_api.client.post("/v1/jobs", json=SHORT).json()
    Path(job["config"]["out"]).mkdir(parents=True)
    Path(job["config"]["out"], "job.log").write_text("first line\nsecond line\n")
    open_api.client.post(f"/v1/jobs/{job['id']}/cancel")
    app = create_app(open_api.settings(), reaper=False)
    with es.UvicornThread(app) as srv:
        r = httpx.get(f"{srv.url}/v1/jobs/{job['id']}/{route}", headers={"Last-Event-ID": last_id}, timeout=30)
    app.state.plane.db.dispose()
    assert r.status_code == 200
    events = _sse_events(r.text)
    assert [e for e, _ in events].count("log") == 2 and events[-1][0] == "end", r.text
    assert ("status", "-1:0") in events or route == "logs/stream", events


@pytest.mark.parametrize("change, field", [({"seed": 10**30}, "seed"), ({"seed": -1}, "seed"),
                                           ({"memory_limit_mb": 10**30}, "memory_limit_mb"),
                                           ({"overrides": [f"seed={2**40}"]}, "seed")])
def test_seed_and_memory_limit_are_bounded(open_api: Any, change: dict[str, Any], field: str) -> None:
    """Before: seed=1e30 and memory_limit_mb=1e30 (as integers) were stored and handed to the trainer."""
    r = open_api.client.post("/v1/jobs", json={**SHORT, **change})
    assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    assert "less than or equal" in r.json()["error"]["message"] or "greater than" in r.json()["error"]["message"]


def test_activating_a_bundle_that_fails_verification_is_a_409(make_stack: Any, tmp_path: Path) -> None:
    """Before (`excb up`): the route pointed active.json at a tampered bundle, then the in-process load raised:
    500. Now: 409 with the reason (server paths hidden with keys), and nothing is pointed at it."""
    import shutil

    from fastapi.testclient import TestClient

    from services.api.app import create_app
    from services.common.active_model import read_active_id
    from services.db import models as model_store
    from services.db.tables import ModelRow

    (tmp_path / "keys").write_text("alpha-secret\n")
    stack = make_stack(f"sqlite:///{tmp_path / 'act.sqlite'}", None, api_keys_file=tmp_path / "keys",
                       embed__warmup="false")
    settings = stack.settings()
    models = settings.resolved_models_dir
    app = create_app(settings, embedded=True, reaper=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        for name in ("m-good", "m-bad"):
            shutil.copytree(es.bundle(), models / name)
            sha = json.loads((models / name / "model.json").read_text())["sha256"]
            model_store.add_model(app.state.plane.db, ModelRow(id=name, job_id=None, owner=_principal("alpha-secret"),
                                                               status="READY", bundle_dir=str(models / name),
                                                               sha256=sha, model_json={}))
        with (models / "m-bad" / "model.onnx").open("ab") as fh:
            fh.write(b"tampered")
        r = c.post("/v1/models/m-bad/activate", headers=A)
        assert r.status_code == 409, r.text
        assert r.json()["error"]["type"] == "bundle_invalid" and "sha256 mismatch" in r.json()["error"]["message"]
        assert str(tmp_path) not in r.text and read_active_id(models) is None
        assert c.post("/v1/models/m-good/activate", headers=A).status_code == 200
        assert c.post("/v1/models/m-bad/activate", headers=A).status_code == 409
        assert read_active_id(models) == "m-good" and c.get("/v1/models/m-good", headers=A).json()["active"]
        app.state.plane.db.dispose()


# --- item 5: what a valid key learns about other keys and about the server -------------------------------

def test_metrics_info_and_errors_show_a_key_only_its_own(make_stack: Any, tmp_path: Path) -> None:
    """`excb up` shape with two tenants' models loaded. Before: every key's /metrics named both models, /v1/info
    and the model routes showed absolute bundle and run paths, a 422 path error and a warm start's
    ``config.checkpoint`` named absolute server paths."""
    import shutil

    from fastapi.testclient import TestClient

    from services.api.app import create_app
    from services.db import models as model_store
    from services.db.tables import ModelRow

    (tmp_path / "keys").write_text("alpha-secret\nbeta-secret\n")
    (tmp_path / "admin-keys").write_text("ops-secret\n")
    stack = make_stack(f"sqlite:///{tmp_path / 'leaks.sqlite'}", None, api_keys_file=tmp_path / "keys",
                       admin_keys_file=tmp_path / "admin-keys", embed__warmup="false")
    settings = stack.settings()
    models = settings.resolved_models_dir
    (stack.data_root / "imgs").mkdir()
    (stack.data_root / "imgs" / "a.png").write_bytes(es.digit_png(0))
    (stack.data_root / "imgs" / "escape.png").symlink_to(tmp_path / "keys")
    app = create_app(settings, embedded=True, reaper=False)
    with TestClient(app) as c:
        for name, key, headers in (("m-alpha", "alpha-secret", A), ("m-beta", "beta-secret", B)):
            shutil.copytree(es.bundle(), models / name)
            sha = json.loads((models / name / "model.json").read_text())["sha256"]
            model_store.add_model(app.state.plane.db, ModelRow(
                      id=name, job_id=None, owner=_principal(key), status="READY", bundle_dir=str(models / name),
                      sha256=sha, model_json=json.loads((models / name / "model.json").read_text())))
            assert c.post(f"/v1/models/{name}/activate", headers=headers).status_code == 200

        def series(headers: dict[str, str]) -> set[str]:
            text = c.get("/metrics", headers=headers).text
            return {name for name in ("m-alpha", "m-beta") if f'model="{name}"' in text}

        assert series(A) == {"m-alpha"} and series(B) == {"m-beta"}  # before: both, to either key
        assert series(OPS) == {"m-alpha", "m-beta"}

        info = c.get("/v1/info", headers=A)
        assert [m["bundle_dir"] for m in info.json()["embed"]["models"]] == ["models/m-alpha"], info.text
        model = c.get("/v1/models/m-alpha", headers=A)
        bad = c.post("/v1/jobs", json={"data": "imgs", "max_steps": 5}, headers=A)
        assert bad.status_code == 422 and "escape.png" in bad.json()["error"]["message"]
        first = c.post("/v1/jobs", json=SHORT, headers=A).json()
        (stack.home / first["config"]["out"] / "checkpoints").mkdir(parents=True)
        warm = c.post("/v1/jobs", json={**SHORT, "checkpoint": first["id"]}, headers=A)
        assert warm.json()["config"]["checkpoint"] == first["config"]["out"], warm.text
        shown = c.get(f"/v1/jobs/{warm.json()['id']}", headers=A)
        for text in (info.text, model.text, bad.text, warm.text, shown.text):
            assert str(tmp_path) not in text, text[:400]
        app.state.plane.db.dispose()
