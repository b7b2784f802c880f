"""Embedding service load benchmark: img/s and p50/p95/p99 at several concurrency levels, micro-batching on vs
off, and ONNX Runtime vs PyTorch eager on the same model and device - all side by side in one run.

What runs:
1. Engine: the exported ONNX graph in ONNX Runtime vs the same teacher (``ExportWrapper``) in torch eager,
   same threads, batch 1 and batch ``--max-batch``, A/B alternated over rounds (shared machines are noisy).
2. Service: two real ``excb serve`` processes on the same bundle (micro-batching on / off), driven over HTTP
   by an asyncio client with 1, 8, 32 concurrent single-image requests (real PNGs through the safe decoder);
   the two servers are alternated round by round at every concurrency level.

Usage:
  python benchmarks/embed_load.py                       # builds a small ResNet-18 bundle, prints markdown
  python benchmarks/embed_load.py --bundle DIR --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------------ the model


def build_bundle(out: Path, width: int, size: int, clusters: int) -> Path:
    """A small, untrained ResNet-18 teacher in the trainer's checkpoint format, exported with parity check."""
    import torch

    from excb.balancing import Balancer
    from excb.checkpoint import save_checkpoint
    from excb.config import resolve
    from excb.export import export_bundle
    from excb.models import build_model

    cfg = resolve(preset_name="cpu-small", overrides=[
        "data=digits", f"model.width={width}", f"model.num_clusters={clusters}", "model.small_images=false",
        "model.projector_hidden_dim=512", "model.bottleneck_dim=128", f"augment.global_size={size}",
        "augment.local_size=32"])
    torch.manual_seed(0)
    model = build_model(cfg, teacher=True)
    bal = Balancer(clusters)
    ckpt = save_checkpoint(out / "bench.pt", {"config": json.loads(cfg.model_dump_json()),
                                              "teacher": model.state_dict(), "balancer": bal.state_dict(), "step": 0})
    export_bundle(ckpt, out / "bench-model", parity_data="digits", parity_count=64)
    return out / "bench-model"


