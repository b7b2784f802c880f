"""Issue 32, "Serving", on the standalone embed service as a real `excb serve` process and on a real `excb up`:
TEI's ``GET /health``, ``HEAD /metrics``, ``--api-key``, CORS for listed origins, the process collectors and no
``_created`` series, OpenMetrics on request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

import support.embed as es
from support.live import excb_up, tail, wait_http_ok
from support.services import REPO, free_port

ORIGIN = "http://app.example"


def test_excb_serve_health_head_metrics_api_key_and_cors(tmp_path: Path) -> None:
    """Before: /health 404, HEAD /metrics 405, --api-key an unknown argument, a preflight 405, no process_*
    series and a ``_created`` sample beside every counter."""
    port = free_port()
    env = {**os.environ, "EXCB_HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "EXCB_LOG_JSON": "false",
           "EXCB_CORS_ORIGINS": ORIGIN, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("EXCB_API_KEYS_FILE", None)
    env.pop("EXCB_API_KEY", None)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "excb.cli", "serve", "--model", str(es.bundle()), "--port",
                                 str(port), "--threads", "1", "--api-key", "s3cret"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{base}/readyz", proc, 90, "excb serve", lambda: tail(log))
        assert httpx.get(f"{base}/health").status_code == 200
        png = {"files": ("a.png", es.digit_png(), "image/png")}
        assert httpx.post(f"{base}/v1/embed", files=png).status_code == 401
        ok = httpx.post(f"{base}/v1/embed", files=png, headers={"Authorization": "Bearer s3cret", "Origin": ORIGIN})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
        assert "x-model-version" in ok.headers["access-control-expose-headers"].lower()
        pre = httpx.options(f"{base}/v1/embed", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
        got, head = httpx.get(f"{base}/metrics"), httpx.head(f"{base}/metrics")
        assert head.status_code == 200 and head.headers["content-type"] == got.headers["content-type"]
        assert "process_resident_memory_bytes" in got.text and "python_info{" in got.text
        assert "excb_embed_images_total" in got.text and "_created" not in got.text
        om = httpx.get(f"{base}/metrics", headers={"Accept": "application/openmetrics-text"})
        assert om.headers["content-type"].startswith("application/openmetrics-text") and om.text.endswith("# EOF\n")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_excb_up_api_key_flag_and_health(tmp_path: Path) -> None:
    """Before: `excb up --api-key` was an unknown argument. Now the API, the embed routes and /metrics need it;
    /health and /livez do not."""
    with excb_up(tmp_path, args=("--api-key", "up-key")) as up:
        assert httpx.get(f"{up.base}/health").json() == {"status": "ok"}
        assert httpx.get(f"{up.base}/v1/jobs").status_code == 401
        assert httpx.get(f"{up.base}/embed", params={"uri": "seven.png"}).status_code == 401
        assert httpx.head(f"{up.base}/metrics").status_code == 401
        key = {"Authorization": "Bearer up-key"}
        assert httpx.get(f"{up.base}/v1/jobs", headers=key).status_code == 200
        assert httpx.head(f"{up.base}/metrics", headers=key).status_code == 200
        text = httpx.get(f"{up.base}/metrics", headers=key).text
        assert text.count("# TYPE process_cpu_seconds_total") == 1  # one registry, collectors registered once
