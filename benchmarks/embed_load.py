"""Embedding service load benchmark: the service against its own engine, in one run, on pinned cores.

What runs, round after round (every figure is a median over rounds; ratios are taken inside a round, so a
noisy neighbour on a shared machine hits both sides of each ratio):
1. Engine: the exported graph in ONNX Runtime at batch 1 and batch ``--max-batch`` on the *server's* cores
   with the server's thread count, and the same teacher in torch eager (``--device cuda``: ORT's CUDA
   provider when installed, and torch CUDA).
2. Service: real ``excb serve`` processes on the same bundle (micro-batching on / off, and with
   ``--baseline DIR`` the same two from an older checkout), driven over HTTP by a lean keep-alive client
   (``benchmarks/http_load.py``) with 1, 8, 32 concurrent single-image requests (real PNGs), one body format
   per ``--inputs`` entry: ``raw`` (``Content-Type: image/png``) and ``json`` (base64).
3. Where the time goes: each new server's ``excb_embed_stage_seconds`` is scraped around every run, so the
   per-stage mean per request is measured under the load it reports; what the client waits beyond the handler
   is HTTP + framework + client. The client's own CPU time per request is measured too.

Pinning (``--pin``, default on with >= 2 cores): the client runs on the last core, servers and engine on the
others; the engine is timed with the same cores and ORT threads as the servers.

Usage:
  python benchmarks/embed_load.py                       # builds a small ResNet-18 bundle, prints markdown
  python benchmarks/embed_load.py --rounds 3 --seconds 4 --baseline /tmp/old --results benchmarks/RESULTS.md
  python benchmarks/embed_load.py --device cuda         # GPU host: ORT CUDA / torch CUDA engine, CUDA servers
"""

from __future__ import annotations

import argparse
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

    from excb.config import resolve
    from excb.inference.export import export_bundle
    from excb.method.balancing import Balancer
    from excb.models import build_model
    from excb.training.checkpoint import save_checkpoint

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


# ------------------------------------------------------------------------------------------------ pinning


def plan_cores(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(server cores, client cores): the client on the last core, the rest for servers and engine."""
    cores = sorted(os.sched_getaffinity(0))
    if not pin or len(cores) < 2:
        return None, None
    return set(cores[:-1]), {cores[-1]}


def pin_to(cores: set[int] | None) -> None:
    if cores:
        os.sched_setaffinity(0, cores)


# ------------------------------------------------------------------------------------------------ 1. engine


class Engines:
    """ORT (the service's engine: same providers and threads) and torch, each at batch 1 and ``batch``."""

    def __init__(self, bundle_dir: Path, threads: int, batch: int, device: str) -> None:
        import torch

        from excb.config import validate
        from excb.inference.onnx_runtime import OrtEmbedder, load_bundle
        from excb.models import ExportWrapper, build_model
        from excb.training.checkpoint import load_checkpoint

        torch.set_num_threads(threads)
        bundle = load_bundle(bundle_dir)
        self.ort = OrtEmbedder(bundle, ["cuda"] if device == "cuda" else ["cpu"], intra_op_threads=threads)
        ckpt = load_checkpoint(bundle.meta["source"]["checkpoint"])
        teacher = build_model(validate(ckpt["config"]), teacher=True)
        teacher.load_state_dict(ckpt["teacher"])
        self.dev = torch.device(device)
        self.wrapper = ExportWrapper(teacher).eval().to(self.dev)
        size = bundle.input_size
        self.inputs = {n: np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32)
                       for n in (1, batch)}
        self.batches = (1, batch)
        for n in self.batches:  # warm-up
            for _ in range(3):
                self.run_ort(n), self.run_torch(n)

    def run_ort(self, n: int) -> None:
        self.ort.run(self.inputs[n])

    def run_torch(self, n: int) -> None:
        import torch

        bf16 = torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.dev.type == "cuda")
        with torch.inference_mode(), bf16:
            emb, sims = self.wrapper(torch.from_numpy(self.inputs[n]).to(self.dev))
            emb.float().cpu(), sims.float().cpu()  # host arrays, as the service returns

    def rate(self, name: str, n: int, seconds: float) -> tuple[float, float]:
        """(img/s, CPU ms per image of this process: the engine is all it runs meanwhile)."""
        fn = self.run_ort if name == "ort" else self.run_torch
        count, t0, cpu0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            fn(n)
            count += n
        return count / (time.perf_counter() - t0), 1000 * (time.process_time() - cpu0) / count


