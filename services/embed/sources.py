"""One resolver for image inputs, shared by every route that takes an image (issue 27 item 4), and the per-request
bounds on what a request makes the server load (issue 33 items 2 and 6).

An image is given either as its encoded bytes (a multipart file, or the raw body with ``Content-Type: image/*``
or ``application/octet-stream``) or as a string, which is one of:

- a data URI (``data:image/png;base64,...``) or plain base64;
- a path under a data root (``EXCB_DATA_ROOTS``): relative to a root, or absolute inside one (the same rule as a
  job's ``data.source``, ``services.common.paths``); a string is a path when it has a character outside the
  base64 alphabet (the extension's dot is enough);
- an http(s) URL on the allow-list (``services.embed.fetch``).

``GET /embed?uri=``, ``POST /v1/embed`` (JSON ``input``), ``POST /v1/embeddings`` and ``POST /v1/search``
(``image``) all call :func:`resolve_texts`; nothing is read here. Paths become a :class:`FileImage` (its size from
``stat``) and URLs a :class:`UrlImage`; the decoder reads a file inside its decode-budget reservation and a URL is
fetched just before its decode, so a request holds one loaded image at a time however many it names.

Why a byte allowance per request (:class:`RequestLoads`): a 704-byte body naming one 19 MB file 64 times made the
server read 1.2 GB before decoding anything. Files count when they are resolved, so an over-limit request is
refused (413) before a byte is read; URL bodies count as they arrive. The same object carries the request's one
deadline for all of its fetches (``url_request_timeout_seconds``): eight slow URLs no longer hold a fetch slot
for eight fetch timeouts.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import anyio

from services.common.errors import ApiError
from services.common.paths import PathNotAllowed, resolve_in_roots
from services.settings import Settings

MAX_PATH_CHARS = 4096
_BASE64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n\t ")


class RequestLoads:
    """What one request may still load from paths and URLs: bytes left, and the deadline of its fetches."""

    def __init__(self, max_bytes: int, timeout_s: float) -> None:
        self.max_bytes = int(max_bytes)
        self.left = int(max_bytes)
        self.deadline = time.monotonic() + timeout_s

    def take(self, size: int, field: str) -> None:
        """Count ``size`` bytes; 413 when the request's total would pass ``max_request_load_bytes``."""
        if size > self.left:
            raise ApiError(413, "too_large", f"the files and URLs named by this request hold more than "
                                             f"{self.max_bytes} bytes (max_request_load_bytes)", field)
        self.left -= size


@dataclass(frozen=True)
class FileImage:
    """A file under a data root, resolved and sized but not read."""

    path: Path
    size: int


@dataclass(frozen=True)
class UrlImage:
    """An allow-listed URL, fetched just before its decode within its request's ``loads``."""

    url: str
    loads: RequestLoads


Source = bytes | FileImage | UrlImage
Item = tuple[str, Source]


def input_kind(text: str, field: str | None = None) -> Literal["base64", "url", "path"]:
    """How a string names an image: ``base64`` (data URI or bare), ``url`` or ``path``; other schemes are 422."""
    if text.startswith("data:"):
        return "base64"
    lowered = text[:16].lower()
    if lowered.startswith(("http://", "https://")):
        return "url"
    if "://" in text[:64] or lowered.startswith("file:"):
        raise ApiError(422, "invalid_input", "an image is a data URI, base64, a path under a data root or an "
                                             "http(s) URL", field)
    if len(text) <= MAX_PATH_CHARS and not _BASE64_CHARS.issuperset(text):
        return "path"
    return "base64"


def decode_base64_item(text: str, field: str, max_bytes: int) -> bytes:
    """A data URI (``data:image/png;base64,...``) or bare base64 -> bytes; the media type is ignored
    (the decoder sniffs the real format from the bytes)."""
    payload = text
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(422, "invalid_input", "data URIs must be base64-encoded (data:<type>;base64,...)", field)
    payload = "".join(payload.split())
    if len(payload) > (max_bytes // 3 + 1) * 4:
        raise ApiError(413, "too_large", f"the image exceeds the limit of {max_bytes} bytes", field)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, "invalid_input", "not valid base64", field) from exc


