"""A small HTTP client for the control plane (what `excb jobs ...` uses)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import IO, Any, Iterator

import httpx
from httpx_sse import SSEError, connect_sse

RECONNECT_ATTEMPTS = 10  # in a row without an event in between; then the error reaches the caller


class ApiClientError(Exception):
    """A 4xx/5xx from the API, carrying the shared error shape."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.type = err.get("type", "http_error")
        self.field = err.get("field")
        message = err.get("message", str(body))
        super().__init__(f"{status} {self.type}: {message}")


class ApiClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.http.request(method, path, **kwargs)
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = {"error": {"type": "http_error", "message": resp.text}}
            raise ApiClientError(resp.status_code, body)
        return resp.json() if resp.content else None

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=body, headers=headers)

    def list(self, status: str | None = None, limit: int = 50) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return self._call("GET", "/v1/jobs", params=params)

    def get(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def retry(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/retry")

    def logs(self, job_id: str, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        params = {"offset": offset} | ({"limit": limit} if limit else {})
        return self._call("GET", f"/v1/jobs/{job_id}/logs", params=params)

    def log_pages(self, job_id: str, limit: int = 1 << 20) -> Iterator[str]:
        """The whole log, page by page from offset 0 to the size it had when the pages were read."""
        offset = 0
        while True:
            page = self.logs(job_id, offset, limit)
            if page["text"]:
                yield page["text"]
            if page["next_offset"] <= offset or page["next_offset"] >= page["size"]:
                return
            offset = page["next_offset"]

    def stream(self, path: str, params: dict[str, Any] | None = None) -> Iterator[tuple[str, Any]]:
        """Yield ``(event, data)`` from an SSE endpoint until it sends ``end``, reconnecting with
        ``Last-Event-ID`` whenever the connection drops or the server closes it (streams live at most
        EXCB_STREAM_MAX_SECONDS); the server resumes after the last event this client saw."""
        last_id: str | None = None
        failures, delay = 0, 1.0
        while True:
            headers = {"Last-Event-ID": last_id} if last_id is not None else {}
            try:
                with connect_sse(self.http, "GET", path, params=params, headers=headers,
                                 timeout=httpx.Timeout(self.http.timeout.connect, read=None)) as source:
                    resp = source.response
                    if resp.status_code == 429:
                        delay = float(resp.headers.get("Retry-After", "1"))
                        raise httpx.TransportError("too many streams")
                    if resp.status_code >= 400:
                        resp.read()
                        raise ApiClientError(resp.status_code, _error_body(resp))
                    for sse in source.iter_sse():
                        if sse.retry is not None:
                            delay = sse.retry / 1000
                        if sse.id:
                            last_id = sse.id
                        if not sse.data:
                            continue
                        failures = 0
                        yield sse.event, json.loads(sse.data)
                        if sse.event == "end":
                            return
            except (httpx.TransportError, SSEError):
                failures += 1
                if failures > RECONNECT_ATTEMPTS:
                    raise
            time.sleep(delay)  # closed at the server's cap, or dropped: come back after its retry delay


def pull_bundle(client: ApiClient, job_id: str, out: Path) -> Path:
    """Download the model of ``job_id`` into ``out/<model id>/`` and check model.onnx against its sha256."""
    job = client.get(job_id)
    model_id = job.get("model_id")
    if not model_id:
        raise ApiClientError(409, {"error": {"type": "conflict",
                                             "message": f"job {job_id} has no model ({job['status']})"}})
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as fh:
        with client.http.stream("GET", f"/v1/models/{model_id}/bundle") as resp:
            if resp.status_code >= 400:
                resp.read()
                raise ApiClientError(resp.status_code, _error_body(resp))
            expected = resp.headers.get("X-Bundle-SHA256", "")
            for chunk in resp.iter_bytes():
                fh.write(chunk)
        fh.seek(0)
        extract_bundle(fh, out, model_id)
    target = out / model_id
    digest = hashlib.sha256((target / "model.onnx").read_bytes()).hexdigest()
    if expected and digest != expected:
        raise ApiClientError(502, {"error": {"type": "corrupt_download",
                                             "message": f"model.onnx is {digest}, the server recorded {expected}"}})
    return target


class UnsafeArchive(ApiClientError):
    """A downloaded bundle tar that would write outside ``--out`` (or anything but plain files and folders)."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(502, {"error": {"type": "unsafe_bundle",
                                         "message": f"refusing the bundle: member {member[:120]!r} {reason}"}})


MAX_MEMBER_NAME = 1024  # bytes of a member's path; a bundle's files are a few short names


def extract_bundle(fileobj: IO[bytes], out: Path, top: str) -> None:
    """Extract a bundle tar into ``out/<top>/`` by this client's own rules, on every Python (issue 33 item 3):
    ``filter="data"`` alone is bypassed on builds with the CVE-2025-4517 realpath flaw (3.11.7 among them).
    Every member is checked before anything is written: only regular files and folders (no symlinks, hard
    links, devices, FIFOs), relative names under ``top/`` without ``..``, and a target path whose existing
    components are real folders inside ``out`` (no symlink is followed on the way). Files are written by this
    function, never by tarfile's extractor."""
    root = Path(os.path.realpath(out))
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")
        members = tar.getmembers()
    except tarfile.TarError as exc:
        raise ApiClientError(502, {"error": {"type": "corrupt_download", "message": f"not a tar archive: {exc}"}}) from exc
    with tar:
        for member in members:
            _check_member(member, root, top)
        for member in members:
            target = _check_member(member, root, top)  # again: an earlier member may not change the answer
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)  # the checked components: real folders or new
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has a body
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with source, os.fdopen(fd, "wb") as dest:
                shutil.copyfileobj(source, dest)


def _check_member(member: tarfile.TarInfo, root: Path, top: str) -> Path:
    """Where ``member`` goes under ``root``; raises :class:`UnsafeArchive` for anything else."""
    name = member.name
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchive(name, "is not a regular file or folder (links and devices are refused)")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_MEMBER_NAME or "\x00" in name or "\\" in name:
        raise UnsafeArchive(name, "has an overlong or malformed name")
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or parts[0] != top or any(p in ("..", "") for p in parts):
        raise UnsafeArchive(name, f"is not a relative path under {top}/")
    target = root
    for i, part in enumerate(parts):
        if len(part.encode("utf-8", "surrogateescape")) > 255:
            raise UnsafeArchive(name, "has an overlong name")
        target = target / part
        last = i == len(parts) - 1
        if os.path.islink(target):
            raise UnsafeArchive(name, "goes through a link already in the output folder")
        if os.path.lexists(target) and (target.is_dir() != (member.isdir() or not last)):
            raise UnsafeArchive(name, "clashes with a file or folder already in the output folder")
    if not Path(os.path.realpath(target)).is_relative_to(root):
        raise UnsafeArchive(name, "resolves outside the output folder")
    return target


def _error_body(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return {"error": {"type": "http_error", "message": resp.text}}
