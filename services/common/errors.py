"""One JSON error shape for every service: ``{"error": {"type", "message", "field"}}``.

Every bad input maps to a 4xx with this body (FastAPI's default 422 list and Starlette's ``{"detail"}`` are
replaced), so clients and the dashboard parse one shape. Only genuine bugs reach the 500 handler.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("excb.errors")

# HTTP status -> default error type, for HTTPExceptions raised without an ApiError.
_STATUS_TYPES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
}

# Location prefixes FastAPI puts in front of the field name; they are not part of the field.
_LOC_PREFIXES = {"body", "query", "path", "header", "cookie"}


class ApiError(Exception):
    """An error the client caused (or must know about), rendered as the shared JSON shape."""

    def __init__(self, status: int, type: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.field = field
        self.headers = headers or {}


def error_body(type: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The one error shape, as a dict."""
    return {"error": {"type": type, "message": message, "field": field}}


def error_response(status: int, type: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSONResponse carrying the error shape."""
    return JSONResponse(error_body(type, message, field), status_code=status, headers=headers)


def field_from_loc(loc: Iterable[Any]) -> str | None:
    """``("body", "model", "width")`` -> ``"model.width"``; None when the location names no field."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in _LOC_PREFIXES:
        parts = parts[1:]
    return ".".join(parts) or None


def _validation_message(err: dict[str, Any]) -> str:
    field = field_from_loc(err.get("loc", ()))
    msg = str(err.get("msg", "invalid value"))
    return f"{field}: {msg}" if field else msg


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.type, exc.message, exc.field, exc.headers)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(exc.status_code, _STATUS_TYPES.get(exc.status_code, "http_error"), detail,
                          None, getattr(exc, "headers", None))


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    field = field_from_loc(first.get("loc", ()))
    return error_response(422, "validation_error", _validation_message(first) if first else "invalid request",
                          field)


async def _config_error(_: Request, exc: Exception) -> JSONResponse:
    field = getattr(exc, "field", None)
    message = getattr(exc, "message", str(exc))
    return error_response(422, "validation_error", f"{field}: {message}" if field else message, field)


async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error: %s", exc)
    return error_response(500, "internal", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the shared shape (call once per FastAPI app)."""
    from excb.config import ConfigError

    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(ConfigError, _config_error)
    app.add_exception_handler(Exception, _unhandled)


# Response documentation for OpenAPI, so generated clients (and schemathesis) know the error shape.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {
                "type": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": ["string", "null"]},
            },
        }
    },
}
