"""A small HTTP client for the control plane (what `excb jobs ...` uses)."""

from __future__ import annotations

import json
from typing import Any, Iterator

import httpx


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

    def logs(self, job_id: str, offset: int = 0) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}/logs", params={"offset": offset})

    def stream(self, path: str) -> Iterator[tuple[str, Any]]:
        """Yield ``(event, data)`` from an SSE endpoint until the server closes it."""
        with self.http.stream("GET", path, timeout=None) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise ApiClientError(resp.status_code, resp.json())
            event, data = "message", []
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield event, json.loads("\n".join(data))
                    event, data = "message", []
