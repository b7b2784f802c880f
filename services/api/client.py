"""The Python SDK of the control plane, and what `excb jobs ...` uses (one client, not two).

    from services.api.client import Client

    client = Client("http://127.0.0.1:8000", token="KEY")   # or EXCB_API_URL / EXCB_API_TOKEN (EXCB_API_KEY)
    job = client.submit({"data": "digits", "budget": "2m"}, ["model.num_clusters=256"])
    for line in client.logs(job.id, follow=True):
        print(line)
    job = client.wait(job.id)                                 # a Job: status, progress, effective, recipe, ...
    client.pull(job.id, "models/")                            # the ONNX bundle, checked against its sha256

Returns are the server's own response models (``services.api.schemas``: :class:`Job` = ``JobOut``), so the types
are the API's and cannot drift from it. Errors are :class:`ApiClientError` (status, ``type``, ``field``). It lives
in ``services`` rather than ``excb``: it needs httpx and httpx-sse, which only the ``services`` extra installs,
and ``excb/`` keeps to its core dependencies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Any, Iterator

import httpx
from httpx_sse import SSEError, connect_sse

from services.api.schemas import JobList, JobOut, LogsOut

RECONNECT_ATTEMPTS = 10  # in a row without an event in between; then the error reaches the caller
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")

Job = JobOut  # what every job verb returns
LogPage = LogsOut


class ApiClientError(Exception):
    """A 4xx/5xx from the API, carrying the shared error shape."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.type = err.get("type", "http_error")
        self.field = err.get("field")
        message = err.get("message", str(body))
        super().__init__(f"{status} {self.type}: {message}")


class Client:
    """One control plane. ``url`` and ``token`` default to the settings ``excb jobs`` reads: ``EXCB_API_URL``
    (else http://127.0.0.1:8000) and ``EXCB_API_TOKEN`` (else ``EXCB_API_KEY``, the server's one key)."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0) -> None:
        if url is None or token is None:
            from services.settings import get_settings

            settings = get_settings()
            url = url or settings.api_url
            if token is None:
                token = settings.api_token or (settings.api_key.get_secret_value() if settings.api_key else None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.http.request(method, path, **kwargs)
        if resp.status_code >= 400:
            raise ApiClientError(resp.status_code, _error_body(resp))
        return resp.json() if resp.content else None

    # --- the job verbs ------------------------------------------------------------------------------------

    def submit(self, config: Mapping[str, Any] | str | Path, overrides: Sequence[str] = (), *,
               job_id: str | None = None, name: str | None = None, gpus: int | None = None,
               metadata: Mapping[str, Any] | None = None, idempotency_key: str | None = None) -> Job:
        """Queue a training job: ``config`` is what `excb train --config` reads (a mapping, or a YAML/JSON file),
        ``overrides`` its ``key=value`` overrides. ``job_id`` (yours, scoped to your key) or ``idempotency_key``
        make a retried submit return the first job instead of a second one."""
        from excb.config import load_file

        body = dict(load_file(config) if isinstance(config, (str, Path)) else config)
        if overrides:
            body["overrides"] = list(body.get("overrides", [])) + list(overrides)
        extra = {"job_id": job_id, "name": name, "gpus": gpus}
        body.update({k: v for k, v in extra.items() if v is not None})
        if metadata:
            body["metadata"] = {**body.get("metadata", {}), **metadata}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Job.model_validate(self._call("POST", "/v1/jobs", json=body, headers=headers))

    def list_jobs(self, status: str | Sequence[str] | None = None, limit: int = 50) -> list[Job]:
        """Your jobs, newest first; ``status``: one state or several (QUEUED, RUNNING, SUCCEEDED, ...)."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status if isinstance(status, str) else ",".join(status)
        return JobList.model_validate(self._call("GET", "/v1/jobs", params=params)).items

    def status(self, job_id: str) -> Job:
        """The job now: status, progress, metrics, balance, ``requested``/``effective`` config, attempts."""
        return Job.model_validate(self._call("GET", f"/v1/jobs/{job_id}"))

    def wait(self, job_id: str, timeout: float | None = None, poll_seconds: float = 2.0) -> Job:
        """Poll until the job is SUCCEEDED, FAILED or CANCELLED and return it; ``TimeoutError`` after
        ``timeout`` seconds (None: as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.status(job_id)
            if job.status in TERMINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
            time.sleep(poll_seconds if deadline is None else max(0.0, min(poll_seconds, deadline - time.monotonic())))

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        """The job's log. ``follow=False``: the text there is now, in pages (``"".join(...)`` is the whole log);
        ``follow=True``: line by line (no newline) until the job ends, however long that is: the stream
        reconnects where it left off (servers close a stream after EXCB_STREAM_MAX_SECONDS)."""
        if not follow:
            return self.log_pages(job_id)
        return (data["line"] for event, data in self.stream(f"/v1/jobs/{job_id}/logs/stream") if event == "log")

    def cancel(self, job_id: str) -> Job:
        """Ask the job to stop (cooperative: CANCELLING, then CANCELLED once its trainer has exited)."""
        return Job.model_validate(self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    def retry(self, job_id: str) -> Job:
        """Run a FAILED/CANCELLED job again, resuming from its last checkpoint."""
        return Job.model_validate(self._call("POST", f"/v1/jobs/{job_id}/retry"))

    def delete(self, job_id: str) -> None:
        """Delete a finished job with its run dir (logs, checkpoints); its model stays. 409 while it runs."""
        self._call("DELETE", f"/v1/jobs/{job_id}")

    def pull(self, job_id: str, out: str | Path = ".") -> Path:
        """Download the job's model bundle into ``out/<model id>/`` (checked, see :func:`extract_bundle`)."""
        return pull_bundle(self, job_id, Path(out))

    # --- lower level: pages and streams -------------------------------------------------------------------

    def log_page(self, job_id: str, offset: int = 0, limit: int | None = None) -> LogPage:
        params = {"offset": offset} | ({"limit": limit} if limit else {})
        return LogPage.model_validate(self._call("GET", f"/v1/jobs/{job_id}/logs", params=params))

    def log_pages(self, job_id: str, limit: int = 1 << 20) -> Iterator[str]:
        """The whole log, page by page from offset 0 to the size it had when the pages were read."""
        offset = 0
        while True:
            page = self.log_page(job_id, offset, limit)
            if page.text:
                yield page.text
            if page.next_offset <= offset or page.next_offset >= page.size:
                return
            offset = page.next_offset

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


ApiClient = Client  # its name before issue 32


def pull_bundle(client: Client, job_id: str, out: Path) -> Path:
    """Download the model of ``job_id`` into ``out/<model id>/`` and check model.onnx against its sha256."""
    job = client._call("GET", f"/v1/jobs/{job_id}")  # only model_id and status are needed here
    model_id = job.get("model_id")
    if not model_id:
        raise ApiClientError(409, {"error": {"type": "conflict",
                                             "message": f"job {job_id} has no model ({job.get('status')})"}})
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
        raise ApiClientError(502, {"error": {"type": "corrupt_download",
                                             "message": f"not a tar archive: {exc}"}}) from exc
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