def open_path(text: str, field: str, settings: Settings, loads: RequestLoads) -> FileImage:
    """A path under the data roots (relative, or absolute inside one; no symlink escapes), sized and counted."""
    try:
        path = resolve_in_roots(text, settings.data_roots, field=field)
    except PathNotAllowed as exc:
        raise ApiError(422, "path_not_allowed", exc.message, field) from exc
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise ApiError(404, "not_found", f"{text!r} does not exist", field) from exc
    except OSError as exc:
        raise ApiError(422, "unreadable", f"{text!r} cannot be read", field) from exc
    if not path.is_file():
        raise ApiError(422, "path_not_allowed", f"{text!r} is not a file", field)
    cap = settings.embed.max_image_bytes
    if st.st_size > cap:
        raise ApiError(413, "too_large", f"the image is {st.st_size} bytes; the limit is {cap}", field)
    loads.take(st.st_size, field)
    return FileImage(path, int(st.st_size))


def resolve_text(text: str, field: str, settings: Settings, loads: RequestLoads, urls_enabled: bool) -> Source:
    """One string input -> its source (nothing read or fetched yet); every refusal is a 4xx naming ``field``."""
    if not isinstance(text, str) or not text:
        raise ApiError(422, "validation_error", "each image must be a non-empty string", field)
    kind = input_kind(text, field)
    if kind == "url":
        if not urls_enabled:
            raise ApiError(403, "url_disabled", "URL input is disabled on this server (no allowed hosts "
                                                "configured)", field)
        return UrlImage(text, loads)
    if kind == "path":
        return open_path(text, field, settings, loads)
    return decode_base64_item(text, field, settings.embed.max_image_bytes)


def resolve_texts(texts: Sequence[str], fields: Sequence[str], settings: Settings, urls_enabled: bool) -> list[Item]:
    """Every string input of one request, sharing one :class:`RequestLoads` (file sizes are counted here, so a
    request naming too many bytes is refused before any file is read). Blocking (``stat``): run it in a thread."""
    e = settings.embed
    loads = RequestLoads(e.max_request_load_bytes, e.url_request_timeout_seconds)
    return [(field, resolve_text(text, field, settings, loads, urls_enabled)) for text, field in zip(texts, fields)]


def _names_a_path(text: object) -> bool:
    try:
        return isinstance(text, str) and bool(text) and input_kind(text) == "path"
    except ApiError:
        return False


async def resolve_inputs(texts: Sequence[str], fields: Sequence[str], settings: Settings,
                         urls_enabled: bool) -> list[Item]:
    """:func:`resolve_texts` on a worker thread when a path must be looked up; inline otherwise (base64 and data
    URIs, the common case, cost no thread hop)."""
    if any(_names_a_path(t) for t in texts):
        return await anyio.to_thread.run_sync(resolve_texts, texts, fields, settings, urls_enabled)
    return resolve_texts(texts, fields, settings, urls_enabled)


def read_file(src: FileImage, field: str) -> bytes:
    """The file's bytes, never more than it had when it was sized (a file that grew since is refused)."""
    try:
        fd = os.open(src.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(src.size + 1)
    except OSError as exc:
        raise ApiError(422, "unreadable", f"{src.path.name!r} cannot be read", field) from exc
    if len(data) > src.size:
        raise ApiError(422, "unreadable", f"{src.path.name!r} changed while it was being read", field)
    return data


def read_prefix(src: FileImage, size: int) -> bytes:
    """The first ``size`` bytes (the header the decode budget is sized from); empty when unreadable."""
    try:
        fd = os.open(src.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            return fh.read(size)
    except OSError:
        return b""


__all__ = ["decode_base64_item", "FileImage", "UrlImage", "RequestLoads", "Source", "Item", "input_kind",
           "resolve_text", "resolve_texts", "resolve_inputs", "read_file", "read_prefix"]
