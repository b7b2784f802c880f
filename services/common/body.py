"""Request-body limits that hold before a byte is parsed: the declared length, and a counting ``receive``.

Used by every route class that authenticates and caps a body before FastAPI reads it (the control plane's
``AuthFirstRoute``, the embed service's OpenAI routes): a client never makes the server buffer more than
the limit, whether it declares a length or streams a chunked body.
"""

from __future__ import annotations

from fastapi import Request
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive


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
