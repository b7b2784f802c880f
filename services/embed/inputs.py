"""What a client sends to the embed service, read and bounded: the request options, the JSON / multipart / raw
image bodies, base64 and data URIs (the streamed body cap is ``services.common.body.read_capped``). Every malformed
input becomes a 4xx here, before a model is touched (the routes in ``app.py`` only choose the parser)."""

from __future__ import annotations

from typing import Literal, Protocol

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from services.common.body import parse_json_object, validate_as
from services.common.errors import ApiError
from services.embed.fetch import FetchPolicy
from services.embed.sources import Item, resolve_inputs
from services.settings import Settings

MAX_FORM_PARTS = 1000
MAX_FORM_FIELD_BYTES = 64 * 1024


class Admission(Protocol):
    """What the parsers ask of the service (``services.embed.service.EmbedService``): the image-count limit before
    any image is read, and what a string may name (the data roots in ``settings``, URLs when fetching is on)."""

    settings: Settings
    fetch_policy: FetchPolicy

    def check_count(self, n: int, field: str) -> None: ...


class EmbedOptions(BaseModel):
    """Per-request options (JSON body fields, multipart form fields, or query parameters)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=128, description="model id or 'latest' (default)")
    normalize: bool = Field(True, description="L2-normalise the embeddings")
    return_clusters: bool = Field(True, description="include cluster assignments")
    top_k: int | None = Field(None, ge=1, description="how many nearest clusters to list")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64 = little-endian float32")


class EmbedRequest(EmbedOptions):
    """JSON body of ``POST /v1/embed``: ``input`` is one or more images named as ``services.embed.sources`` reads
    them: data URIs, base64, paths under a data root or allow-listed http(s) URLs."""

    input: str | list[str] = Field(description="images: data URIs, plain base64, paths under a data root "
                                                "(relative, or absolute inside one) or allow-listed http(s) URLs")
    user: str | None = Field(None, max_length=256, description="accepted for OpenAI-client compatibility")


async def parse_multipart(request: Request, svc: Admission) -> tuple[list[Item], EmbedOptions]:
    try:
        form = await request.form(max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS,
                                  max_part_size=MAX_FORM_FIELD_BYTES)
    except ApiError:
        raise
    except Exception as exc:  # Starlette raises HTTPException(400) for malformed or oversized forms
        detail = getattr(exc, "detail", None) or str(exc)
        raise ApiError(400, "bad_request", f"malformed multipart body: {detail}") from exc
    try:
        files: list[tuple[str, UploadFile]] = []
        fields: dict[str, str] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((key, value))
            elif key in fields:
                raise ApiError(422, "validation_error", f"{key}: given more than once", key)
            else:
                fields[key] = value
        svc.check_count(len(files), "files")
        opts = validate_as(EmbedOptions, fields)
        items: list[Item] = [(f"files[{i}]", await f.read()) for i, (_, f) in enumerate(files)]
    finally:
        await form.close()
    return items, opts


async def parse_json(body: bytes, svc: Admission) -> tuple[list[Item], EmbedOptions]:
    req = parse_json_object(body, EmbedRequest, "a JSON object with an 'input' field")
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    svc.check_count(len(inputs), "input")
    fields = [f"input[{i}]" for i in range(len(inputs))]
    items = await resolve_inputs(inputs, fields, svc.settings, svc.fetch_policy.enabled)
    return items, req  # an EmbedRequest is an EmbedOptions: no second validation


def parse_raw(body: bytes, request: Request, svc: Admission) -> tuple[list[Item], EmbedOptions]:
    """``Content-Type: image/*`` or ``application/octet-stream``: the body is one encoded image, the options
    are query parameters. No base64 (a third more bytes to send and to decode), no JSON, no multipart parser."""
    svc.check_count(1 if body else 0, "body")
    opts = validate_as(EmbedOptions, dict(request.query_params))
    return [("body", body)], opts
