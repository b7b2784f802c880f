"""Cluster-balance dashboard: HTML pages + vendored JS that read the control plane's JSON API and SSE stream.

Mounting: include the router and nothing else — ``app.include_router(services.dashboard.router)``. The
router serves the pages *and* its own static files (``/dashboard/static/...``) through ordinary routes, so
no ``app.mount`` is needed and the router stays self-contained. The pages fetch ``/v1/...`` from the same
origin; there is no server-side rendering and no data access here, which keeps the dashboard a pure
client of the public API (what it shows is exactly what any API user can see).
"""

from services.dashboard.routes import STATIC_DIR, router

__all__ = ["router", "STATIC_DIR"]
