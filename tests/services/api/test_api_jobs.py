"""Control-plane HTTP API against a real job store (SQLite and PostgreSQL): submit, validation, idempotency,
path safety, listing, cancel/retry/delete, auth and per-key limits. No worker runs here: jobs stay QUEUED."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.services import tiny_job

SHORT = {"preset": "cpu-small", "data": "digits", "max_steps": 50}


@pytest.fixture
def api(db_url: str, make_stack: Any) -> Any:
    stack = make_stack(db_url, None)
    stack.client = stack.start_api()
    return stack


def test_short_key_job_is_valid_and_yaml_equals_json(api: Any, tmp_path: Path) -> None:
    r = api.client.post("/v1/jobs", json=SHORT)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "QUEUED" and job["attempt"] == 0
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["config"]["data"]["source"] == "digits" and job["config"]["max_steps"] == 50
    assert job["config"]["out"].endswith(job["id"])  # the server owns the run dir
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(SHORT))
    from excb.config import load_file

    again = api.client.post("/jobs", json=load_file(path)).json()  # unversioned alias, YAML file content
    strip = lambda c: {k: v for k, v in c.items() if k != "out"}  # noqa: E731
    assert strip(again["config"]) == strip(job["config"])


def test_a_job_without_preset_gets_the_fitted_recipe_at_train_time(api: Any) -> None:
    """No preset: the stored config says recipe=auto with the user's keys pinned; the worker fits the rest."""
    r = api.client.post("/v1/jobs", json={"data": "digits", "budget": "10m", "overrides": ["num_clusters=128"]})
    assert r.status_code == 201, r.text
    cfg = r.json()["config"]
    assert cfg["recipe"] == "auto" and cfg["pinned"] == ["budget", "model.num_clusters"]
    assert api.client.post("/v1/jobs", json={"data": "digits", "budget": "soon"}).status_code == 422


def test_overrides_and_nested_sections(api: Any) -> None:
    job = api.client.post("/v1/jobs", json={**tiny_job(), "overrides": ["optim.lr=0.01"]}).json()
    assert job["config"]["optim"]["lr"] == 0.01 and job["config"]["model"]["width"] == 8


@pytest.mark.parametrize("body,field", [
    ({**SHORT, "max_steps": 0}, "max_steps"),
    ({**SHORT, "model": {"width": "wide"}}, "model.width"),
    ({**SHORT, "optim": {"lrr": 1}}, "optim.lrr"),
    ({**SHORT, "preset": "gpu-huge"}, "preset"),
    ({**SHORT, "gpus": -1}, "gpus"),
    ({**SHORT, "job_id": "../x"}, "job_id"),
    ({**SHORT, "overrides": ["nonsense"]}, "nonsense"),
    ({**SHORT, "batch_size": [1, 2]}, "batch_size"),
])
def test_invalid_config_is_422_naming_the_field(api: Any, body: dict[str, Any], field: str) -> None:
    r = api.client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field and field in err["message"]
    assert api.client.get("/v1/jobs").json()["items"] == []  # nothing stored


def test_non_object_body_is_422(api: Any) -> None:
    for body in ([1, 2], "text", 3):
        r = api.client.post("/v1/jobs", json=body)
        assert r.status_code == 422 and "error" in r.json()
    r = api.client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_idempotency_key_and_client_job_id(api: Any) -> None:
    h = {"Idempotency-Key": "abc-123"}
    first = api.client.post("/v1/jobs", json=SHORT, headers=h)
    second = api.client.post("/v1/jobs", json=SHORT, headers=h)
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    one = api.client.post("/v1/jobs", json={**SHORT, "job_id": "my-run-1"})
    two = api.client.post("/v1/jobs", json={**SHORT, "job_id": "my-run-1"})
    assert (one.status_code, two.status_code) == (201, 200) and two.json()["id"] == "my-run-1"
    clash = api.client.post("/v1/jobs", json={**SHORT, "max_steps": 7, "job_id": "my-run-1"})
    assert clash.status_code == 409 and clash.json()["error"]["type"] == "conflict"
    assert len(api.client.get("/v1/jobs").json()["items"]) == 2


