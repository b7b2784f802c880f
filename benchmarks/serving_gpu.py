"""Serving throughput of one exported bundle: torch CUDA (bf16, channels_last) vs ONNX Runtime on the CPU.

performance.md's serving anchors are ResNet-50 on an H200: torch CUDA bf16 at batch 1 / 64 / 256 and ORT on
16 CPU threads. This builds that bundle (an untrained ResNet-50 teacher, K = 65536, exported with the parity
check), then times each engine at each batch for ``--seconds``, engines alternating round by round.
The ORT wheel that fits the GPU machine is the CPU build, so ORT runs on the CPU there; the table says so.

    python benchmarks/serving_gpu.py --json-out serving.json            # R50 224 px, CUDA if present
    python benchmarks/serving_gpu.py --check                           # tiny net, code path only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHECK_OVERRIDES = ["model.width=8", "model.num_clusters=64", "model.projector_hidden_dim=32", "model.bottleneck_dim=16",
                   "model.predictor_hidden_dim=32", "augment.global_size=32", "model.small_images=false"]


def build_bundle(out: Path, preset: str, overrides: list[str], parity_count: int) -> Path:
    """An untrained teacher of ``preset`` saved in the trainer's checkpoint format and exported (parity checked)."""
    from excb.config import resolve
    from excb.inference.export import export_bundle
    from excb.method.balancing import Balancer
    from excb.models import build_model
    from excb.training.checkpoint import save_checkpoint

    cfg = resolve(preset_name=preset, overrides=["data=digits", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, teacher=True)
    bal = Balancer(cfg.model.num_clusters)
    ckpt = save_checkpoint(out / "serve.pt", {"config": json.loads(cfg.model_dump_json()),
                                              "teacher": model.state_dict(), "balancer": bal.state_dict(), "step": 0})
    export_bundle(ckpt, out / "bundle", parity_data="digits", parity_count=parity_count)
    return out / "bundle"


def torch_engine(bundle: Path, device: torch.device) -> Callable[[np.ndarray], None]:
    """The bundle's source teacher in torch: bf16 autocast + channels_last on CUDA, fp32 on the CPU."""
    from excb.models import ExportWrapper
    from excb.training.teacher import load_teacher

    meta = json.loads((bundle / "model.json").read_text())
    _, model, _, _ = load_teacher(meta["source"]["checkpoint"], device)
    wrapper = ExportWrapper(model).eval()
    cuda = device.type == "cuda"
    if cuda:
        wrapper = wrapper.to(memory_format=torch.channels_last)

    def run(x: np.ndarray) -> None:
        xt = torch.from_numpy(x).to(device, non_blocking=True)
        if cuda:
            xt = xt.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            emb, sims = wrapper(xt)
            emb.float().cpu(), sims.float().cpu()  # the service returns host arrays: include the copy

    return run


def ort_engine(bundle: Path, threads: int) -> tuple[Callable[[np.ndarray], None], list[str]]:
    from excb.inference.onnx_runtime import OrtEmbedder, load_bundle

    emb = OrtEmbedder(load_bundle(bundle), ["cpu"], intra_op_threads=threads)
    return (lambda x: emb.run(x) and None), emb.active_providers


def rate(fn: Callable[[np.ndarray], None], x: np.ndarray, seconds: float) -> float:
    """img/s of back-to-back calls for about ``seconds`` (at least one call)."""
    count, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        count += x.shape[0]
        if time.perf_counter() - t0 >= seconds:
            return count / (time.perf_counter() - t0)


def measure(engines: dict[str, tuple[Callable[[np.ndarray], None], list[int]]], size: int, rounds: int,
            seconds: float) -> list[dict[str, Any]]:
    """Median img/s per (engine, batch); engines alternate within each round, order flipped every round."""
    rows = []
    names = list(engines)
    batches = sorted({b for _, bs in engines.values() for b in bs})
    for b in batches:
        x = np.random.default_rng(b).standard_normal((b, 3, size, size)).astype(np.float32)
        here = [n for n in names if b in engines[n][1]]
        for n in here:
            engines[n][0](x)  # warm-up: kernels, cuDNN/ORT plans for this shape
        rates: dict[str, list[float]] = {n: [] for n in here}
        for r in range(rounds):
            for n in (here if r % 2 == 0 else here[::-1]):
                rates[n].append(rate(engines[n][0], x, seconds))
        rows += [{"engine": n, "batch": b, "img_s": statistics.median(v), "rounds": v} for n, v in rates.items()]
    return rows


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [f"Bundle: {info['backbone']} at {info['size']} px, K = {info['clusters']}; ORT providers "
             f"{info['ort_providers']} ({info['ort_threads']} threads).", "",
             "| engine | batch | img/s |", "|---|---|---|"]
    lines += [f"| {r['engine']} | {r['batch']} | {r['img_s']:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--preset", default="resnet50-ep400")
    p.add_argument("--torch-batches", default="1,64,256")
    p.add_argument("--ort-batches", default="1,16")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="ORT intra-op threads")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--bundle-dir", type=Path, help="keep the bundle here (default: a temporary folder)")
    p.add_argument("--check", action="store_true", help="tiny net, batches 1,4, no meaningful timings")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    from excb.distributed import resolve_device

    device = resolve_device(args.device)
    overrides, parity = (CHECK_OVERRIDES, 16) if args.check else ([], 64)
    if args.check:
        args.preset, args.torch_batches, args.ort_batches = "cpu-small", "1,4", "1,4"
        args.rounds, args.seconds = 1, 0.05
    with tempfile.TemporaryDirectory(prefix="excb-serve-") as tmp:
        where = args.bundle_dir or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        bundle = build_bundle(where, args.preset, overrides, parity)
        export_s = time.perf_counter() - t0
        meta = json.loads((bundle / "model.json").read_text())
        ort_run, providers = ort_engine(bundle, args.threads)
        engines = {f"torch {device.type}" + (" bf16" if device.type == "cuda" else " fp32"):
                   (torch_engine(bundle, device), [int(b) for b in args.torch_batches.split(",")]),
                   "onnxruntime cpu": (ort_run, [int(b) for b in args.ort_batches.split(",")])}
        rows = measure(engines, meta["input"]["size"], args.rounds, args.seconds)
    info = {"backbone": meta["arch"]["backbone"], "size": meta["input"]["size"], "clusters": meta["num_clusters"],
            "ort_providers": providers, "ort_threads": args.threads, "device": str(device),
            "export_seconds": round(export_s, 1), "parity": meta["parity"], "check": args.check,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    print(markdown(rows, info))
    result = {"benchmark": "serving_gpu", "info": info, "rows": rows}
    print(json.dumps(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
