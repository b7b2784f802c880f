"""Issue 13 items 9 and 12: no 5xx from client input, bounded job settings, host:port URL allow-list, the
documented ``?status=QUEUED,RUNNING`` filter."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.auth import hash_key
from services.embed.fetch import FetchError, FetchPolicy, check_url
from services.settings import EmbedSettings, Settings
from support import HANG_GUARD_S
from support import embed as es

DEEP = '{"input": ' + "[" * 3000 + "]" * 3000 + "}"


@pytest.fixture
def embed_client(tmp_path: Path) -> TestClient:
    from services.embed.app import create_app

    shutil.copytree(es.bundle(), tmp_path / "models" / "digits-a")
    (tmp_path / "data").mkdir()
    s = Settings(home=tmp_path, data_roots=[tmp_path / "data"], embed=EmbedSettings(warmup=False))
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        yield c


def test_embed_client_input_is_never_a_500(embed_client: TestClient) -> None:
    """Before: a 256-character ?uri= (ENAMETOOLONG) and arrays nested 3000 deep answered 500."""
    r = embed_client.get("/embed", params={"uri": "a" * 256 + ".png"})  # a path (the dot), not base64
    assert r.status_code == 422 and r.json()["error"]["field"] == "uri"
    r = embed_client.post("/v1/embed", content=DEEP, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_json"


@pytest.fixture
def api(make_stack: Any, tmp_path: Path) -> Any:
    stack = make_stack(f"sqlite:///{tmp_path / 'low.sqlite'}", None)
    stack.client = stack.start_api()
    return stack


def test_job_input_is_never_a_500(api: Any) -> None:
    c = api.client
    for data in ("a" * 300, "list:" + "b" * 300, "x/" * 200 + "c" * 300):
        r = c.post("/v1/jobs", json={"data": data, "max_steps": 5})
        assert r.status_code == 422 and r.json()["error"]["field"] == "data.source", (data[:20], r.text)
    r = c.post("/v1/jobs", content='{"data": ' + "[" * 3000 + "]" * 3000 + "}",
               headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500


@pytest.mark.parametrize("change, field", [
    ({"batch_size": 10**11}, "batch_size"), ({"num_clusters": 10**10}, "model.num_clusters"),
    ({"overrides": ["data.num_workers=100000"]}, "data.num_workers"), ({"epochs": 10**9}, "epochs"),
    ({"overrides": ["data.cache_mb=100000"]}, "data.cache_mb"),
])
def test_job_settings_are_bounded(api: Any, change: dict[str, Any], field: str) -> None:
    r = api.client.post("/v1/jobs", json={"data": "digits", "max_steps": 5, **change})
    assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text


def test_non_finite_numbers_are_refused() -> None:
    from services.api.submit import check_job_bounds
    from services.common.errors import ApiError

    with pytest.raises(ApiError, match="finite"):
        check_job_bounds({"optim": {"lr": float("inf")}})
    with pytest.raises(ApiError, match="finite"):
        check_job_bounds({"optim": {"betas": [0.9, float("nan")]}})


def test_status_filter_accepts_a_comma_list(api: Any) -> None:
    """Before: the documented ?status=QUEUED,RUNNING answered 422."""
    c = api.client
    ids = [c.post("/v1/jobs", json={"data": "digits", "max_steps": 5}).json()["id"] for _ in range(2)]
    c.post(f"/v1/jobs/{ids[0]}/cancel")
    queued = c.get("/v1/jobs", params={"status": "QUEUED,RUNNING"})
    assert queued.status_code == 200 and [j["id"] for j in queued.json()["items"]] == [ids[1]]
    both = c.get("/v1/jobs", params=[("status", "QUEUED"), ("status", "CANCELLED,CANCELLING")]).json()["items"]
    assert sorted(j["id"] for j in both) == sorted(ids)
    bad = c.get("/v1/jobs", params={"status": "QUEUED,BOGUS"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "status"


def test_url_allow_list_is_host_and_port() -> None:
    """Before: an allowed host was allowed on every port (a redirect reached Redis on 6379)."""
    loopback = lambda host, port: ["127.0.0.1"]  # noqa: E731 - a DNS answer, injected
    policy = FetchPolicy.build(["127.0.0.1", "img.local:8080", "[::1]:9000"], ["127.0.0.1/32", "::1/128"],
                               1000, 1.0, 2)
    assert check_url("http://127.0.0.1/a.png", policy, loopback).port == 80
    assert check_url("http://img.local:8080/a.png", policy, loopback).port == 8080
    assert check_url("http://[::1]:9000/a.png", policy, lambda h, p: ["::1"]).port == 9000
    for url in ("http://127.0.0.1:6379/", "http://127.0.0.1:443/a.png", "http://img.local/a.png",
                "http://[::1]/a.png"):
        with pytest.raises(FetchError) as info:
            check_url(url, policy, loopback)
        assert info.value.code == "url_not_allowed", url


@pytest.mark.parametrize("mode, keys, open_", [("auto", True, False), ("auto", False, True), ("off", True, True),
                                                ("on", True, False)])
def test_ops_routes_need_a_key_when_keys_exist(make_stack: Any, tmp_path: Path, mode: str, keys: bool,
                                               open_: bool) -> None:
    """Before: with API keys configured, /metrics, /v1/info, /docs and /openapi.json answered anyone (item 11)."""
    settings: dict[str, Any] = {"ops_routes_auth": mode}
    if keys:
        (tmp_path / "keys").write_text("alpha-secret\n")
        settings["api_keys_file"] = tmp_path / "keys"
    stack = make_stack(f"sqlite:///{tmp_path / 'ops.sqlite'}", None, **settings)
    c = stack.start_api()
    for path in ("/metrics", "/v1/info", "/docs", "/redoc", "/openapi.json"):
        r = c.get(path)
        assert r.status_code == (200 if open_ else 401), (path, r.status_code)
        if not open_:
            assert r.json()["error"]["type"] == "unauthorized"
            assert c.get(path, headers={"Authorization": "Bearer alpha-secret"}).status_code == 200, path
    assert c.get("/livez").status_code == 200  # probes stay open


def test_live_streams_are_capped_per_key(make_stack: Any, tmp_path: Path) -> None:
    """Before: any number of SSE streams per key, each up to a day (item 10)."""
    import httpx

    from services.api.app import create_app

    (tmp_path / "keys").write_text("alpha-secret\nbeta-secret\n")
    stack = make_stack(f"sqlite:///{tmp_path / 'sse.sqlite'}", None, api_keys_file=tmp_path / "keys",
                       max_streams_per_key=2, stream_max_seconds=30)
    app = create_app(stack.settings(), reaper=False)
    a = {"Authorization": "Bearer alpha-secret"}
    b = {"Authorization": "Bearer beta-secret"}
    with es.UvicornThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        job = c.post("/v1/jobs", json={"data": "digits", "max_steps": 5}, headers=a).json()["id"]
        bjob = c.post("/v1/jobs", json={"data": "digits", "max_steps": 5}, headers=b).json()["id"]
        with c.stream("GET", f"/v1/jobs/{job}/events", headers=a) as s1, \
                c.stream("GET", f"/v1/jobs/{job}/logs/stream", headers=a) as s2:
            assert (s1.status_code, s2.status_code) == (200, 200)
            third = c.get(f"/v1/jobs/{job}/events", headers=a)
            assert third.status_code == 429 and third.headers["retry-after"]
            assert third.json()["error"]["type"] == "too_many_streams"
            with c.stream("GET", f"/v1/jobs/{bjob}/events", headers=b) as other:  # B has its own slots
                assert other.status_code == 200
        slots = app.state.stream_slots
        deadline = time.monotonic() + HANG_GUARD_S
        while slots.active("key-" + hash_key("alpha-secret")[:16]) and time.monotonic() < deadline:
            time.sleep(0.2)  # closed streams free their slots once the server notices the disconnect
        with c.stream("GET", f"/v1/jobs/{job}/events", headers=a) as again:
            assert again.status_code == 200


def test_default_memory_limit_per_job(make_stack: Any, tmp_path: Path) -> None:
    """Item 12: an optional default memory limit for jobs that set none (the worker enforces the request's)."""
    stack = make_stack(f"sqlite:///{tmp_path / 'mem.sqlite'}", None, default_memory_limit_mb=4096)
    c = stack.start_api()
    plain = c.post("/v1/jobs", json={"data": "digits", "max_steps": 5}).json()
    own = c.post("/v1/jobs", json={"data": "digits", "max_steps": 5, "memory_limit_mb": 100}).json()
    assert (plain["request"]["memory_limit_mb"], own["request"]["memory_limit_mb"]) == (4096, 100)


def test_server_paths_stay_out_of_responses_with_keys(make_stack: Any, tmp_path: Path) -> None:
    """Item 11: with API keys, job and model responses show ids and relative paths, not the server's layout."""
    from services.db import models as model_store
    from services.db.tables import ModelRow

    (tmp_path / "keys").write_text("alpha-secret\n")
    stack = make_stack(f"sqlite:///{tmp_path / 'paths.sqlite'}", None, api_keys_file=tmp_path / "keys")
    (stack.data_root / "imgs").mkdir()
    (stack.data_root / "imgs" / "a.png").write_bytes(es.digit_png(0))
    c = stack.start_api()
    a = {"Authorization": "Bearer alpha-secret"}
    job = c.post("/v1/jobs", json={"data": "imgs", "max_steps": 5}, headers=a).json()
    assert job["config"]["out"].startswith("runs/j-") and job["config"]["data"]["source"] == "imgs"
    server_id = job["config"]["out"].split("/", 1)[1]
    db = stack.app.state.plane.db
    bundle = stack.home / "models" / "m-1"
    model_store.add_model(db, ModelRow(id="m-1", job_id=server_id, owner="key-" + hash_key("alpha-secret")[:16],
                                       status="READY", bundle_dir=str(bundle), sha256="0" * 64, model_json={}))
    texts = [c.get(f"/v1/jobs/{job['id']}", headers=a).text, c.get("/v1/jobs", headers=a).text,
             c.get("/v1/models/m-1", headers=a).text, c.get("/v1/models", headers=a).text]
    assert c.get("/v1/models/m-1", headers=a).json()["bundle_dir"] == "models/m-1"
    for text in texts:
        assert str(tmp_path) not in text, text[:300]
    shown = make_stack(f"sqlite:///{tmp_path / 'paths2.sqlite'}", None, api_keys_file=tmp_path / "keys",
                       server_paths_in_responses="on").start_api()
    assert shown.post("/v1/jobs", json={"data": "digits", "max_steps": 5}, headers=a).json()["config"]["out"] \
        .startswith(str(tmp_path))
