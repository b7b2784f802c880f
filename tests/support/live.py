"""`excb up` driven from a test as a real subprocess: a digit image to embed, readiness and first-answer waits."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx
import numpy as np
from PIL import Image

from support import HANG_GUARD_S, REPO_ROOT


def digit_png(path: Path) -> None:
    from sklearn.datasets import load_digits

    img = load_digits().images[0]
    arr = (img / 16.0 * 255).astype(np.uint8)
    Image.fromarray(arr).resize((32, 32)).convert("RGB").save(path)


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], timeout: float, what: str,
                 detail: Callable[[], str] = lambda: "", every: float = 0.2) -> None:
    """Poll ``url`` until it answers 200; fail if ``proc`` exits first or ``timeout`` passes (``detail()`` is
    appended to the failure: a log tail, the server's stderr)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}\n{detail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not become ready in {timeout:.0f} s\n{detail()}")
        time.sleep(every)


def wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    wait_http_ok(f"{base}/readyz", proc, HANG_GUARD_S, "excb up", lambda: tail(log), every=0.5)


def wait_embed(base: str, model_id: str) -> httpx.Response:
    """The embed service picks the new bundle up within a rescan period; then it answers."""
    deadline = time.monotonic() + HANG_GUARD_S
    r = None
    while time.monotonic() < deadline:
        r = httpx.get(f"{base}/embed", params={"uri": "seven.png"}, timeout=30)
        if r.status_code == 200 and model_id in str(r.json().get("model", "")):
            return r
        time.sleep(1)
    raise AssertionError(f"GET /embed never served {model_id}: {r.status_code if r else None} {r.text if r else ''}")


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@dataclass
class LiveUp:
    """A running `excb up`: its URL, the environment its clients should use, and its log."""

    base: str
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def excb_up(tmp_path: Path, args: tuple[str, ...] = (), **env: str) -> Iterator[LiveUp]:
    """`excb up` on a free port with HOME/DATA under ``tmp_path`` (DATA holds ``seven.png``), embedded SQLite
    broker and store (Redis/PostgreSQL variables dropped), ready when yielded; stopped with SIGTERM, then SIGKILL.
    ``args``: more command-line arguments."""
    from support.services import free_port

    home, data = tmp_path / "home", tmp_path / "data"
    data.mkdir()
    digit_png(data / "seven.png")
    port = free_port()
    full = {k: v for k, v in os.environ.items() if k not in ("EXCB_REDIS_URL", "EXCB_DATABASE_URL")}
    full.update({"EXCB_EXPORT_PARITY_IMAGES": "16", "EXCB_LOG_JSON": "false", **env,
                 "PYTHONPATH": str(REPO_ROOT) + os.pathsep + full.get("PYTHONPATH", "")})
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "excb.cli", "up", "--port", str(port), "--home", str(home),
                                 "--data-root", str(data), *args], env=full, cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    up = LiveUp(f"http://127.0.0.1:{port}", full, log, proc)
    try:
        wait_ready(up.base, proc, log)
        yield up
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
