"""`excb up` driven from a test as a real subprocess: a digit image to embed, readiness and first-answer waits."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def digit_png(path: Path) -> None:
    from sklearn.datasets import load_digits

    img = load_digits().images[0]
    arr = (img / 16.0 * 255).astype(np.uint8)
    Image.fromarray(arr).resize((32, 32)).convert("RGB").save(path)


def wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"excb up exited with {proc.returncode}\n{tail(log)}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("excb up did not become ready\n" + tail(log))


def wait_embed(base: str, model_id: str) -> httpx.Response:
    """The embed service picks the new bundle up within a rescan period; then it answers."""
    deadline = time.monotonic() + 60
    r = None
    while time.monotonic() < deadline:
        r = httpx.get(f"{base}/embed", params={"uri": "seven.png"}, timeout=30)
        if r.status_code == 200 and model_id in str(r.json().get("model", "")):
            return r
        time.sleep(1)
    raise AssertionError(f"GET /embed never served {model_id}: {r.status_code if r else None} {r.text if r else ''}")


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""
