"""Routes of the dashboard: its HTML pages (jobs, job, compare, model, cluster gallery) and the static files they load.

The pages are static documents (``pages.py`` puts each page's ``<main>`` in the shared shell); each reads
the ids it needs from its own URL and talks to the JSON API from the browser. Ids are checked here only for
shape (so a malformed link gets a clear 422 instead of a page that can never load); whether the job or model
exists is the API's answer, shown by the page.
"""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from services.common.errors import error_response
from services.dashboard.pages import STATIC_DIR, render

# Same alphabet the API uses for job and model ids (uuid hex, slugs); anything else cannot be an id.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")

# No inline script, nothing off-origin: the page works offline and a stray CDN reference fails loudly.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_STATIC_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter(prefix="/dashboard", tags=["dashboard"], include_in_schema=False)


def _page(name: str) -> Response:
    return Response(render(name), media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


def _bad_id(field: str, value: str) -> Response | None:
    """A 422 in the shared error shape when ``value`` cannot be an id, else None."""
    if _ID_RE.fullmatch(value):
        return None
    return error_response(422, "validation_error", f"{field} must be 1-128 characters of [A-Za-z0-9_.:-]", field)


@router.get("")
def jobs_page() -> Response:
    """Jobs table and served models: the landing page."""
    return _page("jobs")


@router.get("/jobs/{job_id}")
def job_page(job_id: str) -> Response:
    """One job: header, health badge, live charts and the cluster-size curve."""
    return _bad_id("job_id", job_id) or _page("job")


@router.get("/compare")
def compare_page(request: Request) -> Response:
    """Two runs side by side (``?a=<job>&b=<job>``); without both ids the page offers a picker."""
    for field in ("a", "b"):
        value = request.query_params.get(field)
        if value:
            bad = _bad_id(field, value)
            if bad is not None:
                return bad
    return _page("compare")


@router.get("/models/{model_id}")
def model_page(model_id: str) -> Response:
    """One served model: served-traffic balance and its drift from the training distribution."""
    return _bad_id("model_id", model_id) or _page("model")


@router.get("/models/{model_id}/clusters")
def gallery_page(model_id: str) -> Response:
    """The model's cluster gallery: every cluster's size against uniform, shares and most typical images."""
    return _bad_id("model_id", model_id) or _page("gallery")


@router.get("/models/{model_id}/clusters/{cluster}")
def cluster_page(model_id: str, cluster: int) -> Response:
    """One cluster's members: nearest the centroid, then its edge."""
    return _bad_id("model_id", model_id) or _page("gallery")


@router.get("/models/{model_id}/similar/{image_id}")
def similar_page(model_id: str, image_id: int) -> Response:
    """"More like this": the indexed images nearest to one indexed image."""
    return _bad_id("model_id", model_id) or _page("gallery")


@router.get("/corpora/{corpus_id}")
def corpus_page(corpus_id: str) -> Response:
    """One embedded corpus: search it by image, its near-duplicate groups, balanced subsets to train on or label."""
    return _bad_id("corpus_id", corpus_id) or _page("corpus")


def resolve_static(rel_path: str) -> Path | None:
    """The file under STATIC_DIR that ``rel_path`` names, or None (missing, a folder, or escaping the root)."""
    if not rel_path or "\x00" in rel_path or "\\" in rel_path:
        return None
    try:
        candidate = (STATIC_DIR / rel_path).resolve()
        if not candidate.is_relative_to(STATIC_DIR) or not candidate.is_file():
            return None
    except OSError:  # a name too long for the file system, a symlink loop: no such asset, not a 500
        return None
    return candidate


@router.get("/static/{rel_path:path}")
def static_file(rel_path: str) -> Response:
    """Vendored JS/CSS and our own assets; served from the package so the dashboard needs no network."""
    path = resolve_static(rel_path)
    if path is None:
        return error_response(404, "not_found", f"no dashboard asset {rel_path!r}", "path")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if media_type.startswith("text/") or media_type in ("application/javascript", "text/javascript"):
        media_type += "; charset=utf-8"
    headers = dict(_STATIC_HEADERS)
    if path.name in ("LICENSES",) or path.suffix == ".LICENSE":
        media_type = "text/plain; charset=utf-8"
    return FileResponse(path, media_type=media_type, headers=headers)