# ------------------------------------------------------------------------------------------------ 2. service


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``excb serve`` process (from ``tree``: this checkout by default), pinned to ``cores`` when given."""

    def __init__(self, bundle: Path, batching: bool, max_batch: int, max_delay_ms: float, threads: int,
                 home: Path, cores: set[int] | None = None, tree: Path = ROOT, device: str = "cpu") -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "excb.cli", "serve", "--model", str(bundle), "--port", str(self.port),
               "--threads", str(threads), "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms)]
        if not batching:
            cmd.append("--no-batching")
        env = {**os.environ, "EXCB_HOME": str(home), "EXCB_LOG_LEVEL": "WARNING", "EXCB_EMBED__QUEUE_SIZE": "4096",
               "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(tree)}
        if device == "cuda":
            env["EXCB_EMBED__PROVIDERS"] = '["cuda"]'
        self.proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=(lambda: pin_to(cores)) if cores else None)
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

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process, all threads (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def scrape(self) -> dict[str, float]:
        """Sums and counts of the stage and batch series (empty for servers that have none)."""
        import httpx

        out: dict[str, float] = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(("excb_embed_stage_seconds_", "excb_embed_batch_seconds_", "excb_embed_batch_size_")):
                name, _, value = line.rpartition(" ")
                if name.endswith(("_sum", "_count")) or "_sum{" in name or "_count{" in name:
                    out[name] = float(value)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def stage_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-request mean ms of every stage between two scrapes, plus the ORT run per batch and images per run."""
    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    out: dict[str, float] = {}
    for key in after:
        if key.startswith("excb_embed_stage_seconds_sum"):
            stage = key.split('stage="', 1)[1].split('"', 1)[0]
            n = delta(key.replace("_sum", "_count"))
            if n > 0:
                out[stage] = 1000 * delta(key) / n
    runs = sum(delta(k) for k in after if k.startswith("excb_embed_batch_seconds_count"))
    if runs > 0:
        run_seconds = sum(delta(k) for k in after if k.startswith("excb_embed_batch_seconds_sum"))
        out["ort_run_per_batch"] = 1000 * run_seconds / runs
        out["images_per_run"] = sum(delta(k) for k in after if k.startswith("excb_embed_batch_size_sum")) / runs
    return out


def request_bodies(url: str, pngs: list[bytes], kind: str) -> list[bytes]:
    from http_load import build_request

    if kind == "raw":
        return [build_request(url, "/v1/embed?top_k=5", p, "image/png") for p in pngs]
    return [build_request(url, "/v1/embed", json.dumps({"input": base64.b64encode(p).decode(), "return_clusters": True,
                                                        "top_k": 5}).encode(), "application/json") for p in pngs]


def drive(server: Server, pngs: list[bytes], kind: str, concurrency: int, seconds: float,
          stages: bool) -> dict[str, Any]:
    """One closed-loop run; with ``stages``, the server's per-stage means over exactly this run."""
    from http_load import run

    before = server.scrape() if stages else {}
    cpu0, server_cpu0 = time.process_time(), server.cpu_seconds()
    result = run(server.url, request_bodies(server.url, pngs, kind), concurrency, seconds)
    cpu, server_cpu = time.process_time() - cpu0, server.cpu_seconds() - server_cpu0
    out = result.summary()
    out["client_cpu_ms"] = 1000 * cpu / max(1, out["n"] + out["errors"])
    out["server_cpu_ms"] = 1000 * server_cpu / max(1, out["n"])
    if stages:
        out["stages"] = stage_means(before, server.scrape())
    return out


# ------------------------------------------------------------------------------------------------ the run


def configs(baseline: Path | None) -> list[tuple[str, bool, Path]]:
    """(name, batching, source tree) of every server."""
    out = [("on", True, ROOT), ("off", False, ROOT)]
    if baseline is not None:
        out += [("before-on", True, baseline), ("before-off", False, baseline)]
    return out


