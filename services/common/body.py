"""Request bodies: limits that hold before a byte is parsed (the declared length, a counting ``receive``), and
one way to turn a JSON or form body into a validated model with a 422 (never a 500) for anything else.

Used by every route class that authenticates and caps a body before FastAPI reads it (the control plane's
``AuthFirstRoute``, the embed service's OpenAI routes): a client never makes the server buffer more than
the limit, whether it declares a length or streams a chunked body.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive

from services.common.errors import ApiError, field_from_loc, validation_message

M = TypeVar("M", bound=BaseModel)


def declared_length(request: Request) -> int | None:
    """``Content-Length`` as an int; None when absent or malformed (then the streamed bytes are counted)."""
    value = request.headers.get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def capped_receive(receive: Receive, limit: int, message: str) -> Receive:
    """``receive`` that raises 413 (``message``) once more than ``limit`` body bytes have arrived.

    It raises an HTTPException because FastAPI re-raises those from body parsing (anything else becomes a
    400); each app's handler renders it in its own error shape."""
    seen = 0

    async def receive_capped() -> Message:
        nonlocal seen
        received = await receive()
        if received["type"] == "http.request":
            seen += len(received.get("body", b""))
            if seen > limit:
                raise HTTPException(413, message)
        return received

    return receive_capped


def validation_error(exc: ValidationError) -> ApiError:
    """A pydantic error as the API's 422: the first problem, with the field it names."""
    err = exc.errors()[0]
    return ApiError(422, "validation_error", validation_message(err), field_from_loc(err.get("loc", ())))


def validate_as(model: type[M], data: Any) -> M:
    """``model.model_validate(data)``, failing as a 422 ApiError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def parse_json_object(body: bytes, model: type[M], expected: str = "a JSON object") -> M:
    """A JSON object body validated as ``model``; bad JSON, deep nesting, a non-object -> 422, never a 500."""
    try:
        raw = orjson.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, "invalid_json", f"the body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # arrays nested thousands deep (issue 13 item 9)
        raise ApiError(422, "invalid_json", "the body is nested too deeply") from exc
    if not isinstance(raw, dict):
        raise ApiError(422, "validation_error", f"the body must be {expected}")
    return validate_as(model, raw)


async def read_capped(request: Request, cap: int) -> bytes:
    """Read the body, counting bytes as they stream (Content-Length is not trusted); 413 past ``cap``.

    The body is cached on the request so ``request.form()`` parses it from memory afterwards.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise ApiError(413, "payload_too_large", f"the request body is {declared} bytes; the limit is {cap}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > cap:
            raise ApiError(413, "payload_too_large", f"the request body exceeds the limit of {cap} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001 - Starlette's documented cache for stream()/form()
    return body


def is_raw(ctype: str) -> bool:
    """A body that is one encoded image (``image/*`` or ``application/octet-stream``), not JSON or a form."""
    return ctype.startswith("image/") or ctype == "application/octet-stream"
