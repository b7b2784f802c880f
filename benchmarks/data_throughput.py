"""Data throughput: decode + ExCB multi-crop per path, and end-to-end training with real JPEGs vs synthetic inputs.

1. Decode + multi-crop (reference augmentation: 2x224 + 6x96, jitter, grayscale, blur, solarize) of
   500x375 q90 JPEGs, img/s, one process:
   * ``cpu``: PIL decode (``excb.data.decode``) + ``MultiCropTransform``, one image at a time (what one
     DataLoader worker does);
   * ``device``: batched ``decode_jpeg`` + ``GpuMultiCrop`` on ``--device`` (nvJPEG + CUDA kernels on a
     GPU; the same code on CPU tensors when no GPU is present).
   The two paths alternate in timed blocks (A B A B) on the same images.
2. End to end: a real trainer ``Run`` on ``shards:`` of those JPEGs (loader workers and pinning chosen by
   ``excb.data.loader.dataloader_settings``, GPU augmentation per ``data.gpu_augment=auto``) against the
   same ``Run.train_step`` on synthetic tensors already on the device, alternating in timed blocks of
   ``--steps`` steps. Target (performance.md): real >= 85 % of synthetic on a GPU.

    python benchmarks/data_throughput.py                         # CPU: cpu-small preset end to end
    python benchmarks/data_throughput.py --device cuda           # GPU: resnet50 at batch 128 end to end
    python benchmarks/data_throughput.py --quick --json-out r.json
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from excb.config import AugmentConfig, TrainConfig, resolve
from excb.data.augment import MultiCropTransform
from excb.data.decode import decode_image
from excb.data.gpu_augment import GpuMultiCrop, decode_jpegs
from excb.data.pack import pack
from excb.distributed import DistContext, resolve_device
from excb.training.trainer import Run


def make_jpegs(folder: Path, n: int, width: int, height: int, quality: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs (smooth colour fields + texture, ~100 kB at 500x375 q90) written to ``folder``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    blobs = []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        f = rng.uniform(0.005, 0.05, (3, 2))
        phase = rng.uniform(0, 6.28, 3)
        base = np.stack([127 + 100 * np.sin(f[c, 0] * xx + f[c, 1] * yy + phase[c]) for c in range(3)], -1)
        noise = rng.normal(0, 18, (height, width, 3))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(arr).save(out, format="JPEG", quality=quality)
        blobs.append(out.getvalue())
        (folder / f"{i:05d}.jpg").write_bytes(blobs[-1])
    return blobs


def _alternate(fns: dict[str, Callable[[], int]], rounds: int) -> dict[str, list[float]]:
    """Run each fn once per round, order flipped every round; img/s per block."""
    rates: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            images = fns[name]()
            rates[name].append(images / (time.perf_counter() - t0))
    return rates


def bench_multicrop(blobs: list[bytes], aug: AugmentConfig, device: torch.device, batch: int,
                    rounds: int) -> dict[str, Any]:
    cpu = MultiCropTransform(aug)
    dev = GpuMultiCrop(aug)
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    gen = torch.Generator().manual_seed(0)

    def cpu_path() -> int:
        for b in blobs:
            cpu(decode_image(b))
        return len(blobs)

    def device_path() -> int:
        for i in range(0, len(data), batch):
            images, _ = decode_jpegs(data[i:i + batch], device)
            g, l = dev(images, gen, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return len(data)

    device_path()  # warm-up (nvJPEG handles, kernels)
    rates = _alternate({"cpu": cpu_path, "device": device_path}, rounds)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"cpu_img_s": med["cpu"], "device_img_s": med["device"], "ratio": med["device"] / med["cpu"],
            "blocks": rates, "images_per_block": len(blobs), "decode_batch": batch}


def e2e_config(args: argparse.Namespace, device: torch.device, shards: str, out: str) -> TrainConfig:
    if device.type == "cuda":
        preset, extra = "resnet50-ep400", [f"batch_size={args.batch_size or 128}"]
    else:
        preset, extra = "cpu-small", [f"batch_size={args.batch_size or 32}"]
    items = [f"data.source=shards:{shards}", f"device={device.type}", "kmeans.enabled=false", "progress=false",
             f"out={out}", "data.shuffle_buffer=64", *extra, *args.set]
    return resolve(overrides=items, preset_name=preset)


def bench_end_to_end(cfg: TrainConfig, device: torch.device, steps: int, rounds: int) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    run = Run(cfg, DistContext(rank=0, world_size=1, local_rank=0, device=device))
    a, b = cfg.augment, cfg.batch_size
    gen = torch.Generator().manual_seed(1)
    g_syn = torch.randn(2, b, 3, a.global_size, a.global_size, generator=gen).to(device)
    l_syn = (torch.randn(a.num_local_crops, b, 3, a.local_size, a.local_size, generator=gen).to(device)
             if a.num_local_crops else None)
    state = {"epoch": 0, "batch": 0, "it": iter(run.batches(0, 0))}

    def next_batch() -> Any:
        while True:
            try:
                batch = next(state["it"])
                state["batch"] += 1
                return batch
            except StopIteration:
                state["epoch"] += 1
                state["batch"] = 0
                state["it"] = iter(run.batches(state["epoch"], 0))

    def real() -> int:
        n = 0
        for _ in range(steps):
            g, l, _ = run.data.device_views(next_batch(), state["epoch"], state["batch"])
            float(run.train_step(g, l, want_metrics=False)["loss"])
            n += g.shape[1]
        return n

    def synthetic() -> int:
        for _ in range(steps):
            float(run.train_step(g_syn, l_syn, want_metrics=False)["loss"])
        return steps * b

    real()
    synthetic()  # warm-up both
    rates = _alternate({"real": real, "synthetic": synthetic}, rounds)
    med = {k: statistics.median(v) for k, v in rates.items()}
    from excb.data.loader import dataloader_settings

    return {"preset_batch": b, "real_img_s": med["real"], "synthetic_img_s": med["synthetic"],
            "real_over_synthetic": med["real"] / med["synthetic"], "blocks": rates, "steps_per_block": steps,
            "gpu_augment": run.data.gpu_augment, "loader": dataloader_settings(device, cfg.data.num_workers),
            "global_size": a.global_size, "local_size": a.local_size, "num_local_crops": a.num_local_crops}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=128, help="JPEGs per multi-crop block and in the shard set")
    p.add_argument("--size", default="500x375", help="JPEG width x height")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="timed blocks per path")
    p.add_argument("--steps", type=int, default=8, help="training steps per end-to-end block")
    p.add_argument("--batch-size", type=int, default=None, help="end-to-end batch (default 128 GPU / 32 CPU)")
    p.add_argument("--set", action="append", default=[], help="extra config override for the end-to-end run")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.images, args.size, args.rounds, args.steps = 16, "120x90", 2, 2
        args.batch_size = args.batch_size or 8
        args.set = ["model.width=8", "model.num_clusters=64", "model.projector_hidden_dim=64",
                    "model.predictor_hidden_dim=64", "model.bottleneck_dim=32", *args.set]
    device = resolve_device(args.device)
    width, height = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        blobs = make_jpegs(Path(tmp) / "jpegs", args.images, width, height, args.quality)
        shards = str(Path(tmp) / "shards")
        pack(str(Path(tmp) / "jpegs"), shards, shard_size=max(args.images // 4, 1), progress=False)
        aug = AugmentConfig(global_size=64, local_size=32) if args.quick else AugmentConfig()
        crops = bench_multicrop(blobs, aug, device, args.decode_batch, args.rounds)
        cfg = e2e_config(args, device, shards, str(Path(tmp) / "run"))
        e2e = bench_end_to_end(cfg, device, args.steps, args.rounds)
    result = {
        "benchmark": "data_throughput", "date": datetime.date.today().isoformat(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "jpeg": {"size": f"{width}x{height}", "quality": args.quality,
                 "mean_bytes": int(sum(map(len, blobs)) / len(blobs))},
        "multicrop": {"augment": f"{aug.global_size}x2 + {aug.local_size}x{aug.num_local_crops}", **crops},
        "end_to_end": e2e,
    }
    mc, ee = result["multicrop"], result["end_to_end"]
    print(f"device {result['device']} ({result['device_name']}), torch {result['torch']}, "
          f"{result['threads']} threads, JPEG {width}x{height} q{args.quality} "
          f"(~{result['jpeg']['mean_bytes'] // 1000} kB)")
    print("| what | cpu path img/s | device path img/s | ratio |")
    print("|---|---|---|---|")
    print(f"| decode + multi-crop {mc['augment']} | {mc['cpu_img_s']:.1f} | {mc['device_img_s']:.1f} "
          f"| {mc['ratio']:.2f}x |")
    print("| end to end | real JPEG img/s | synthetic img/s | real / synthetic |")
    print(f"| batch {ee['preset_batch']}, {ee['global_size']}x2+{ee['local_size']}x{ee['num_local_crops']}, "
          f"{'device' if ee['gpu_augment'] else 'CPU'} augmentation, {ee['loader']['num_workers']} workers "
          f"| {ee['real_img_s']:.1f} | {ee['synthetic_img_s']:.1f} | {ee['real_over_synthetic']:.2f} |")
    text = json.dumps(result)
    if args.json_out:
        Path(args.json_out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