def measure(args: argparse.Namespace, bundle: Path, pngs: list[bytes]) -> dict[str, Any]:
    server_cores, client_cores = plan_cores(args.pin)
    threads = args.threads or (len(server_cores) if server_cores else len(os.sched_getaffinity(0)))
    levels = [int(c) for c in args.levels.split(",")]
    kinds = args.inputs.split(",")
    names = [n for n, _, _ in configs(args.baseline)]
    engine_rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    ratios: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as home:
        servers = {n: Server(bundle, b, args.max_batch, args.max_delay_ms, threads, Path(home), server_cores, tree,
                             args.device) for n, b, tree in configs(args.baseline)}
        try:
            pin_to(server_cores)
            engines = Engines(bundle, threads, args.max_batch, args.device)
            for s in servers.values():
                s.wait_ready()
            pin_to(client_cores)
            for s in servers.values():  # warm-up
                drive(s, pngs, kinds[0], 4, min(1.0, args.seconds), False)
            for r in range(args.rounds):
                eng: dict[tuple[str, int], tuple[float, float]] = {}
                for name in ("torch", "ort"):  # torch once per round, for the ORT vs torch table
                    for n in engines.batches:
                        pin_to(server_cores)
                        eng[(name, n)] = engines.rate(name, n, args.seconds)
                        engine_rows.setdefault((name, n), []).append(eng[(name, n)])
                for kind in kinds:
                    for c in levels:
                        ref = 1 if c == 1 else args.max_batch  # the engine again, just before the servers it rates
                        pin_to(server_cores)
                        eng[("ort", ref)] = engines.rate("ort", ref, args.seconds / 2)
                        pin_to(client_cores)
                        order = [n for n in (names if r % 2 == 0 else names[::-1])
                                 if kind == "json" or not n.startswith("before")]  # older code takes no raw bodies
                        got = {n: drive(servers[n], pngs, kind, c, args.seconds, not n.startswith("before"))
                               for n in order}
                        for n, res in got.items():
                            runs.setdefault((kind, n, c), []).append(res)
                        _round_ratios(ratios, kind, c, got, eng, args.max_batch)
        finally:
            for s in servers.values():
                s.stop()
    return {"threads": threads, "server_cores": sorted(server_cores) if server_cores else None,
            "client_cores": sorted(client_cores) if client_cores else None,
            "engine": [{"engine": name, "batch": n, "img_s": statistics.median(x[0] for x in v),
                        "cpu_ms_per_img": statistics.median(x[1] for x in v)} for (name, n), v in engine_rows.items()],
            "service": [_row(kind, n, c, rs) for (kind, n, c), rs in runs.items()],
            "ratios": {k: statistics.median(v) for k, v in ratios.items()},
            "ratio_ranges": {k: [min(v), max(v)] for k, v in ratios.items()}}


def _round_ratios(ratios: dict[str, list[float]], kind: str, c: int, got: dict[str, dict[str, Any]],
                  eng: dict[tuple[str, int], tuple[float, float]], batch: int) -> None:
    """Ratios inside one round: service vs engine (c=1 vs batch 1, else vs batch ``batch``) in img/s and in CPU
    time per image (robust to other jobs on the machine: both count only their own CPU), on vs off."""
    b = 1 if c == 1 else batch
    ref_rate, ref_cpu = eng[("ort", b)]
    for n, res in got.items():
        ratios.setdefault(f"{kind} c={c} {n} / engine b{b} img/s", []).append(res["img_s"] / ref_rate)
        if res["server_cpu_ms"] > 0:
            ratios.setdefault(f"{kind} c={c} {n} / engine b{b} CPU-time efficiency", []).append(
                ref_cpu / res["server_cpu_ms"])
    for prefix in ("", "before-"):
        on, off = got.get(prefix + "on"), got.get(prefix + "off")
        if on and off and off["img_s"] > 0:
            ratios.setdefault(f"{kind} c={c} {prefix}on / {prefix}off img/s", []).append(on["img_s"] / off["img_s"])
            ratios.setdefault(f"{kind} c={c} {prefix}on / {prefix}off p99", []).append(on["p99"] / off["p99"])
    if "before-on" in got and got["before-on"]["img_s"] > 0:
        for n in ("on", "off"):
            ratios.setdefault(f"{kind} c={c} {n} / before-{n} img/s", []).append(
                got[n]["img_s"] / got["before-" + n]["img_s"])


def _row(kind: str, name: str, c: int, rs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"inputs": kind, "server": name, "concurrency": c,
                           **{k: statistics.median(r[k] for r in rs) for k in ("img_s", "p50", "p95", "p99",
                                                                                "client_cpu_ms", "server_cpu_ms")},
                           "requests": sum(r["n"] for r in rs), "errors": sum(r["errors"] for r in rs)}
    stage_runs = [r["stages"] for r in rs if r.get("stages")]
    if stage_runs:
        row["stages"] = {k: statistics.median(s.get(k, 0.0) for s in stage_runs) for k in stage_runs[0]}
        row["stages"]["outside_handler"] = max(0.0, statistics.median(r["mean_ms"] for r in rs)
                                               - row["stages"].get("handler", 0.0))
    return row


