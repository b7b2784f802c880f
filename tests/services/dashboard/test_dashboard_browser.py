"""The dashboard in a real browser (Debian's Chromium via Playwright) against a live `excb up` stack.

`excb up` runs the real control plane, two Celery workers, the embed service and the dashboard on one port;
two short real training jobs run on it (ExCB and DINO centring). The tests check that the pages render, the
charts hold exactly the job's metric rows, a chart grows while the job runs (SSE), the cluster-size curve
appears, the compare view shows both runs and the model page shows served-traffic balance after real
/v1/embed requests. Screenshots (desktop 1366x768, phone 390x844) go to test-artifacts/screenshots/.
The tests in this module share the stack and run in file order.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from support import REPO_ROOT as REPO
from support.browser import CHROMIUM, VIEWPORTS, Page, chart_data, chromium
from support.services import free_port, tiny_job

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}

# Job A runs long enough (~30 s of steps on one core) for the page to watch it grow; B is a short contrast run.
# A takes the choices the fitted recipe makes for 8x8 digits where the tiny net can afford them (no flips, crops
# that keep most of an 8 px image, the multiscale embedding) and a stride-1 stem (16 px maps after it, not 8):
# its "more like this" purity is 0.60 where the plain tiny config gives 0.37 (PURITY_FLOOR below).
JOB_A = tiny_job(max_steps=90, histogram_every_steps=10, checkpoint_every_steps=30, name="dash-excb",
                 **{"model.embedding": "multiscale", "model.stem_stride": 1, "augment.flip_p": 0.0,
                    "augment.global_scale_min_start": 0.7, "augment.global_scale_min_end": 0.6,
                    "augment.local_scale_min": 0.3})
JOB_B = tiny_job(max_steps=16, histogram_every_steps=8, checkpoint_every_steps=8, name="dash-dino",
                 **{"balancing.method": "dino-centering"})
# chart id on the job page -> a metric key every row of that chart carries
CHART_KEYS = {"loss": "loss", "lr": "lr", "changed_labels": "changed_labels", "confidence": "confidence_tr",
              "unique_labels": "unique_labels_tr", "agreement": "label_agreement", "llb_lhb": "llb_min",
              "empty_fraction": "s_empty_fraction", "effective_clusters": "s_effective_clusters",
              "entropy": "s_entropy"}


class LiveStack:
    """`excb up` as a subprocess on a free port, with a tiny HTTP client for the test's own API calls."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.home = tmp / "home"
        self.log_path = tmp / "up.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXCB_")}
        env.update({"EXCB_LOG_JSON": "false", "EXCB_EMBED__RESCAN_SECONDS": "1", "OMP_NUM_THREADS": "1",
                    "EXCB_PROGRESS_INTERVAL_SECONDS": "0.5", "EXCB_HEARTBEAT_SECONDS": "1",
                    "EXCB_CANCEL_GRACE_SECONDS": "5", "EXCB_EMBED__WARMUP": "false",
                    "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "excb.cli", "up", "--home", str(self.home), "--port", str(self.port),
             "--workers", "2"], env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"content-type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return body

    def wait(self, what: str, check: Callable[[], Any], timeout: float, every: float = 0.3) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"excb up exited with {self.proc.returncode}\n{self.tail()}")
            try:
                value = check()
            except (urllib.error.URLError, ConnectionError):
                value = None
            if value:
                return value
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.tail()}")

    def job_when(self, job_id: str, check: Callable[[dict[str, Any]], bool], what: str,
                 timeout: float) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            job = self.get(f"/v1/jobs/{job_id}")
            if job["status"] in ("FAILED", "CANCELLED"):
                raise AssertionError(f"job {job_id} {job['status']}: {job['error']}\n{self.tail()}")
            return job if check(job) else None
        return self.wait(f"job {job_id}: {what}", probe, timeout)

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        return self.get(f"/v1/jobs/{job_id}/metrics?limit=10000")["items"]

    def tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's Chromium is not installed (apt-get install -y chromium)")
    live = LiveStack(tmp_path_factory.mktemp("dash"))
    try:
        live.wait("the control plane", lambda: live.request("GET", "/v1/jobs")[0] == 200, 90)
        for body in (JOB_A, JOB_B):
            status, job = live.request("POST", "/v1/jobs", body)
            assert status == 201, job
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def jobs(stack: LiveStack) -> dict[str, str]:
    """Job ids by name (A: ExCB, B: DINO centring)."""
    items = stack.get("/v1/jobs")["items"]
    ids = {j["name"]: j["id"] for j in items}
    return {"a": ids["dash-excb"], "b": ids["dash-dino"]}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def _digit_pngs(n: int) -> list[str]:
    from PIL import Image
    from sklearn.datasets import load_digits

    out = []
    for img in load_digits().images[:n]:
        buf = io.BytesIO()
        Image.fromarray((img * 16).clip(0, 255).astype("uint8")).convert("RGB").resize((32, 32)).save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


