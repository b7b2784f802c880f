"""Issue 13 item 7: concurrent decoding is bounded by a pixel budget; a real uvicorn embed server's peak RSS
stays bounded under concurrent 6300x6300 uploads, and a decode that finds no room gets 503 + Retry-After."""

from __future__ import annotations

import io
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from PIL import Image

from services.embed.decode_budget import BudgetExhausted, PixelBudget
from support import embed as es

SIDE = 6300  # 39.7 M px: just under the 40 M px per-image cap


def test_budget_waits_then_refuses() -> None:
    budget = PixelBudget(40, wait_s=0.2)
    with budget.hold(30):
        t0 = time.monotonic()
        with pytest.raises(BudgetExhausted):
            with budget.hold(30):
                pass
        assert time.monotonic() - t0 >= 0.19
    released = threading.Event()

    def holder() -> None:
        with budget.hold(30):
            released.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    time.sleep(0.05)
    threading.Timer(0.1, released.set).start()
    budget.wait_s = 5
    with budget.hold(30):  # waits for the holder, then runs
        assert budget.used == 30
    t.join()
    with budget.hold(1000):  # larger than the whole budget: runs, alone
        assert budget.peak == 1000


@pytest.fixture(scope="module")
def big_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), (90, 120, 200)).save(out, format="PNG")
    return out.getvalue()


def _kib(pid: int, field: str) -> int:
    return es.proc_status_kib(pid, field)


def _server(tmp: Path, **embed: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    with es.embed_server_process(tmp, **embed) as served:
        yield served


def _upload(url: str, png: bytes) -> httpx.Response:
    return httpx.post(url + "/v1/embed", files={"files": ("big.png", png, "image/png")}, timeout=120)


@pytest.fixture
def budget_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the server's RSS")
    yield from _server(tmp_path, decode_pixel_budget="40000000", decode_wait_seconds="60")


@pytest.mark.slow
def test_concurrent_big_uploads_keep_peak_rss_bounded(budget_server: tuple[subprocess.Popen[bytes], str],
                                                      big_png: bytes) -> None:
    """Before: four concurrent uploads took the server from 1.1 to 2.5 GB (~370 MB per decode at once)."""
    proc, url = budget_server
    assert _upload(url, big_png).status_code == 200  # warm: one decode's worth of allocator pages
    before = _kib(proc.pid, "VmHWM")
    with ThreadPoolExecutor(6) as pool:
        codes = [r.status_code for r in pool.map(lambda _: _upload(url, big_png), range(6))]
    growth_mib = (_kib(proc.pid, "VmHWM") - before) / 1024
    print(f"6 concurrent {SIDE}x{SIDE} uploads: codes {codes}, peak RSS growth {growth_mib:.0f} MiB")
    assert codes == [200] * 6
    assert growth_mib < 250, f"peak RSS grew by {growth_mib:.0f} MiB"  # one decode alone adds ~440 MiB


def test_no_room_in_time_is_503_with_retry_after(tmp_path: Path, big_png: bytes) -> None:
    for _, url in _server(tmp_path, decode_pixel_budget="40000000", decode_wait_seconds="0"):
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _, url=url: _upload(url, big_png), range(4)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] and busy.json()["error"]["type"] == "overloaded"
