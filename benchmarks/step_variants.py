"""One training step under config variants, timed side by side in one process (alternating blocks).

For layout/precision/compile switches that must not change the model, e.g. channels-last on a CPU:

    python benchmarks/step_variants.py --threads 2 nchw:channels_last=false nhwc:channels_last=true

Each variant is a real trainer ``Run`` of the fitted CPU recipe's model (ResNet-18 width 16, 28 px globals,
4 x 16 px locals, K = 1024, batch 128) on synthetic crops; blocks alternate A B, B A, ... because the machines
are shared and noisy, and the figure is the ratio of the medians (and each block pair's ratio).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import bench_config, build_tuned, synthetic_batch, tuned_step_fn  # noqa: E402

FITTED_CPU_MODEL = ["model.backbone=resnet18", "model.width=16", "model.small_images=true", "model.stem_stride=2",
                    "augment.global_size=28", "augment.local_size=16", "augment.num_local_crops=4",
                    "model.num_clusters=1024", "model.projector_hidden_dim=512", "model.bottleneck_dim=128",
                    "model.predictor_hidden_dim=512", "compile=off", "precision=fp32"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", metavar="NAME:key=value[,key=value]", help="the first is the reference")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--blocks", type=int, default=6, help="timed blocks per variant")
    p.add_argument("--steps", type=int, default=3, help="steps per block")
    p.add_argument("--batch", type=int, default=128, help="batch size")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.variants:
            name, _, items = spec.partition(":")
            extra = [x for x in items.split(",") if x]
            cfg = bench_config("cpu-small", args.batch, "cpu", FITTED_CPU_MODEL + extra, False, f"{tmp}/{name}")
            run = build_tuned(cfg, torch.device("cpu"))
            step = tuned_step_fn(run, *synthetic_batch(cfg, torch.device("cpu"), 0))
            step()  # warm-up
            runs[name] = (step, [])
        names = list(runs)
        for block in range(args.blocks):
            for name in names if block % 2 == 0 else names[::-1]:
                step, times = runs[name]
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times.append((time.perf_counter() - t0) / args.steps)
    ref = names[0]
    print(f"| variant | median ms/step | {ref} / variant (medians) | per block |\n|---|---|---|---|")
    for name in names:
        times = runs[name][1]
        pairs = " ".join(f"{a / b:.2f}" for a, b in zip(runs[ref][1], times))
        print(f"| {name} | {1000 * statistics.median(times):.0f} | "
              f"{statistics.median(runs[ref][1]) / statistics.median(times):.2f}x | {pairs} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
