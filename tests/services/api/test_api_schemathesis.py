"""Property-based fuzzing of the control plane's OpenAPI spec (schemathesis, in-process ASGI): whatever the
input, the API answers with a documented 2xx/4xx and never a 5xx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from services.api.app import create_app
from services.settings import Settings


def _app(tmp: Path) -> Any:
    home = tmp / "home"
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    s = Settings(home=home, data_roots=[tmp / "data"], database_url=f"sqlite:///{tmp / 'fuzz.sqlite'}")
    return create_app(s, reaper=False)


_TMP = Path(__import__("tempfile").mkdtemp(prefix="excb-fuzz-"))
APP = _app(_TMP)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@pytest.mark.slow
def test_no_server_errors(case: Any) -> None:
    if case.path.endswith(("/events", "/logs/stream")):
        case.query = {**(case.query or {}), "max_seconds": 1}
    response = case.call()
    if case.path == "/readyz" and response.status_code == 503:  # documented: the fuzzed app has no worker
        assert "no live worker" in response.json()["error"]["message"]
        return
    assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and {"type", "message"} <= set(body["error"]), body


def test_spec_documents_the_job_routes() -> None:
    paths = schema.raw_schema["paths"]
    for p in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/retry",
              "/v1/jobs/{job_id}/logs", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/metrics",
              "/v1/jobs/{job_id}/cluster-sizes", "/v1/models", "/v1/models/{model_id}/activate"):
        assert p in paths, p
