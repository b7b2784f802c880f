"""One JSON error shape for every service: ``{"error": {"type", "message", "field"}}``.

Every bad input maps to a 4xx with this body (FastAPI's default 422 list and Starlette's ``{"detail"}`` are
replaced), so clients and the dashboard parse one shape. Only genuine bugs reach the 500 handler.

Why this shape and not OpenAI's ``{"error": {"message", "type", "param", "code"}}`` everywhere: the OpenAI routes
(``POST /v1/embeddings``, the served ``/v1/models``) answer in OpenAI's envelope because the clients calling
them are OpenAI SDKs that parse it; everything else is excb's own API, where ``type`` is the stable
machine-readable code (OpenAI puts that in ``code`` and uses ``type`` for a coarse class) and ``field`` names
the input at fault. The two carry the same facts (``openai_compat`` maps type -> code, field -> param), and
:func:`document_errors` makes the OpenAPI spec say which route answers which.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from excb.errors import ConfigError

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


def validation_message(err: Any) -> str:
    """One pydantic error as ``field: message`` (the text every 422 carries)."""
    field = field_from_loc(err.get("loc", ()))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")  # pydantic's prefix on our own checks
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
    if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
        reason = (first.get("ctx") or {}).get("error", "")
        return error_response(422, "invalid_json", f"the body is not valid JSON: {reason}".rstrip(": "))
    field = field_from_loc(first.get("loc", ()))
    return error_response(422, "validation_error", validation_message(first) if first else "invalid request",
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
    # why the ignore below: Starlette types a handler as taking Exception; each takes the class it is registered for
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(ConfigError, _config_error)
    app.add_exception_handler(Exception, _unhandled)


class ErrorDetail(BaseModel):
    type: str = Field(description="stable machine-readable code, e.g. path_not_allowed, too_large, overloaded")
    message: str
    field: str | None = Field(None, description="the input at fault (input[2], data.source, uri), if one is")


class Error(BaseModel):
    """The error shape as a model, for ``responses=`` declarations (OpenAPI component ``Error``)."""

    error: ErrorDetail


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


ERROR_REF = "#/components/schemas/Error"
_FASTAPI_VALIDATION = "#/components/schemas/HTTPValidationError"


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Make an OpenAPI spec say what the handlers above answer: FastAPI documents every 422 as its own
    ``{"detail": [...]}`` list, which no route of ours returns; those (and the shape declared inline) become the
    ``Error`` component (routes that declare their own error model, the OpenAI ones, keep it). Idempotent;
    returns ``schema``."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.setdefault("Error", ERROR_SCHEMA)
    for item in schema.get("paths", {}).values():
        for op in item.values():
            if not isinstance(op, dict):
                continue
            for response in op.get("responses", {}).values():
                media = response.get("content", {}).get("application/json", {})
                if media.get("schema", {}).get("$ref") == _FASTAPI_VALIDATION:
                    media["schema"] = {"$ref": ERROR_REF}
                    response["description"] = "invalid input: {error: {type, message, field}}"
                elif media.get("schema") == ERROR_SCHEMA:  # declared inline: one named type for clients
                    media["schema"] = {"$ref": ERROR_REF}
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


def install_error_docs(app: FastAPI) -> None:
    """Wrap whatever builds ``app``'s OpenAPI spec (FastAPI's own or an app's custom one) with
    :func:`document_errors`; call after the app's last ``app.openapi`` replacement."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        return document_errors(build())

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema
