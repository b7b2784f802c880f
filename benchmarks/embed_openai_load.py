"""``POST /v1/embeddings`` (OpenAI shape) vs ``POST /v1/embed`` (native) throughput on one ``excb serve``.

Same server, same images (base64 JSON, one image per request), closed-loop clients at one concurrency; the two
routes alternate round by round so machine noise hits both. Reports the median img/s and p50/p95 per route.

Usage: python benchmarks/embed_openai_load.py [--concurrency 8] [--rounds 3] [--seconds 4] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from embed_load import Server, build_bundle, real_pngs  # noqa: E402

ROUTES = {"/v1/embed": lambda b64: {"input": b64, "top_k": 5},
          "/v1/embeddings": lambda b64: {"model": "latest", "input": [b64], "modality": "image", "top_k": 5}}


async def drive(url: str, path: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` clients posting one image per request to ``path`` for ``seconds``."""
    import httpx

    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                r = await client.post(path, content=bodies[i % len(bodies)],
                                      headers={"content-type": "application/json"})
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1000
    return {"img_s": len(lat) / wall, "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "n": len(lat), "errors": errors}


def compare(bundle: Path, concurrency: int, rounds: int, seconds: float, threads: int) -> dict[str, dict[str, Any]]:
    meta = json.loads((bundle / "model.json").read_text())
    b64s = [base64.b64encode(p).decode() for p in real_pngs(64, meta["input"]["size"])]
    bodies = {path: [json.dumps(make(b)).encode() for b in b64s] for path, make in ROUTES.items()}
    runs: dict[str, list[dict[str, Any]]] = {path: [] for path in ROUTES}
    with tempfile.TemporaryDirectory() as home:
        server = Server(bundle, True, 32, 5.0, threads, Path(home))
        try:
            server.wait_ready()
            for path in ROUTES:  # warm-up
                asyncio.run(drive(server.url, path, bodies[path], concurrency, 1.0))
            for _ in range(rounds):
                for path in ROUTES:
                    runs[path].append(asyncio.run(drive(server.url, path, bodies[path], concurrency, seconds)))
        finally:
            server.stop()
    return {path: {"img_s": statistics.median(r["img_s"] for r in rs), "p50": statistics.median(r["p50"] for r in rs),
                   "p95": statistics.median(r["p95"] for r in rs), "requests": sum(r["n"] for r in rs),
                   "errors": sum(r["errors"] for r in rs)} for path, rs in runs.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, help="an existing bundle (default: build a small ResNet-18 one)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or build_bundle(Path(tmp), 64, 64, 1024)
        rows = compare(bundle, args.concurrency, args.rounds, args.seconds, args.threads)
    print(f"| route | concurrency | img/s (median of {args.rounds}) | p50 ms | p95 ms | requests | errors |")
    print("|---|---|---|---|---|---|---|")
    for path, r in rows.items():
        print(f"| `POST {path}` | {args.concurrency} | {r['img_s']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | "
              f"{r['requests']} | {r['errors']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
