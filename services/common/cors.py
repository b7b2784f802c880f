"""CORS for a browser app calling the API from another origin: off unless ``EXCB_CORS_ORIGINS`` lists origins."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

# What a browser app sends beyond the CORS-safelisted headers, and the response headers it may read.
ALLOWED_HEADERS = ["Authorization", "X-API-Key", "Content-Type", "Idempotency-Key", "Last-Event-ID"]
EXPOSED_HEADERS = ["X-Model-Version", "Retry-After", "Location", "X-Bundle-SHA256"]


def install_cors(app: FastAPI, origins: list[str]) -> None:
    """Starlette's CORSMiddleware for ``origins`` (``*``: any). Added last, so it is the outermost layer: a
    preflight is answered before routing and auth (it carries no key), and every answer - 401s and 4xx
    errors included - carries the headers the browser needs to show it to the app. No cookies are used
    (keys travel in ``Authorization``), so credentials stay off."""
    if not origins:
        return
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "HEAD", "POST", "DELETE"],
                       allow_headers=ALLOWED_HEADERS, expose_headers=EXPOSED_HEADERS, max_age=600)
