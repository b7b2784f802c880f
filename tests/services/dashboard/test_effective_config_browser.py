"""The dashboard shows what runs (issue 27 item 1), in real Chromium against a real `excb up`.

A job submitted with no preset on a folder of 300 small images is fitted at train time (K=64, batch 32, 32 px
instead of the submitted 65536, 1024, 224). The job page and the jobs table show the fitted K, the health
reading uses it (a healthy run is not "Collapsing" for having 64 effective clusters out of 65536), the charts'
y-range follows it, and the job page lists the recipe's reasons and the step count the budget chose. The
similar-images page of the job's index (an unlabelled folder) prints no "null" (item 5).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from support.browser import Page, chromium
from support.live import excb_up, tail
from support.training import image_folder

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

JOB = {"data": {"source": "photos", "num_workers": 0}, "budget": "20s", "name": "default-recipe"}
FITTED_K = 64


def _wait(what: str, check: Callable[[], Any], timeout: float, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{tail(log)}")


def _y_max(page: Any, chart_id: str) -> float:
    return page.evaluate("id => document.querySelector(`[data-chart='${id}']`).excbChart.u.scales.y.max", chart_id)


def _fact(page: Any, name: str) -> str:
    return page.locator(f"#job-header dd[data-fact='{name}']").inner_text()


def test_a_default_recipe_job_shows_its_fitted_config(tmp_path: Path) -> None:
    with excb_up(tmp_path, OMP_NUM_THREADS="1", EXCB_PROGRESS_INTERVAL_SECONDS="0.5", EXCB_HEARTBEAT_SECONDS="1",
                 EXCB_INDEX__AFTER_JOB="true") as up, chromium() as browser:
        image_folder(tmp_path / "data" / "photos", 300)
        r = httpx.post(f"{up.base}/v1/jobs", json=JOB, timeout=30)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert r.json()["requested"]["model"]["num_clusters"] == 65536 and r.json()["effective"] is None

        view = Page(browser, up)
        page = view.open(f"/dashboard/jobs/{job_id}", "#job[data-state='ready']")
        assert _fact(page, "K") in ("fitted when it starts", str(FITTED_K))  # never the submitted 65536
        # The worker reports the fitted config as soon as the trainer writes it; the open page follows (SSE).
        page.wait_for_function(f"() => document.querySelector(\"dd[data-fact='K']\").textContent === '{FITTED_K}'",
                               timeout=180_000)
        assert (_fact(page, "batch"), _fact(page, "input")) == ("32", "32 px")
        assert _fact(page, "config").startswith("as run")
        page.wait_for_selector("#steps[data-chosen-by='budget']", timeout=180_000)
        job = httpx.get(f"{up.base}/v1/jobs/{job_id}", timeout=30).json()
        steps = job["recipe"]["steps"]
        assert page.locator("#steps").inner_text() == f"Steps: {steps['line']}"
        assert steps["line"].startswith(f"max_steps={job['effective']['max_steps']}: budget 20s at ")
        reasons = page.locator("#recipe ul.reasons li").all_inner_texts()
        assert reasons == job["recipe"]["reasons"]
        assert any(r.startswith(f"model.num_clusters={FITTED_K}: about one cluster per") for r in reasons)
        assert page.locator("#recipe > p").first.inner_text().startswith("Fitted to 300 images, median 32x32 px")

        def succeeded() -> dict[str, Any] | None:
            body = httpx.get(f"{up.base}/v1/jobs/{job_id}", timeout=30).json()
            assert body["status"] not in ("FAILED", "CANCELLED"), body["error"]
            return body if body["status"] == "SUCCEEDED" else None

        done = _wait("the job to succeed", succeeded, 600, up.log)
        assert done["effective"]["model"]["num_clusters"] == FITTED_K
        assert done["requested"]["model"]["num_clusters"] == 65536
        view.wait_attr("#job", "data-status", lambda v: v == "SUCCEEDED", 60_000)
        view.wait_attr("[data-chart='effective_clusters']", "data-points", lambda v: int(v) > 0, 60_000)
        assert view.attr("#charts", "data-k") == str(FITTED_K)
        badge = page.locator("#health .badge")
        assert badge.get_attribute("data-health") != "collapsing", page.locator("#health").inner_text()
        assert "Collapsing" not in page.locator("#job-header").inner_text()
        # y-ranges follow K=64: the "K = 64" line tops the effective-cluster chart, log 64 the entropy chart.
        assert FITTED_K <= _y_max(page, "effective_clusters") <= 1.2 * FITTED_K
        assert math.log(FITTED_K) <= _y_max(page, "entropy") <= 1.2 * math.log(FITTED_K)
        view.shot("job-default-recipe")
        view.close()

        table = Page(browser, up)
        jobs_page = table.open("/dashboard", f"tr[data-job-id='{job_id}']")
        row = jobs_page.locator(f"tr[data-job-id='{job_id}']")
        assert row.locator("td[data-k]").get_attribute("data-k") == str(FITTED_K)
        assert row.locator(".badge[data-health]").get_attribute("data-health") != "collapsing"
        table.close()

        model_id = done["model_id"]
        _wait("the job's image index", lambda: httpx.get(f"{up.base}/v1/models/{model_id}/index",
                                                          timeout=30).json().get("ready"), 300, up.log)
        similar = Page(browser, up)
        spage = similar.open(f"/dashboard/models/{model_id}/similar/0", "#gallery[data-state='ready']")
        text = spage.locator("main").inner_text()
        assert "null" not in text and "undefined" not in text, text[:500]
        similar.close()