# ------------------------------------------------------------------------------------------------ tests

def test_job_page_grows_live_and_holds_the_jobs_data(stack: LiveStack, jobs: dict[str, str], browser: Any) -> None:
    job_a = jobs["a"]
    stack.job_when(job_a, lambda j: j["status"] == "RUNNING", "RUNNING", 120)
    view = Page(browser, stack)
    view.open(f"/dashboard/jobs/{job_a}", "#job[data-state='ready']")
    assert view.attr("#job", "data-status") in ("RUNNING", "STARTING")
    before = int(view.attr("[data-chart='loss']", "data-points") or 0)
    # The stream adds rows while the job runs: the loss chart grows by several points without a reload.
    view.wait_attr("[data-chart='loss']", "data-points", lambda v: int(v) >= before + 5, 90_000)
    assert int(view.attr("#job", "data-sse-rows") or 0) > 0, "rows must arrive over SSE, not only by refetch"
    assert view.attr("#live", "data-state") == "open"
    assert stack.get(f"/v1/jobs/{job_a}")["status"] == "RUNNING", "the job ended before the live update was seen"
    view.wait_attr("[data-chart='cluster_sizes']", "data-points", lambda v: int(v) > 0, 60_000)
    view.shot("job-running")

    done = stack.job_when(job_a, lambda j: j["status"] == "SUCCEEDED", "SUCCEEDED", 150)
    rows = stack.metrics(job_a)
    steps = [r["step"] for r in rows]
    view.wait_attr("#job", "data-status", lambda v: v == "SUCCEEDED", 30_000)
    view.wait_attr("[data-chart='loss']", "data-last-x", lambda v: v and int(float(v)) == steps[-1], 30_000)
    for chart_id, key in CHART_KEYS.items():
        data = chart_data(view.page, chart_id)
        assert data[0] == steps, chart_id
        assert data[1] == pytest.approx([r[key] for r in rows]), chart_id
        assert view.attr(f"[data-chart='{chart_id}']", "data-points") == str(len(rows))
    curve = stack.get(f"/v1/jobs/{job_a}/cluster-sizes")
    view.wait_attr("[data-chart='cluster_sizes']", "data-step", lambda v: v == str(curve["step"]), 30_000)
    shown = view.page.evaluate(
        "() => document.querySelector(\"[data-chart='cluster_sizes']\").excbChart.curves.get('latest')")
    assert shown["relative_size"] == pytest.approx(curve["relative_size"])
    assert view.attr("[data-chart='cluster_sizes']", "data-points") == str(len(curve["rank"]))
    assert view.page.locator("[data-chart='cluster_sizes'] canvas").count() == 1
    badge = view.page.locator("#health .badge")
    assert badge.get_attribute("data-health") in ("healthy", "watch", "collapsing")
    assert "Collapsing: effective clusters <" in (badge.get_attribute("title") or "")
    assert done["progress"]["step"] == steps[-1] == JOB_A["max_steps"]
    view.shot("job-done")
    view.close()
    phone = Page(browser, stack, "phone")
    phone.open(f"/dashboard/jobs/{job_a}", "#job[data-state='ready']")
    phone.wait_attr("[data-chart='cluster_sizes']", "data-points", lambda v: int(v) > 0, 30_000)
    width = phone.page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= VIEWPORTS["phone"]["width"], f"page scrolls sideways on a phone ({width}px)"
    phone.shot("job-done")
    phone.close()


