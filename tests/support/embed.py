"""Shared, process-cached artefacts for the export / embed tests: one short real training run, the bundle
exported from it, a second bundle for hot-swap tests, and real images (sklearn digits) as encoded bytes.

Cached per process (not per test module) so the run is trained and exported once per pytest session.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from support import HANG_GUARD_S

torch.set_num_threads(1)

TINY = [
    "data=digits", "batch_size=32", "model.width=8", "model.num_clusters=32",
    "model.projector_hidden_dim=32", "model.bottleneck_dim=16", "model.predictor_hidden_dim=32",
    "augment.global_size=16", "augment.local_size=8", "augment.num_local_crops=2",
    "kmeans.samples=256", "kmeans.iterations=5", "progress=false", "data.num_workers=0",
    "histogram_every_steps=2", "checkpoint_every_steps=100", "max_steps=6",
]


@functools.lru_cache(maxsize=1)
def workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="excb-embed-tests-"))
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.lru_cache(maxsize=1)
def trained_run() -> Path:
    """A real (short) ExCB training run on sklearn digits: 6 steps, ResNet-18 width 8, K = 32."""
    from excb.config import resolve
    from excb.training.trainer import train

    out = workdir() / "run"
    train(resolve(preset_name="cpu-small", overrides=[*TINY, f"out={out}"]))
    return out


@functools.lru_cache(maxsize=1)
def bundle() -> Path:
    """The bundle exported (with its parity check) from :func:`trained_run`."""
    from excb.inference.export import export_bundle

    out = workdir() / "models" / "digits-a"
    export_bundle(trained_run(), out, parity_count=128)
    return out


def handmade_checkpoint(path: Path, backbone: str = "resnet18", seed: int = 1, size: int = 16,
                        overrides: tuple[str, ...] = ()) -> Path:
    """A checkpoint in the trainer's format for an untrained teacher (other weights, same contract)."""
    from excb.config import resolve
    from excb.method.balancing import Balancer
    from excb.models import build_model
    from excb.training.checkpoint import save_checkpoint

    extra = ["model.patch_size=4", "model.mlp_bn=false"] if backbone.startswith("vit") else []
    cfg = resolve(preset_name="cpu-small", overrides=[*TINY, f"model.backbone={backbone}",
                                                      f"augment.global_size={size}", *extra, *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg, teacher=True)
    bal = Balancer(cfg.model.num_clusters)
    bal.sizes.copy_(torch.softmax(torch.randn(cfg.model.num_clusters), 0))
    return save_checkpoint(path, {"config": json.loads(cfg.model_dump_json()), "teacher": model.state_dict(),
                                  "balancer": bal.state_dict(), "step": 0})


@functools.lru_cache(maxsize=1)
def second_bundle() -> Path:
    """Another servable bundle with the same input size but different weights (for hot swap)."""
    from excb.inference.export import export_bundle

    ckpt = handmade_checkpoint(workdir() / "other.pt", seed=7)
    out = workdir() / "models" / "digits-b"
    export_bundle(ckpt, out, parity_data="digits", parity_count=64)
    return out


def encode(image: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def digit_images() -> tuple[Image.Image, ...]:
    """Real images: the first 16 sklearn digits, upscaled to 32x32 RGB."""
    from excb.data.datasets import build_dataset

    ds = build_dataset("digits", split="test", limit=16)
    out = []
    for i in range(len(ds)):
        im = ds[i]
        im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
        out.append(im.convert("RGB").resize((32, 32), Image.BICUBIC))
    return tuple(out)


def digit_png(i: int = 0) -> bytes:
    return encode(digit_images()[i % 16])


class UvicornThread:
    """A real uvicorn server on 127.0.0.1 in a background thread (for tests that need real sockets)."""

    def __init__(self, app: object) -> None:
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "UvicornThread":
        self.thread.start()
        deadline = time.monotonic() + HANG_GUARD_S
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny PNG whose header claims width x height 8-bit grey pixels (zlib-compressed zero rows)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = zlib.compress(b"\x00" * (width + 1) * 16, 9)  # only a few rows are present: decoding must never start
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", raw) + _chunk(b"IEND", b"")


def proc_status_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` size field in KiB (``VmHWM``: peak RSS, ``VmRSS``: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextlib.contextmanager
def embed_server_process(tmp: Path, env: dict[str, str] | None = None,
                         **embed: str) -> Iterator[tuple["subprocess.Popen[bytes]", str]]:
    """A real ``uvicorn services.embed.app:create_app`` subprocess serving :func:`bundle` (its RSS is its own,
    readable in /proc); ``env`` adds EXCB_* variables, ``embed`` EXCB_EMBED__* ones. Yields (process, base URL)."""
    from support.live import wait_http_ok
    from support.services import REPO, free_port

    home = tmp / "home"
    shutil.copytree(bundle(), home / "models" / "digits-a")
    full = dict(os.environ, EXCB_HOME=str(home), EXCB_LOG_JSON="false", OMP_NUM_THREADS="1",
                EXCB_EMBED__INTRA_OP_THREADS="1", EXCB_EMBED__MAX_DELAY_MS="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full.pop("EXCB_API_KEYS_FILE", None)
    full.update(env or {})
    full.update({f"EXCB_EMBED__{k.upper()}": v for k, v in embed.items()})
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "services.embed.app:create_app",
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            env=full, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(url + "/readyz", proc, 60, "embed server",
                     lambda: repr(proc.stderr.read() if proc.stderr else ""))
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