# ------------------------------------------------------------------------------------------------ report

STAGE_ORDER = ("read", "parse", "decode_wait", "decode", "preprocess", "batch", "assign", "encode", "handler",
               "outside_handler", "ort_run_per_batch", "images_per_run")


def markdown(args: argparse.Namespace, meta: dict[str, Any], res: dict[str, Any], command: str) -> str:
    import onnxruntime
    import torch

    pinning = (f"servers + engine on cores {res['server_cores']}, client on {res['client_cores']}"
               if res["server_cores"] else "not pinned: client, servers and engine share the cores")
    lines = [
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: `{command}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, device {args.device}; {pinning}; "
        f"load average at start {os.getloadavg()[0]:.2f}",
        f"- versions: onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
        f"python {platform.python_version()}",
        f"- model: {meta['arch']['backbone']} width {meta['arch']['width']}, input {meta['input']['size']} px, "
        f"D = {meta['embed_dim']}, K = {meta['num_clusters']} (untrained weights)",
        f"- {res['threads']} intra-op thread(s) for ORT, torch and every server; max_batch {args.max_batch}, "
        f"max_delay {args.max_delay_ms} ms; {args.rounds} rounds x {args.seconds} s, medians",
        "", "| engine | batch | img/s | CPU ms/img |", "|---|---|---|---|"]
    for r in res["engine"]:
        lines.append(f"| {r['engine']} | {r['batch']} | {r['img_s']:.1f} | {r['cpu_ms_per_img']:.2f} |")
    lines += ["", "| inputs | server | concurrency | img/s | p50 ms | p95 ms | p99 ms | server CPU ms/img | "
                  "client CPU ms/req | requests | errors |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["service"]:
        lines.append(f"| {r['inputs']} | {r['server']} | {r['concurrency']} | {r['img_s']:.1f} | {r['p50']:.1f} | "
                     f"{r['p95']:.1f} | {r['p99']:.1f} | {r['server_cpu_ms']:.2f} | {r['client_cpu_ms']:.2f} | "
                     f"{r['requests']} | {r['errors']} |")
    staged = [r for r in res["service"] if r.get("stages")]
    if staged:
        lines += ["", "Mean ms per request in each stage, measured inside the servers under this load "
                      "(`excb_embed_stage_seconds`; `outside_handler` = client latency - handler: HTTP, framework, "
                      "client):", "",
                  "| inputs | server | c | " + " | ".join(STAGE_ORDER) + " |", "|---" * (3 + len(STAGE_ORDER)) + "|"]
        for r in staged:
            lines.append(f"| {r['inputs']} | {r['server']} | {r['concurrency']} | "
                         + " | ".join(f"{r['stages'].get(k, float('nan')):.2f}" for k in STAGE_ORDER) + " |")
    lines += ["", "Ratios (median of per-round ratios, [min, max] over rounds):", ""]
    for k, v in res["ratios"].items():
        lo, hi = res["ratio_ranges"][k]
        lines.append(f"- {k}: {v:.2f} [{lo:.2f}, {hi:.2f}]")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, help="an existing bundle (default: build a small ResNet-18 one)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--clusters", type=int, default=1024)
    p.add_argument("--threads", type=int, help="ORT/torch/server threads (default: the server cores)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--inputs", default="raw,json", help="request body formats: raw (image/png), json (base64)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="client on the last core, servers + engine on the others (default: on)")
    p.add_argument("--baseline", type=Path, help="a checkout of older code: its servers run beside the new ones")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--results", type=Path, help="append the markdown to this file")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if any(k not in ("raw", "json") for k in args.inputs.split(",")):
        p.error("--inputs: raw and/or json")
    command = "python benchmarks/embed_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sys.path.insert(0, str(ROOT / "benchmarks"))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or build_bundle(Path(tmp), args.width, args.size, args.clusters)
        meta = json.loads((bundle / "model.json").read_text())
        pngs = real_pngs(64, meta["input"]["size"])
        print("measuring ...", file=sys.stderr)
        res = measure(args, bundle, pngs)
    text = markdown(args, meta, res, command.strip())
    print(text)
    if args.results:
        existing = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
        args.results.write_text(existing.rstrip("\n") + "\n\n" + text)
    if args.json_out:
        args.json_out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