def test_jobs_table_lists_both_jobs_and_links_to_compare(stack: LiveStack, jobs: dict[str, str], browser: Any) -> None:
    stack.job_when(jobs["b"], lambda j: j["status"] in TERMINAL, "finished", 150)
    for viewport in VIEWPORTS:
        view = Page(browser, stack, viewport)
        page = view.open("/dashboard", "#jobs[data-state='ready']")
        for slot in ("a", "b"):
            row = page.locator(f"tr[data-job-id='{jobs[slot]}']")
            assert row.get_attribute("data-status") == "SUCCEEDED"
            assert row.locator(".progress").get_attribute("aria-valuenow") == "100"
            assert row.locator(f"a[href='/dashboard/jobs/{jobs[slot]}']").count() == 1
        assert view.attr("#compare-link", "aria-disabled") == "true"
        page.wait_for_selector("#models[data-state='ready']")
        view.shot("jobs")
        if viewport == "desktop":
            for slot in ("a", "b"):
                page.locator(f"tr[data-job-id='{jobs[slot]}'] input[type=checkbox]").check()
            assert view.attr("#compare-link", "aria-disabled") == "false"
            page.click("#compare-link")
            page.wait_for_selector("#compare[data-state='ready']")
            assert f"a={jobs['a']}" in page.url and f"b={jobs['b']}" in page.url
        view.close()


def test_compare_view_shows_both_runs(stack: LiveStack, jobs: dict[str, str], browser: Any) -> None:
    rows = {slot: stack.metrics(jobs[slot]) for slot in ("a", "b")}
    curves = {slot: stack.get(f"/v1/jobs/{jobs[slot]}/cluster-sizes") for slot in ("a", "b")}
    for viewport in VIEWPORTS:
        view = Page(browser, stack, viewport)
        view.open(f"/dashboard/compare?a={jobs['a']}&b={jobs['b']}", "#compare[data-state='ready']")
        assert view.attr("[data-chart='cmp_cluster_sizes']", "data-curves") == "2"
        for slot in ("a", "b"):
            assert view.attr(f"[data-chart='curve_{slot}']", "data-step") == str(curves[slot]["step"])
            assert view.attr(f"[data-chart='curve_{slot}']", "data-points") == str(len(curves[slot]["rank"]))
            assert view.attr("[data-chart='cmp_loss']", f"data-points-{slot}") == str(len(rows[slot]))
        heads = view.page.locator(".run-head")
        assert heads.count() == 2 and "dino-centering" in heads.nth(1).inner_text()
        view.shot("compare")
        view.close()


def test_model_page_shows_served_balance_after_embed_requests(stack: LiveStack, jobs: dict[str, str],
                                                              browser: Any) -> None:
    model_id = stack.job_when(jobs["a"], lambda j: bool(j["model_id"]), "a registered model", 60)["model_id"]
    stack.wait("the embed service to load the model",
               lambda: stack.request("GET", f"/v1/models/{model_id}/balance")[0] == 200, 60)
    view = Page(browser, stack)
    page = view.open(f"/dashboard/models/{model_id}", "#model[data-state='ready']")
    assert view.attr("#model", "data-served") == "0"
    assert "No served traffic yet" in page.inner_text("#served")
    view.shot("model-empty")
    status, body = stack.request("POST", "/v1/embed", {"input": _digit_pngs(24), "model": model_id})
    assert status == 200, body
    view.wait_attr("#model", "data-served", lambda v: v == "24", 30_000)
    balance = stack.get(f"/v1/models/{model_id}/balance")
    assert view.attr("[data-chart='served_sizes']", "data-curves") == "2"
    tv = float(view.attr("#served .drift", "data-drift-tv") or "nan")
    assert tv == pytest.approx(balance["drift"]["tv"])
    assert "effective clusters" in page.inner_text("#served table")
    view.wait_attr("[data-chart='drift']", "data-points", lambda v: int(v) >= 1, 15_000)
    view.shot("model-served")
    view.close()
    phone = Page(browser, stack, "phone")
    phone.open(f"/dashboard/models/{model_id}", "#model[data-state='ready']")
    phone.shot("model-served")
    phone.close()


