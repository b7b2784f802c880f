"""Property-based fuzzing of the embed service's OpenAPI spec (issue 13 item 9): whatever the input, every
route answers a 2xx/4xx (or a documented 503 under load) and never another 5xx, in the route's error shape."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings

from services.embed.app import create_app
from services.embed.registry import ModelRegistry
from services.settings import EmbedSettings, Settings
from support import embed as es


def _app(tmp: Path) -> Any:
    shutil.copytree(es.bundle(), tmp / "models" / "digits-a")
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    (tmp / "data" / "d0.png").write_bytes(es.digit_png(0))
    s = Settings(home=tmp, data_roots=[tmp / "data"],
                 embed=EmbedSettings(max_delay_ms=1.0, warmup=False, max_images_per_request=4))
    # A registry the app does not own: each fuzzed call runs the app's lifespan, which would close its own.
    registry = ModelRegistry(s.embed)
    registry.register(tmp / "models" / "digits-a")
    return create_app(s, registry)


APP = _app(Path(tempfile.mkdtemp(prefix="excb-embed-fuzz-")))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any) -> None:
    response = case.call()
    overloaded = response.status_code == 503 and "retry-after" in response.headers  # documented back-pressure
    assert response.status_code < 500 or overloaded, \
        f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert "message" in body["error"], body
