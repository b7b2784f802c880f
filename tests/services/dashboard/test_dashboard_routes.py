"""The dashboard router on its own: pages, static files, path safety, id checks, offline assets, licences.

The browser behaviour against a live stack is in test_dashboard_browser.py; these run in well under a second.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.dashboard import STATIC_DIR, router
from services.dashboard.pages import render
from services.dashboard.routes import resolve_static

PAGES = ["/dashboard", "/dashboard/jobs/j-abc123", "/dashboard/compare", "/dashboard/compare?a=j-1&b=j-2",
         "/dashboard/models/m-1a2b"]


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    app.include_router(router)
    return TestClient(app)


@pytest.mark.parametrize("path", PAGES)
def test_pages_are_html_with_a_strict_policy(client: TestClient, path: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "<script src=\"/dashboard/static/vendor/uPlot.iife.min.js\"></script>" in resp.text


def test_each_page_loads_its_own_script_and_every_asset_exists(client: TestClient) -> None:
    for page in ("jobs", "job", "compare", "model", "gallery"):
        html = render(page)
        assert f"/dashboard/static/js/{page}.js" in html and html.count('<main id="main">') == 1
        assert "<!--" not in html  # every marker of the shell was filled
        current = re.findall(r'<a href="([^"]+)" aria-current="page">', html)
        assert current == {"jobs": ["/dashboard"], "compare": ["/dashboard/compare"]}.get(page, []), page
        for ref in re.findall(r'(?:src|href)="(/dashboard/static/[^"]+)"', html):
            resp = client.get(ref)
            assert resp.status_code == 200, ref
            assert resp.content, ref


def test_no_asset_references_another_origin() -> None:
    """Offline: no CDN and no absolute URL to load anything from (links in comments/text are fine in JS)."""
    for path in [STATIC_DIR / "layout.html", *STATIC_DIR.glob("pages/*.html"), *STATIC_DIR.glob("css/*.css")]:
        text = path.read_text()
        assert not re.search(r'(?:src|href)\s*=\s*"(?:https?:)?//', text), path
        assert "@import" not in text and "url(http" not in text, path
    for path in STATIC_DIR.glob("js/*.js"):
        assert not re.search(r'fetch\(\s*["\']https?://', path.read_text()), path


@pytest.mark.parametrize("path", ["/dashboard/jobs/bad%20id", "/dashboard/jobs/.hidden",
                                  "/dashboard/models/%3Cscript%3E", "/dashboard/compare?a=x%2Fy&b=j-1",
                                  "/dashboard/compare?a=j-1&b=" + "a" * 200])
def test_malformed_ids_get_a_422_in_the_shared_error_shape(client: TestClient, path: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["type"] == "validation_error" and err["field"] in ("job_id", "model_id", "a", "b")


@pytest.mark.parametrize("rel", ["../routes.py", "..%2Froutes.py", "vendor/../../routes.py", "%2e%2e/__init__.py",
                                 "pages", "nope.js", "/etc/passwd"])
def test_static_refuses_escapes_folders_and_missing_files(client: TestClient, rel: str) -> None:
    resp = client.get("/dashboard/static/" + rel)
    assert resp.status_code == 404, (rel, resp.status_code)
    assert "def " not in resp.text and "root:" not in resp.text


def test_resolve_static_stays_inside_the_folder(tmp_path: Path) -> None:
    assert resolve_static("js/common.js") == STATIC_DIR / "js" / "common.js"
    assert resolve_static("../routes.py") is None
    assert resolve_static("js/../../__init__.py") is None
    assert resolve_static("js\\common.js") is None
    assert resolve_static("js/common.js\x00.png") is None
    assert resolve_static("") is None


def test_static_types(client: TestClient) -> None:
    js = client.get("/dashboard/static/js/common.js")
    assert "javascript" in js.headers["content-type"] and js.headers["x-content-type-options"] == "nosniff"
    assert client.get("/dashboard/static/css/dashboard.css").headers["content-type"].startswith("text/css")
    assert client.get("/dashboard/static/vendor/LICENSES").headers["content-type"].startswith("text/plain")


def test_vendored_files_match_the_recorded_sha256_and_carry_their_licence() -> None:
    vendor = STATIC_DIR / "vendor"
    listing = (vendor / "LICENSES").read_text()
    recorded = dict((name, digest) for digest, name in re.findall(r"^\s+([0-9a-f]{64})\s+(\S+)$", listing, re.M))
    files = sorted(p.name for p in vendor.iterdir() if p.name != "LICENSES")
    assert sorted(recorded) == files, "every vendored file needs a sha256 line in LICENSES (and nothing else)"
    for name, digest in recorded.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    licence = (vendor / "uPlot.LICENSE").read_text()
    assert "MIT" in listing and "Permission is hereby granted" in licence and "Leon Sorokin" in licence
