"""Issue 32, "Serving (as TEI / Infinity users expect)", on the control plane over a real job store: ``GET /health``,
``HEAD /metrics``, one ``EXCB_API_KEY``, CORS off by default and on for listed origins, and the Prometheus
conventions (process/python collectors, job histograms and outcome counters, running jobs' training balance
scoped per key, no ``_created`` series, OpenMetrics on request). Jobs move through their states with the job
store's own functions, the ones a worker calls (no trainer runs here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

SHORT = {"preset": "cpu-small", "data": "digits", "max_steps": 50}
ORIGIN = "http://app.example"


@pytest.fixture
def api(make_stack: Any, tmp_path: Path) -> Any:
    stack = make_stack(f"sqlite:///{tmp_path / 'conv.sqlite'}", None)
    stack.client = stack.start_api()
    return stack


def _preflight(client: Any, origin: str = ORIGIN) -> Any:
    return client.options("/v1/jobs", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                               "Access-Control-Request-Headers": "authorization,content-type"})


def test_health_is_livez_and_head_metrics_answers_like_get(api: Any) -> None:
    """Before: GET /health and HEAD /metrics were 404 and 405."""
    r = api.client.get("/health")
    assert r.status_code == 200 and r.json() == api.client.get("/livez").json()
    got, head = api.client.get("/metrics"), api.client.head("/metrics")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]


def test_cors_origins_let_a_browser_app_call_the_api(api: Any, make_stack: Any, tmp_path: Path) -> None:
    """CORS stays off by default (a preflight is 405, no CORS header). Before: EXCB_CORS_ORIGINS did nothing and
    every preflight was 405. Now a listed origin's preflight is answered (methods, the Authorization header),
    its answers - a 401 included - carry the origin, and an origin not listed gets no CORS header."""
    off = _preflight(api.client)
    assert off.status_code == 405 and "access-control-allow-origin" not in off.headers
    stack = make_stack(f"sqlite:///{tmp_path / 'cors.sqlite'}", None,
                       cors_origins=f"{ORIGIN},http://other.example", api_key="k-secret")
    c = stack.start_api()
    r = _preflight(c)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    denied = _preflight(c, "http://evil.example")
    assert denied.status_code == 400 and "access-control-allow-origin" not in denied.headers
    unauth = c.get("/v1/jobs", headers={"Origin": ORIGIN})
    assert unauth.status_code == 401 and unauth.headers["access-control-allow-origin"] == ORIGIN
    ok = c.get("/v1/jobs", headers={"Origin": ORIGIN, "Authorization": "Bearer k-secret"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN


def test_one_api_key_from_the_environment_beside_the_keys_file(make_stack: Any, tmp_path: Path) -> None:
    """Before: EXCB_API_KEY was ignored (no auth). Now it is a key like the file's; both work, others are 401."""
    (tmp_path / "keys").write_text("file-key\n")
    stack = make_stack(f"sqlite:///{tmp_path / 'key.sqlite'}", None, api_key="env-key",
                       api_keys_file=tmp_path / "keys")
    c = stack.start_api()
    assert c.get("/v1/jobs").status_code == 401
    assert c.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    for key in ("env-key", "file-key"):
        assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    only = make_stack(f"sqlite:///{tmp_path / 'only.sqlite'}", None, api_key="env-key").start_api()
    assert only.get("/v1/jobs").status_code == 401
    assert only.get("/v1/jobs", headers={"X-API-Key": "env-key"}).status_code == 200


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _run(db: Any, job_id: str, balance: dict[str, float]) -> Any:
    """What a worker does to a QUEUED job: lease it, mark it RUNNING, copy the trainer's balance in."""
    from services.db import jobs as store

    lease = store.acquire(db, job_id, "w@test")
    assert lease is not None
    assert store.fenced_update(db, lease, status="RUNNING", balance=balance)
    return lease


def test_prometheus_conventions_and_job_series(api: Any) -> None:
    """Before: no process_/python_ series, no job histograms or outcome counters, no training balance,
    a ``_created`` sample beside every counter, and OpenMetrics asked for got the 0.0.4 text."""
    from services.db import jobs as store
    from services.db.tables import utcnow

    db = api.app.state.plane.db
    ids = [api.client.post("/v1/jobs", json=SHORT).json()["id"] for _ in range(3)]
    _run(db, ids[0], {"normalized_entropy": 0.93, "effective_clusters": 41.5, "max_share": 0.02,
                      "empty_fraction": 0.0})
    done = _run(db, ids[1], {"normalized_entropy": 0.5})
    assert store.fenced_update(db, done, status="SUCCEEDED", finished_at=utcnow())
    store.request_cancel(db, ids[2])  # cancelled while queued: finished, never started

    r = api.client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert "_created" not in text
    fams = _families(text)
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "python_info", "python_gc_objects_collected"):
        assert name in fams, name
    assert fams["excb_jobs_submitted"].samples[0].value == 3
    finished = {s.labels["outcome"]: s.value for s in fams["excb_jobs_finished"].samples}
    assert finished == {"SUCCEEDED": 1, "FAILED": 0, "CANCELLED": 1}
    dur = {(s.name, s.labels.get("outcome"), s.labels.get("le")): s.value
           for s in fams["excb_job_duration_seconds"].samples}
    assert dur[("excb_job_duration_seconds_count", "SUCCEEDED", None)] == 1
    assert dur[("excb_job_duration_seconds_bucket", "SUCCEEDED", "+Inf")] == 1
    assert dur[("excb_job_duration_seconds_count", "CANCELLED", None)] == 0  # never started: no duration
    wait = {s.name: s.value for s in fams["excb_job_queue_wait_seconds"].samples}
    assert wait["excb_job_queue_wait_seconds_count"] == 2  # the two jobs that started
    bal = {s.labels["job"]: s.value for s in fams["excb_train_balance_effective_clusters"].samples}
    assert bal == {ids[0]: 41.5}  # running jobs only; the finished one's last balance is not current

    om = api.client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n") and om.text.count("# EOF") == 1 and "_created" not in om.text
    assert "excb_jobs_finished_total" in om.text


def test_training_balance_series_are_scoped_per_key(make_stack: Any, tmp_path: Path) -> None:
    """A key's scrape names only its own running jobs (issue 33 item 5's rule for the ``job`` label); the
    operator's key sees both."""
    (tmp_path / "keys").write_text("alpha\nbeta\n")
    (tmp_path / "admin").write_text("ops\n")
    stack = make_stack(f"sqlite:///{tmp_path / 'scope.sqlite'}", None, api_keys_file=tmp_path / "keys",
                       admin_keys_file=tmp_path / "admin")
    c = stack.start_api()
    db = stack.app.state.plane.db
    jobs = {}
    for key in ("alpha", "beta"):
        jid = c.post("/v1/jobs", json=SHORT, headers={"Authorization": f"Bearer {key}"}).json()["id"]
        _run(db, jid, {"normalized_entropy": 0.9})
        jobs[key] = jid

    def seen(key: str | None) -> set[str]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        fams = _families(c.get("/metrics", headers=headers).text)
        return {s.labels["job"] for s in fams["excb_train_balance_normalized_entropy"].samples}

    assert seen("alpha") == {jobs["alpha"]} and seen("beta") == {jobs["beta"]}
    assert seen("ops") == set(jobs.values())
