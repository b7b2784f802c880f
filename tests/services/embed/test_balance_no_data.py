"""Served-traffic balance with no traffic says "no data" (issue 27 item 5): before the first assignment the
statistics of an all-zero histogram contradict each other (effective_clusters = K beside empty_fraction = 1), so
the balance JSON carries ``status: "no_data"`` and nulls, and Prometheus has no balance or drift series for the
model (only window_assignments 0). The real embed service with a real exported bundle."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from excb.method.stats import balance_stats
from services.embed.app import create_app
from services.embed.monitor import BalanceMonitor
from services.settings import EmbedSettings, Settings
from support import embed as es


def test_an_empty_window_reports_no_data_and_a_filled_one_its_statistics() -> None:
    m = BalanceMonitor(8, np.full(8, 1 / 8), window=20)
    snap = m.snapshot("x")
    assert snap["status"] == "no_data" and snap["assignments"] == 0
    assert snap["served"] is None and snap["served_raw"] is None and snap["drift"] is None
    assert snap["served_curve"] is None and snap["training"]["effective_clusters"] == pytest.approx(8)
    assert m.gauges() == {"window_assignments": 0.0}
    m.record(np.array([1, 1, 2]), np.array([1, 1, 2]))
    snap = m.snapshot("x")
    assert snap["status"] == "ok" and snap["served"] == balance_stats(np.bincount([1, 1, 2], minlength=8))
    assert m.gauges()["empty_fraction"] == pytest.approx(6 / 8) and m.gauges()["window_assignments"] == 3.0


def _series(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_metrics_and_balance_route_before_and_after_the_first_image(tmp_path: Path) -> None:
    shutil.copytree(es.bundle(), tmp_path / "models" / "digits-a")
    settings = Settings(home=tmp_path, data_roots=[tmp_path], embed=EmbedSettings(max_delay_ms=2.0))
    with TestClient(create_app(settings)) as c:
        body = c.get("/v1/models/latest/balance").json()
        assert body["status"] == "no_data" and body["served"] is None and body["drift"] is None
        text = c.get("/metrics").text
        assert _series(text, "excb_serve_balance_window_assignments") == \
            ['excb_serve_balance_window_assignments{model="digits-a"} 0.0']
        for name in ("excb_serve_balance_effective_clusters", "excb_serve_balance_empty_fraction",
                     "excb_serve_drift_kl"):
            assert _series(text, name) == [], name  # no data: absent, not K beside 1.0
        assert c.post("/v1/embed", files=[("files", ("0.png", es.digit_png(0), "image/png"))]).status_code == 200
        body = c.get("/v1/models/latest/balance").json()
        assert body["status"] == "ok" and body["served"]["total"] == 1.0
        text = c.get("/metrics").text
        assert len(_series(text, "excb_serve_balance_effective_clusters")) == 1
        assert _series(text, "excb_serve_balance_empty_fraction")[0].endswith(str(body["served"]["empty_fraction"]))