def test_dataset_paths_must_stay_inside_data_roots(api: Any, tmp_path: Path) -> None:
    root = api.data_root
    (root / "imgs").mkdir()
    outside = tmp_path / "secret"
    outside.mkdir()
    os.symlink(outside, root / "link-out")
    ok = api.client.post("/v1/jobs", json={**SHORT, "data": "imgs"})
    assert ok.status_code == 201 and ok.json()["config"]["data"]["source"] == str((root / "imgs").resolve())
    assert api.client.post("/v1/jobs", json={**SHORT, "data": str(root / "imgs")}).status_code == 201
    for bad in ["../../etc", "/etc", str(outside), "link-out", "imgs/../../secret", "list:/etc/passwd",
                "fashion-mnist:../secret", "missing-folder"]:
        r = api.client.post("/v1/jobs", json={**SHORT, "data": bad})
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["field"] == "data.source"


def test_list_filters_and_paginates(api: Any) -> None:
    ids = [api.client.post("/v1/jobs", json=SHORT).json()["id"] for _ in range(5)]
    api.client.post(f"/v1/jobs/{ids[0]}/cancel")
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = api.client.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    assert seen == list(reversed(ids))  # newest first
    cancelled = api.client.get("/v1/jobs", params={"status": "CANCELLED"}).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert api.client.get("/v1/jobs", params={"status": "BOGUS"}).status_code == 422
    assert api.client.get("/v1/jobs", params={"cursor": "garbage!"}).status_code == 422