def test_health_reading_and_empty_states(stack: LiveStack, browser: Any) -> None:
    view = Page(browser, stack)
    page = view.open("/dashboard/jobs/does-not-exist", "#job[data-state='error']")
    assert "Job not found" in page.inner_text("#job")
    levels = page.evaluate("""() => [
        Excb.health({s_effective_clusters: 60, s_empty_fraction: 0, lhb_min: 0.8}, 64).level,
        Excb.health({s_effective_clusters: 30, s_empty_fraction: 0.02, lhb_min: 0.5}, 64).level,
        Excb.health({s_effective_clusters: 60, s_empty_fraction: 0.3, lhb_min: 0.5}, 64).level,
        Excb.health({s_effective_clusters: 60, s_empty_fraction: 0, lhb_min: 0.01}, 64).level,
        Excb.health({loss: 1.0}, 64).level]""")
    assert levels == ["healthy", "watch", "collapsing", "collapsing", "unknown"]
    page = view.open("/dashboard/compare", "#compare[data-state='picking']")
    assert page.locator("#pick-a option").count() >= 2
    view.close()


# -------------------------------------------------------------------------- issue 20: cluster gallery and search

GALLERY_TYPICAL, CLUSTER_NEAREST, CLUSTER_EDGE = 8, 48, 12  # what gallery.js asks for
# "More like this" on the job's own model: mean share of the top-10 neighbours (query excluded) carrying the query's
# digit, over every 2nd of the 512 indexed training images. Measured 0.604 and 0.608 (seeds 0, 1) for JOB_A's 90
# steps, 0.37 for the plain tiny config; a 10-minute default-recipe model gives 0.918 and raw pixels 0.92
# (benchmarks/RESULTS.md "Vector index"). Chance is 0.10. The floor asks for what the issue asks of "more like
# this" (mostly the same digit: more than half of the top 10) with a margin for a 90-step run's spread.
PURITY_FLOOR = 0.50


def _index_info(stack: LiveStack, model_id: str) -> dict[str, Any] | None:
    status, body = stack.request("GET", f"/v1/models/{model_id}/index")
    if status == 200 and body.get("status", {}).get("state") == "failed":
        raise AssertionError(f"the index build failed: {body['status']}")
    return body if status == 200 and body.get("ready") else None


def _purity(stack: LiveStack, model_id: str, count: int) -> tuple[float, dict[int, int]]:
    """Mean same-label share of the top 10 (via the API) and, per query, how many of the 10 share its label."""
    same: dict[int, int] = {}
    for i in range(0, count, 2):
        status, body = stack.request("POST", "/v1/search", {"model": model_id, "image_id": i, "k": 10})
        assert status == 200, body
        label = stack.get(f"/v1/models/{model_id}/index/images/{i}")["label"]
        same[i] = sum(r["label"] == label for r in body["data"])
        assert len(body["data"]) == 10
    return sum(same.values()) / (10 * len(same)), same


