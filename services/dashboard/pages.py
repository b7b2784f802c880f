"""The dashboard's pages: one shell (head, top bar, API-key dialog) around each page's own ``<main>``.

Every page used to carry its own copy of the shell, so a change to the navigation meant five edits. Now
``static/layout.html`` is the shell, ``static/pages/NAME.html`` is only the page's ``<main>``, and
:data:`PAGES` says what differs per page: title, stylesheets, scripts and which nav link is current.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGES_DIR = STATIC_DIR / "pages"
ASSETS = "/dashboard/static/"
CHARTS = ("vendor/uPlot.iife.min.js", "js/common.js", "js/charts.js", "js/metrics.js")


@dataclass(frozen=True)
class Page:
    """What one page adds to the shell (asset paths are relative to ``/dashboard/static/``)."""

    title: str
    styles: tuple[str, ...]
    scripts: tuple[str, ...]
    current: str | None = None  # the nav link marked aria-current ("jobs" or "compare")


PAGES: dict[str, Page] = {
    "jobs": Page("Jobs", ("vendor/uPlot.min.css", "css/dashboard.css"), (*CHARTS, "js/jobs.js"), "jobs"),
    "job": Page("Job", ("vendor/uPlot.min.css", "css/dashboard.css"), (*CHARTS, "js/job.js")),
    "compare": Page("Compare", ("vendor/uPlot.min.css", "css/dashboard.css"), (*CHARTS, "js/compare.js"),
                    "compare"),
    "model": Page("Model", ("vendor/uPlot.min.css", "css/dashboard.css"), (*CHARTS, "js/model.js")),
    "gallery": Page("Clusters", ("css/dashboard.css", "css/gallery.css"), ("js/common.js", "js/gallery.js")),
    "corpus": Page("Corpus", ("css/dashboard.css", "css/corpus.css"), ("js/common.js", "js/corpus.js")),
}


@functools.lru_cache(maxsize=len(PAGES))
def render(name: str) -> str:
    """The whole HTML document of page ``name`` (read once per process: the files ship with the package)."""
    page = PAGES[name]
    html = (STATIC_DIR / "layout.html").read_text(encoding="utf-8")
    parts = {
        "<!--title-->": page.title,
        "<!--page-->": name,
        "<!--styles-->": "\n".join(f'<link rel="stylesheet" href="{ASSETS}{s}">' for s in page.styles),
        "<!--scripts-->": "\n".join(f'<script src="{ASSETS}{s}"></script>' for s in page.scripts),
        "<!--main-->": (PAGES_DIR / f"{name}.html").read_text(encoding="utf-8").rstrip("\n"),
    }
    for nav in ("jobs", "compare"):
        parts[f"<!--current:{nav}-->"] = ' aria-current="page"' if page.current == nav else ""
    for marker, value in parts.items():
        html = html.replace(marker, value)
    return html