def test_cancel_retry_delete_state_machine(api: Any) -> None:
    jid = api.client.post("/v1/jobs", json=SHORT).json()["id"]
    assert api.client.delete(f"/v1/jobs/{jid}").status_code == 409  # not terminal
    assert api.client.post(f"/v1/jobs/{jid}/retry").status_code == 409  # not failed/cancelled
    r = api.client.post(f"/v1/jobs/{jid}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "CANCELLED"
    assert api.client.post(f"/v1/jobs/{jid}/cancel").json()["status"] == "CANCELLED"  # idempotent
    r = api.client.post(f"/v1/jobs/{jid}/retry")
    assert r.status_code == 202 and r.json()["status"] == "QUEUED"
    api.client.post(f"/v1/jobs/{jid}/cancel")
    assert api.client.delete(f"/v1/jobs/{jid}").status_code == 204
    assert api.client.get(f"/v1/jobs/{jid}").status_code == 404
    assert api.client.get(f"/v1/jobs/{jid}/cluster-sizes").status_code == 404


def test_job_views_before_training(api: Any) -> None:
    jid = api.client.post("/v1/jobs", json=SHORT).json()["id"]
    assert api.client.get(f"/v1/jobs/{jid}/metrics").json() == {"items": []}
    err = api.client.get(f"/v1/jobs/{jid}/cluster-sizes").json()["error"]
    assert err["type"] == "not_found"
    logs = api.client.get(f"/v1/jobs/{jid}/logs").json()
    assert logs["text"] == "" and logs["next_offset"] == 0
    job = api.client.get(f"/v1/jobs/{jid}").json()
    training_keys = {"epoch", "step", "total_steps", "percent", "eta_seconds"}
    assert training_keys <= set(job["progress"])
    # the corpus fields (services/corpus: chunks, images, rate) stay empty on a training job
    assert all(v is None for k, v in job["progress"].items() if k not in training_keys)
    assert job["error"] is None and job["model_id"] is None


def test_infra_routes(api: Any) -> None:
    assert api.client.get("/livez").json() == {"status": "ok"}
    ready = api.client.get("/readyz", params={"workers": "false"})
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    api.client.post("/v1/jobs", json=SHORT)
    text = api.client.get("/metrics").text
    assert 'excb_jobs{status="QUEUED"} 1.0' in text and "excb_http_requests_total" in text
    info = api.client.get("/v1/info").json()
    assert info["database"] in ("sqlite", "postgresql") and "versions" in info
    assert api.client.get("/v1/models").json() == {"items": [], "object": "list", "data": []}
    assert api.client.get("/v1/models/nope").status_code == 404


def test_worker_liveness_in_readyz_workers_and_job_views(api: Any) -> None:
    """No worker has ever beaten: /readyz is 503 saying so, and a QUEUED job says it cannot start. A heartbeat
    makes both good; a worker marked dead (what `excb up`'s supervisor does) makes them bad again at once."""
    import socket

    from services.db import workers as worker_store

    db = api.app.state.plane.db
    jid = api.client.post("/v1/jobs", json=SHORT).json()["id"]
    r = api.client.get("/readyz")
    assert r.status_code == 503 and "workers=no live worker" in r.json()["error"]["message"]
    job = api.client.get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "QUEUED" and "cannot start: no live worker" in job["status_detail"]
    listed = api.client.get("/v1/jobs").json()["items"][0]
    assert "no live worker" in listed["status_detail"]
    assert api.client.get("/v1/workers").json()["live"] == 0
    assert "excb_workers_live 0.0" in api.client.get("/metrics").text

    who = worker_store.Identity(f"{socket.gethostname()}:4242", "w@h", socket.gethostname(), 4242, "q")
    worker_store.beat(db, who, None)
    r = api.client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["workers"] == "ok: 1 live"
    assert api.client.get(f"/v1/jobs/{jid}").json()["status_detail"] == "queued: waiting for a free worker"
    workers = api.client.get("/v1/workers").json()
    assert workers["live"] == 1 and workers["reason"] is None and workers["supervisor"] is None
    item = workers["items"][0]
    assert item["name"] == who.name and item["live"] and item["heartbeat_age_seconds"] < 5
    assert api.client.get("/v1/info").json()["workers"]["live"] == 1

    worker_store.mark(db, who.name, "dead", "worker killed by SIGKILL")
    r = api.client.get("/readyz")
    message = r.json()["error"]["message"]
    assert r.status_code == 503 and who.name in message and "killed by SIGKILL" in message
    assert "cannot start" in api.client.get(f"/v1/jobs/{jid}").json()["status_detail"]


def test_api_keys_ownership_and_limit(make_stack: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    from services.common.auth import hash_key

    keys.write_text(f"# team keys\nalpha-secret\nsha256:{hash_key('beta-secret')}\n")
    stack = make_stack(f"sqlite:///{tmp_path / 'k.sqlite'}", None, api_keys_file=keys, max_running_jobs_per_key=2)
    c = stack.start_api()
    assert c.post("/v1/jobs", json=SHORT).status_code == 401
    assert c.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    a = {"Authorization": "Bearer alpha-secret"}
    b = {"X-API-Key": "beta-secret"}
    jid = c.post("/v1/jobs", json=SHORT, headers=a).json()["id"]
    assert c.get(f"/v1/jobs/{jid}", headers=a).status_code == 200
    assert c.get(f"/v1/jobs/{jid}", headers=b).status_code == 404
    assert c.post(f"/v1/jobs/{jid}/cancel", headers=b).status_code == 404
    assert c.get("/v1/jobs", headers=b).json()["items"] == []
    assert c.post("/v1/jobs", json=SHORT, headers=a).status_code == 201
    limited = c.post("/v1/jobs", json=SHORT, headers=a)
    assert limited.status_code == 429 and limited.headers["retry-after"]
    assert c.post("/v1/jobs", json=SHORT, headers=b).status_code == 201  # per key
    assert c.get("/livez").status_code == 200  # probes stay open
