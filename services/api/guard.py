"""Authenticate, then cap the body, before FastAPI reads a byte of it (issue 13, item 2).

FastAPI reads and parses a route's body *before* it resolves dependencies, so an auth dependency alone
lets an anonymous client make the server buffer any amount of JSON. :class:`AuthFirstRoute` runs in front
of that: 401 from the headers alone, 413 from ``Content-Length`` alone, and, for bodies without a length
(chunked), 413 as soon as the bytes received pass ``Settings.max_body_bytes``.
"""

from __future__ import annotations

from typing import Any, Callable, Coroutine

from fastapi import Request, Response
from fastapi.routing import APIRoute

from services.common.body import capped_receive, declared_length
from services.common.errors import ApiError

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def too_large(limit: int) -> str:
    return f"request body is larger than {limit} bytes (EXCB_MAX_BODY_BYTES)"


class AuthFirstRoute(APIRoute):
    """A control-plane route: the caller is authenticated and the body capped before the body is read."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            plane = request.app.state.plane
            request.state.principal = plane.auth.authenticate(request)  # headers only
            limit = plane.settings.max_body_bytes
            length = declared_length(request)
            if length is not None and length > limit:
                raise ApiError(413, "payload_too_large", too_large(limit))
            return await handler(Request(request.scope, capped_receive(request.receive, limit, too_large(limit))))

        return guarded