def real_pngs(n: int, size: int) -> list[bytes]:
    import io

    from PIL import Image

    from excb.data.datasets import build_dataset

    ds = build_dataset("digits", split="test", limit=n)
    out = []
    for i in range(len(ds)):
        im = ds[i] if isinstance(ds[i], Image.Image) else Image.fromarray(np.asarray(ds[i]))
        buf = io.BytesIO()
        im.convert("RGB").resize((size + size // 7, size + size // 7), Image.BICUBIC).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# ------------------------------------------------------------------------------------------------ 1. engine


def engine_compare(bundle_dir: Path, threads: int, batch: int, rounds: int, seconds: float) -> list[dict[str, Any]]:
    """ORT vs torch eager on identical inputs; alternating rounds, median img/s per engine and batch size."""
    import torch

    from excb.checkpoint import load_checkpoint
    from excb.config import validate
    from excb.models import ExportWrapper, build_model
    from excb.onnx_runtime import OrtEmbedder, load_bundle

    torch.set_num_threads(threads)
    bundle = load_bundle(bundle_dir)
    ort_e = OrtEmbedder(bundle, ["cpu"], intra_op_threads=threads)
    ckpt = load_checkpoint(bundle.meta["source"]["checkpoint"])
    teacher = build_model(validate(ckpt["config"]), teacher=True)
    teacher.load_state_dict(ckpt["teacher"])
    wrapper = ExportWrapper(teacher).eval()
    size = bundle.input_size
    rows = []
    for n in (1, batch):
        x = np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32)
        xt = torch.from_numpy(x)

        def run_ort() -> None:
            ort_e.run(x)

        def run_torch() -> None:
            with torch.inference_mode():
                wrapper(xt)

        rates: dict[str, list[float]] = {"onnxruntime": [], "torch eager": []}
        for fn in (run_ort, run_torch):  # warm-up
            for _ in range(3):
                fn()
        for _ in range(rounds):
            for name, fn in (("onnxruntime", run_ort), ("torch eager", run_torch)):
                count, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    fn()
                    count += n
                rates[name].append(count / (time.perf_counter() - t0))
        o, t = statistics.median(rates["onnxruntime"]), statistics.median(rates["torch eager"])
        rows.append({"batch": n, "ort_img_s": o, "torch_img_s": t, "ratio": o / t})
    return rows


# ------------------------------------------------------------------------------------------------ 2. service


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle: Path, batching: bool, max_batch: int, max_delay_ms: float, threads: int,
                 home: Path) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "excb.cli", "serve", "--model", str(bundle), "--port", str(self.port),
               "--threads", str(threads), "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms)]
        if not batching:
            cmd.append("--no-batching")
        env = {**os.environ, "EXCB_HOME": str(home), "EXCB_LOG_LEVEL": "WARNING", "EXCB_EMBED__QUEUE_SIZE": "4096",
               "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def drive(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` closed-loop clients sending one image per request for ``seconds``."""
    import httpx

    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                r = await client.post("/v1/embed", content=bodies[i % len(bodies)],
                                      headers={"content-type": "application/json"})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {"img_s": len(latencies) / wall, "p50": float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "p95": float(np.percentile(lat, 95)) if lat.size else float("nan"),
            "p99": float(np.percentile(lat, 99)) if lat.size else float("nan"), "n": len(latencies),
            "errors": errors}


def service_compare(bundle: Path, pngs: list[bytes], levels: list[int], rounds: int, seconds: float,
                    max_batch: int, max_delay_ms: float, threads: int) -> list[dict[str, Any]]:
    bodies = [json.dumps({"input": base64.b64encode(p).decode(), "return_clusters": True, "top_k": 5}).encode()
              for p in pngs]
    rows = []
    with tempfile.TemporaryDirectory() as home:
        servers = {"on": Server(bundle, True, max_batch, max_delay_ms, threads, Path(home)),
                   "off": Server(bundle, False, max_batch, max_delay_ms, threads, Path(home))}
        try:
            for s in servers.values():
                s.wait_ready()
            for s in servers.values():  # warm-up
                asyncio.run(drive(s.url, bodies, 4, 1.0))
            for c in levels:
                runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
                for _ in range(rounds):
                    for mode in ("on", "off"):
                        runs[mode].append(asyncio.run(drive(servers[mode].url, bodies, c, seconds)))
                for mode in ("on", "off"):
                    rs = runs[mode]
                    rows.append({"concurrency": c, "batching": mode,
                                 **{k: statistics.median(r[k] for r in rs) for k in ("img_s", "p50", "p95", "p99")},
                                 "requests": sum(r["n"] for r in rs), "errors": sum(r["errors"] for r in rs)})
        finally:
            for s in servers.values():
                s.stop()
    return rows


# ------------------------------------------------------------------------------------------------ report


def markdown(args: argparse.Namespace, meta: dict[str, Any], engine: list[dict], service: list[dict],
             command: str) -> str:
    import onnxruntime
    import torch

    lines = [
        "## Embedding service", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores visible ({platform.processor() or 'cpu'}), "
        f"no GPU; shared with other jobs, client and servers on the same cores",
        f"- versions: onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, python {platform.python_version()}",
        f"- model: {meta['arch']['backbone']} width {meta['arch']['width']}, input {meta['input']['size']} px, "
        f"D = {meta['embed_dim']}, K = {meta['num_clusters']} (untrained weights; {meta['onnx_bytes'] / 1e6:.1f} MB "
        f"ONNX, {meta['exporter']} exporter, parity min cosine {meta['parity']['min_cosine']:.6f})",
        f"- command: `{command}`",
        f"- threads: {args.threads} intra-op (ORT and torch alike); service: max_batch {args.max_batch}, "
        f"max_delay {args.max_delay_ms} ms; {args.rounds} alternating rounds x {args.seconds} s, medians",
        "",
        "Engine, same model and device (CPU), same input tensor:", "",
        "| batch | ONNX Runtime img/s | torch eager img/s | ORT / torch |", "|---|---|---|---|",
    ]
    for r in engine:
        lines.append(f"| {r['batch']} | {r['ort_img_s']:.1f} | {r['torch_img_s']:.1f} | {r['ratio']:.2f}x |")
    lines += ["", "Service over HTTP (`POST /v1/embed`, one real PNG per request, JSON base64, decode + preprocess "
                  "+ ORT + balanced assignment + top-5):", "",
              "| concurrency | micro-batching | img/s | p50 ms | p95 ms | p99 ms | requests | errors |",
              "|---|---|---|---|---|---|---|---|"]
    for r in service:
        lines.append(f"| {r['concurrency']} | {r['batching']} | {r['img_s']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | "
                     f"{r['p99']:.1f} | {r['requests']} | {r['errors']} |")
    by = {(r["concurrency"], r["batching"]): r for r in service}
    lo = min(r["concurrency"] for r in service)
    hi = max(r["concurrency"] for r in service)
    lines += ["", "Ratios: " + "; ".join(
        [f"batching on/off at c={c}: {by[(c, 'on')]['img_s'] / by[(c, 'off')]['img_s']:.2f}x"
         for c in sorted({r['concurrency'] for r in service})]
        + [f"batched c={hi} vs batch-1 (off, c={lo}): {by[(hi, 'on')]['img_s'] / by[(lo, 'off')]['img_s']:.2f}x"]
        + ["ORT/torch: " + ", ".join(f"{r['ratio']:.2f}x at batch {r['batch']}" for r in engine)]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, help="an existing bundle (default: build a small ResNet-18 one)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--clusters", type=int, default=1024)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--results", type=Path, help="append the markdown section to this file")
    args = p.parse_args(argv)
    command = "python benchmarks/embed_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or build_bundle(Path(tmp), args.width, args.size, args.clusters)
        meta = json.loads((bundle / "model.json").read_text())
        print("engine comparison ...", file=sys.stderr)
        engine = engine_compare(bundle, args.threads, args.max_batch, args.rounds, args.seconds)
        print("service comparison ...", file=sys.stderr)
        pngs = real_pngs(64, meta["input"]["size"])
        service = service_compare(bundle, pngs, [int(c) for c in args.levels.split(",")], args.rounds,
                                  args.seconds, args.max_batch, args.max_delay_ms, args.threads)
    text = markdown(args, meta, engine, service, command.strip())
    print(text)
    if args.results:
        existing = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
        args.results.write_text(existing.rstrip("\n") + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
