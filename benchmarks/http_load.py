"""A lean closed-loop HTTP/1.1 load client: ``concurrency`` keep-alive connections, one request in flight each.

Why not httpx: on a 2-core box the client shares the machine with the server, and httpx spends ~1 ms of CPU
per request (measured with the same server: see benchmarks/RESULTS.md "Embedding service"), as much as the
service's own overhead. Here a request is one pre-built byte string written to a socket and the response is
read by Content-Length: tens of microseconds. Only what a benchmark needs: POST, fixed bodies, status codes,
latencies; it is not a general HTTP client (no chunked responses, no redirects, no TLS).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np


@dataclass
class LoadResult:
    """Latencies of the successful requests (seconds), error count, wall time of the run."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    wall: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)

    def summary(self, images_per_request: int = 1) -> dict[str, Any]:
        lat = np.asarray(self.latencies) * 1000
        pct = (lambda q: float(np.percentile(lat, q))) if lat.size else (lambda q: float("nan"))
        return {"img_s": len(self.latencies) * images_per_request / self.wall if self.wall else 0.0,
                "p50": pct(50), "p95": pct(95), "p99": pct(99), "mean_ms": float(lat.mean()) if lat.size else 0.0,
                "n": len(self.latencies), "errors": self.errors}


def build_request(url: str, path: str, body: bytes, content_type: str) -> bytes:
    """The complete request bytes (headers + body) for one POST."""
    host = urlsplit(url).netloc
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode("ascii") + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one response with a Content-Length body; returns the status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
            break
    if length:
        await reader.readexactly(length)
    return status


async def _connection(url: str, requests: list[bytes], start: int, step: int, stop_at: float,
                      result: LoadResult) -> None:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 22)
    try:
        i = start
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            status = await _read_response(reader)
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status == 200:
                result.latencies.append(time.perf_counter() - t0)
            else:
                result.errors += 1
            i += step
    finally:
        writer.close()


async def drive(url: str, requests: list[bytes], concurrency: int, seconds: float) -> LoadResult:
    """``concurrency`` connections sending ``requests`` round robin for ``seconds`` (closed loop)."""
    result = LoadResult()
    stop_at = time.perf_counter() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(_connection(url, requests, k, concurrency, stop_at, result) for k in range(concurrency)))
    result.wall = time.perf_counter() - t0
    return result


def run(url: str, requests: list[bytes], concurrency: int, seconds: float) -> LoadResult:
    """Synchronous wrapper: a fresh event loop per run."""
    return asyncio.run(drive(url, requests, concurrency, seconds))


__all__ = ["LoadResult", "build_request", "drive", "run"]
