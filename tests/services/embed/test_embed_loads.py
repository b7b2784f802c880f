"""Issue 33 items 2 and 6: what one request makes the embed server load is bounded per request.

- Bytes: a 704-byte ``/v1/embeddings`` body naming one 19 MB file 64 times used to read all 64 copies (1.2 GB)
  before decoding anything; three at once took the server up by 3.3 GB. Now the files a request names are sized
  first and a request over ``max_request_load_bytes`` is refused (413) before any is read; files within it are
  read one at a time inside their decode-budget reservation.
- Time: each URL had its own 5 s deadline, so eight slow URLs held a fetch slot for 29 s. Now one deadline
  (``url_request_timeout_seconds``) covers all of a request's fetches.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from support import embed as es

BIG = 19 * 1024 * 1024


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    (root / "big.bin").write_bytes(os.urandom(BIG))  # as in the report: the content never matters
    (root / "d0.png").write_bytes(es.digit_png(0))
    return root


def _embeddings(url: str, inputs: list[str], timeout: float = 120) -> httpx.Response:
    return httpx.post(url + "/v1/embeddings", json={"input": inputs}, timeout=timeout)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_sixty_four_copies_of_a_big_file_are_refused_before_reading(tmp_path: Path, data_root: Path) -> None:
    """Before: +1.16 GB per request, +3.27 GB for three at once (each read all 64 copies, then failed)."""
    env = {"EXCB_DATA_ROOTS": json.dumps([str(data_root)])}
    with es.embed_server_process(tmp_path, env) as (proc, url):
        assert _embeddings(url, ["d0.png"]).status_code == 200  # warm: one request's worth of allocator pages
        before = es.proc_status_kib(proc.pid, "VmHWM")
        body = ["big.bin"] * 64
        assert len(json.dumps({"input": body})) < 1024  # a small body, a large load
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: _embeddings(url, body), range(3)))
        growth_mib = (es.proc_status_kib(proc.pid, "VmHWM") - before) / 1024
        print(f"3 x 64 x {BIG >> 20} MiB by path: {[r.status_code for r in answers]}, "
              f"peak RSS growth {growth_mib:.0f} MiB")
        for r in answers:
            assert r.status_code == 413, r.text[:300]
            err = r.json()["error"]
            assert err["code"] == "too_large" and "max_request_load_bytes" in err["message"], err
            assert err["param"] == "input[3]"  # 3 x 19 MB fit in the default 64 MB; the 4th does not
        assert growth_mib < 300, f"peak RSS grew by {growth_mib:.0f} MiB"
        assert _embeddings(url, ["d0.png"] * 3).status_code == 200  # within the allowance: served


class _SlowImages(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a PNG after ``delay`` seconds (an allow-listed but slow image host)."""

    delay = 1.5
    png = b""

    def do_GET(self) -> None:  # noqa: N802
        time.sleep(self.delay)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            self.wfile.write(self.png)
        except OSError:  # the server under test gave up on this fetch (its deadline): expected
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_host() -> Iterator[int]:
    _SlowImages.png = es.digit_png(1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowImages)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_one_deadline_covers_all_of_a_requests_url_fetches(tmp_path: Path, slow_host: int) -> None:
    """Eight URLs of 1.5 s each: before, 200 after ~12 s (each fetch within its own 5 s); now 422 fetch_timeout
    once the request's 3 s have passed, and the next request gets its own 3 s."""
    from fastapi.testclient import TestClient

    from services.embed.app import create_app
    from services.embed.registry import ModelRegistry
    from services.settings import EmbedSettings, Settings

    embed = EmbedSettings(url_allowed_hosts=[f"127.0.0.1:{slow_host}"], url_allowed_networks=["127.0.0.1/32"],
                          url_timeout_seconds=5.0, url_request_timeout_seconds=3.0, max_delay_ms=1)
    reg = ModelRegistry(embed)
    reg.register(es.bundle())
    urls = [f"http://127.0.0.1:{slow_host}/{i}.png" for i in range(8)]
    with TestClient(create_app(Settings(home=tmp_path, embed=embed), reg)) as c:
        t0 = time.monotonic()
        r = c.post("/v1/embeddings", json={"input": urls})
        elapsed = time.monotonic() - t0
        assert r.status_code == 422, r.text[:300]
        err = r.json()["error"]
        assert err["code"] == "fetch_timeout" and err["param"] == "input[1]", err  # 1.5 s + 1.5 s > 3 s
        assert "url_request_timeout_seconds" in err["message"]
        assert elapsed < 8.0, elapsed  # a hang guard: without the request deadline the eight take ~12 s
        native = c.post("/v1/embed", json={"input": urls[:3]})  # the same bound on every route
        assert native.status_code == 422 and native.json()["error"]["type"] == "fetch_timeout"
        assert c.post("/v1/embeddings", json={"input": urls[:1]}).status_code == 200  # a fresh 3 s


def test_url_bytes_count_against_the_request_allowance(tmp_path: Path, slow_host: int) -> None:
    """URL bodies count as they arrive: the fetch that passes max_request_load_bytes ends the request (413)."""
    from fastapi.testclient import TestClient

    from services.embed.app import create_app
    from services.embed.registry import ModelRegistry
    from services.settings import EmbedSettings, Settings

    _SlowImages.delay = 0.0
    size = len(es.digit_png(1))
    embed = EmbedSettings(url_allowed_hosts=[f"127.0.0.1:{slow_host}"], url_allowed_networks=["127.0.0.1/32"],
                          max_request_load_bytes=max(1024, size * 2 + size // 2), max_delay_ms=1)
    reg = ModelRegistry(embed)
    reg.register(es.bundle())
    urls = [f"http://127.0.0.1:{slow_host}/{i}.png" for i in range(4)]
    try:
        with TestClient(create_app(Settings(home=tmp_path, embed=embed), reg)) as c:
            assert c.post("/v1/embeddings", json={"input": urls[:2]}).status_code == 200
            r = c.post("/v1/embeddings", json={"input": urls})
            assert r.status_code == 413, r.text[:300]
            assert r.json()["error"]["param"] == "input[2]" and "max_request_load_bytes" in r.text
    finally:
        _SlowImages.delay = 1.5