def test_cluster_gallery_cluster_page_and_more_like_this(stack: LiveStack, jobs: dict[str, str], browser: Any) -> None:
    model_id = stack.job_when(jobs["a"], lambda j: bool(j["model_id"]), "a registered model", 300)["model_id"]
    info = stack.wait("the job's image index", lambda: _index_info(stack, model_id), 240, every=1)
    k = JOB_A["model"]["num_clusters"]
    assert info["meta"]["origin"] == "job" and info["meta"]["count"] == JOB_A["data"]["limit"] == 512
    listing = stack.get(f"/v1/models/{model_id}/clusters?typical={GALLERY_TYPICAL}&limit=1000")
    assert listing["num_clusters"] == len(listing["data"]) == k and sum(c["size"] for c in listing["data"]) == 512

    view = Page(browser, stack)
    page = view.open(f"/dashboard/models/{model_id}/clusters", "#gallery[data-state='ready']")
    assert view.attr("#gallery", "data-clusters") == str(k)
    cards = page.locator(".cluster-card")
    assert cards.count() == k  # every cluster, largest first, exactly as the API orders them
    shown = [(int(cards.nth(i).get_attribute("data-cluster-id") or -1),
              int(cards.nth(i).get_attribute("data-size") or -1)) for i in range(k)]
    assert shown == [(c["id"], c["size"]) for c in listing["data"]]
    for i, c in enumerate(listing["data"]):
        assert cards.nth(i).locator("img.thumb").count() == min(GALLERY_TYPICAL, c["size"])
        assert cards.nth(i).get_attribute("data-status") == c["status"]
    assert page.locator(".cluster-card[data-status='empty'] .badge").count() == listing["empty"]
    assert page.locator(".cluster-card[data-status='over-full'] .badge").count() == listing["over_full"]
    assert page.evaluate("() => [...document.querySelectorAll('img.thumb')]"
                         ".every(i => i.complete && i.naturalWidth > 0)")
    view.shot("gallery")

    biggest = listing["data"][0]
    page.click(f".cluster-card[data-cluster-id='{biggest['id']}'] a.cluster-link")
    page.wait_for_selector("#gallery[data-view='cluster'][data-state='ready']")
    ids = page.eval_on_selector_all("img.thumb", "els => els.map(e => Number(e.dataset.imageId))")
    size = biggest["size"]
    assert len(ids) == min(CLUSTER_NEAREST, size) + min(CLUSTER_EDGE, max(0, size - CLUSTER_NEAREST))
    for image_id in ids:  # every member shown carries this cluster id in the API
        assert stack.get(f"/v1/models/{model_id}/index/images/{image_id}")["cluster"] == biggest["id"]
    view.shot("cluster")

    purity, same = _purity(stack, model_id, 512)
    print(f"more-like-this purity@10 on the job's model: {purity:.3f} over {len(same)} queries")
    assert purity >= PURITY_FLOOR, purity
    query = next(i for i in ids if i in same)
    page.click(f"a.thumb-link[data-image-id='{query}']")
    page.wait_for_selector("#gallery[data-view='similar'][data-state='ready']")
    assert view.attr("#gallery", "data-image-id") == str(query) and view.attr("#gallery", "data-results") == "10"
    assert view.attr("#gallery", "data-same-label") == str(same[query])  # the page shows what the API returns
    assert page.locator("li.result img.thumb").count() == 10
    view.shot("similar")
    view.close()

    phone = Page(browser, stack, "phone")
    phone.open(f"/dashboard/models/{model_id}/clusters", "#gallery[data-state='ready']")
    width = phone.page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= VIEWPORTS["phone"]["width"], f"the gallery scrolls sideways on a phone ({width}px)"
    phone.shot("gallery")
    phone.close()


def test_index_build_route_runs_on_a_worker(stack: LiveStack, jobs: dict[str, str]) -> None:
    """POST /v1/models/{id}/index -> Celery task -> a supervised worker builds it -> the read routes serve it."""
    model_id = stack.job_when(jobs["b"], lambda j: bool(j["model_id"]), "a registered model", 300)["model_id"]
    status, body = stack.request("POST", f"/v1/models/{model_id}/index",
                                 {"source": "digits", "name": "sample300", "sample": 300, "seed": 7})
    assert status == 202, body
    info = stack.wait("the requested index", lambda: (stack.get(body["status_url"]) if stack.request(
        "GET", body["status_url"])[1].get("ready") else None), 240, every=1)
    assert info["meta"]["count"] == 300 and info["meta"]["seed"] == 7 and info["meta"]["available"] == 1797
    hits = stack.request("POST", "/v1/search", {"model": model_id, "index": "sample300", "image_id": 0, "k": 5})
    assert hits[0] == 200 and len(hits[1]["data"]) == 5
