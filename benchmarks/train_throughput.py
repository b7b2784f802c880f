"""Training-step throughput: the tuned ExCB step (``excb.method.step.ExCBStep``) against a naive eager step.

One step = teacher forward + balancing + student forward/backward + optimizer + EMA + size update, on
synthetic inputs already on the device (no data loading). Both steps start from the same weights and run
in one process, alternating in timed blocks (A B, then B A, ...), because the machines are shared and
noisy: only the ratio measured side by side means much (docs/performance.md, "How to measure").

The naive step mirrors the reference code's eager step (method.md §4.1, §10 items 7 and 11): a plain
for-loop optimizer, a Python loop over parameters for the EMA, the size update through
``one_hot(argmax, K).float().mean(0)``, the loss computed pair by pair with a log-softmax per pair
(``excb.method.loss.reference_loss``), and the unused local-crop projection logits computed anyway. It runs
fp32 on CPU and, by default, fp16 autocast + GradScaler on CUDA like the reference (``--naive-precision``).

Peak memory is measured in a fresh child process per variant (2 steps after one warm-up step), so the two
variants' resident state does not mix: ``torch.cuda.max_memory_allocated`` on CUDA, the process's
``ru_maxrss`` on CPU (which includes the Python/torch runtime, a few hundred MiB).

    python benchmarks/train_throughput.py                       # CPU: all presets, reference ones at batch 8
    python benchmarks/train_throughput.py --device cuda         # GPU: R50 / ViT-S at batch 64 and 128
    python benchmarks/train_throughput.py --presets cpu-small --quick
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from excb.config import PRESET_NAMES, TrainConfig, resolve
from excb.distributed import DistContext, resolve_device
from excb.method import schedules
from excb.method.balancing import balance
from excb.method.loss import reference_loss
from excb.models import build_model
from excb.training.trainer import Run

REFERENCE_PRESETS = ("resnet50-ep400", "vit-s16-ep800")
DIGITS_IMAGES = 1797  # the stand-in data set only sizes the schedules; batches larger than it cannot be built
QUICK_OVERRIDES = ["model.num_clusters=256", "augment.global_size=64", "augment.local_size=32",
                   "model.small_images=false", "model.projector_hidden_dim=256", "model.predictor_hidden_dim=256",
                   "model.bottleneck_dim=64"]


# ------------------------------------------------------------------------------------------- config
def bench_config(preset: str, batch: int, device: str, extra: list[str], quick: bool, out_dir: str) -> TrainConfig:
    """The preset's config with the benchmark's batch, on a tiny stand-in data set (never read)."""
    if batch > DIGITS_IMAGES:
        raise ValueError(f"--batch: {batch} is above {DIGITS_IMAGES}, the size of the stand-in data set a Run needs")
    items = [f"batch_size={batch}", f"device={device}", "data.source=digits", "data.split=all", "data.num_workers=0",
             "kmeans.enabled=false", "progress=false", f"out={out_dir}"]
    if quick and preset != "cpu-small":
        items += QUICK_OVERRIDES
    return resolve(overrides=items + list(extra), preset_name=preset)


def default_batches(preset: str, device: torch.device, quick: bool) -> list[int]:
    """Batch sizes per preset when ``--batch`` is not given (the CPU cannot run batch 1024 R50/ViT steps)."""
    if quick:
        return [8]
    if preset == "cpu-small":
        return [256]
    return [64, 128] if device.type == "cuda" else [8]


def synthetic_batch(cfg: TrainConfig, device: torch.device, seed: int) -> tuple[Tensor, Tensor | None]:
    """Random crops shaped like the loader's output: globals [2, B, 3, G, G], locals [L, B, 3, l, l]."""
    gen = torch.Generator().manual_seed(seed)
    a, b = cfg.augment, cfg.batch_size
    g = torch.randn(2, b, 3, a.global_size, a.global_size, generator=gen)
    l = torch.randn(a.num_local_crops, b, 3, a.local_size, a.local_size, generator=gen) if a.num_local_crops else None
    return g.to(device), (l.to(device) if l is not None else None)


# --------------------------------------------------------------------------------------- the tuned step
def build_tuned(cfg: TrainConfig, device: torch.device) -> Run:
    """A real trainer ``Run`` (foreach/fused optimizer, lerp EMA, bincount update, bf16 + channels_last on GPU)."""
    torch.manual_seed(cfg.seed)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=device)
    return Run(cfg, ctx)


def tuned_step_fn(run: Run, g: Tensor, l: Tensor | None) -> Callable[[], float]:
    def step() -> float:
        out = run.train_step(g, l, want_metrics=False)
        run.step += 1
        return float(out["loss"])  # the training loop reads the loss every step too

    return step


# --------------------------------------------------------------------------------------- the naive step
class NaiveStep:
    """The reference-style eager step: same model and hyper-parameters, none of the engineering."""

    def __init__(self, cfg: TrainConfig, device: torch.device, init: nn.Module, precision: str) -> None:
        self.cfg, self.device = cfg, device
        self.student = build_model(cfg).to(device)
        self.student.load_state_dict(init.state_dict())
        self.teacher = build_model(cfg, teacher=True).to(device)
        self.teacher.load_state_dict(init.state_dict())
        self.teacher.requires_grad_(False)
        self.optimizer = self._optimizer()
        sp = dict(self.student.named_parameters())
        self.ema_pairs = [(tp, sp[n]) for n, tp in self.teacher.named_parameters() if n in sp]
        k = cfg.model.num_clusters
        self.sizes = torch.full((k,), 1.0 / k, device=device)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.amp_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.step_count = 0
        self.total_steps = max(cfg.epochs * (DIGITS_IMAGES // cfg.batch_size), 1)

    def _optimizer(self) -> torch.optim.Optimizer:
        o, groups = self.cfg.optim, self.student.param_groups()
        decayed = ("backbone", "projector", "centroids")
        spec = [{"params": groups[n], "weight_decay": o.weight_decay if n in decayed else 0.0}
                for n in groups if groups[n]]
        if o.name == "sgd":
            return torch.optim.SGD(spec, lr=o.lr, momentum=o.momentum, foreach=False)
        return torch.optim.AdamW(spec, lr=o.lr, betas=o.betas, foreach=False, fused=False)

    def __call__(self, globals_: Tensor, locals_: Tensor | None) -> float:
        cfg, b = self.cfg, globals_.shape[1]
        lr = schedules.learning_rate(self.step_count, self.total_steps, cfg.optim.lr, 0, cfg.optim.lr_min_factor)
        wd = schedules.weight_decay(self.step_count, self.total_steps, cfg.optim.weight_decay,
                                    cfg.optim.weight_decay_end_factor)
        for group in self.optimizer.param_groups:  # the reference's per-step scheduler loop
            group["lr"] = lr
            if group["weight_decay"] > 0:
                group["weight_decay"] = wd
        m = schedules.ema_momentum(self.step_count, self.total_steps, cfg.ema_momentum_start, cfg.ema_momentum_end)
        g = globals_.reshape(-1, *globals_.shape[2:])
        l = locals_.reshape(-1, *locals_.shape[2:]) if locals_ is not None else None
        amp = dict(device_type=self.device.type, dtype=self.amp_dtype or torch.float32,
                   enabled=self.amp_dtype is not None)
        with torch.no_grad(), torch.autocast(**amp):
            z_t = self.teacher.forward_teacher(g).float()
            balanced = balance(z_t, self.sizes, cfg.balancing.mode, self.gen)
            probs = torch.softmax(balanced / cfg.balancing.teacher_temp, 1)
        with torch.autocast(**amp):
            out = self._student_rows(g, l)
        k, n_glob = out.shape[-1], 2 * b
        rows = out.float() / cfg.balancing.student_temp
        proj_logits = rows[:n_glob].reshape(2, b, k)
        pred_logits = rows[out.shape[0] // 2:].reshape(-1, b, k)
        loss = reference_loss(probs.reshape(2, b, k), proj_logits, pred_logits)
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            for tp, sp in self.ema_pairs:  # per-parameter EMA loop, as in the reference
                tp.mul_(m).add_(sp.detach(), alpha=1.0 - m)
            freq = F.one_hot(probs.argmax(1), k).float().mean(0)  # one-hot size update, as in the reference
            self.sizes.mul_(cfg.balancing.size_momentum).add_(freq, alpha=1.0 - cfg.balancing.size_momentum)
        self.step_count += 1
        return float(loss.detach())

    def _student_rows(self, g: Tensor, l: Tensor | None) -> Tensor:
        """All projection rows (local ones too, unused) then all predictor rows, concatenated like the reference."""
        s = self.student
        feats = s.backbone(g)
        if l is not None:
            feats = torch.cat([feats, s.backbone(l)])
        proj = s.projector(feats)
        n_glob = g.shape[0]
        parts = [s.centroids(proj[:n_glob])]
        if l is not None:
            parts.append(s.centroids(proj[n_glob:], detach_centroids=True))
        parts.append(s.centroids(s.predictor(proj) if s.predictor is not None else proj, detach_centroids=True))
        return torch.cat(parts)


def naive_precision(requested: str, device: torch.device) -> str:
    """``auto``: fp16 autocast on CUDA (what the reference runs), fp32 on CPU."""
    if requested == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return requested


# ------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(step: Callable[[], float], steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` consecutive steps, device work included."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0


@dataclass
class Row:
    preset: str
    backbone: str
    batch: int
    num_clusters: int
    crops: str
    tuned_img_s: float
    naive_img_s: float
    ratio: float
    paired_ratio_min: float
    paired_ratio_max: float
    tuned_peak_mib: float | None
    naive_peak_mib: float | None
    tuned_precision: str
    naive_precision: str
    blocks: int
    steps_per_block: int
    tuned_block_img_s: list[float] = field(default_factory=list)
    naive_block_img_s: list[float] = field(default_factory=list)


def measure(preset: str, batch: int, device: torch.device, args: argparse.Namespace) -> Row:
    """Warm up both steps, then alternate timed blocks and take the median img/s of each."""
    with tempfile.TemporaryDirectory(prefix="excb-bench-") as tmp:
        cfg = bench_config(preset, batch, device.type, args.set, args.quick, tmp)
        run = build_tuned(cfg, device)
        naive_prec = naive_precision(args.naive_precision, device)
        naive = NaiveStep(cfg, device, run.learner.student_core, naive_prec)
        tuned_prec = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[run.learner.amp_dtype]
        g, l = synthetic_batch(cfg, device, cfg.seed)
        steps = {"tuned": tuned_step_fn(run, g, l), "naive": functools.partial(naive, g, l)}
        for _ in range(args.warmup):
            for fn in steps.values():
                fn()
        rates: dict[str, list[float]] = {"tuned": [], "naive": []}
        for block in range(args.blocks):
            order = ("tuned", "naive") if block % 2 == 0 else ("naive", "tuned")
            for name in order:
                rates[name].append(batch * args.steps / time_block(steps[name], args.steps, device))
        del run, naive, steps
    peaks = {name: None if args.no_memory else probe_peak(name, preset, batch, device, args) for name in rates}
    paired = [t / n for t, n in zip(rates["tuned"], rates["naive"])]
    tuned_med, naive_med = statistics.median(rates["tuned"]), statistics.median(rates["naive"])
    a = cfg.augment
    crops = f"2x{a.global_size}" + (f"+{a.num_local_crops}x{a.local_size}" if a.num_local_crops else "")
    return Row(preset, cfg.model.backbone, batch, cfg.model.num_clusters, crops, tuned_med, naive_med,
               tuned_med / naive_med, min(paired), max(paired), peaks["tuned"], peaks["naive"],
               tuned_prec, naive_prec, args.blocks, args.steps, rates["tuned"], rates["naive"])


# ------------------------------------------------------------------------------------- peak memory
def probe_peak(variant: str, preset: str, batch: int, device: torch.device, args: argparse.Namespace) -> float | None:
    """Peak memory (MiB) of one variant alone, measured in a child process so the other's state is absent."""
    spec = {"variant": variant, "preset": preset, "batch": batch, "device": device.type, "set": args.set,
            "quick": args.quick, "threads": args.threads, "naive_precision": args.naive_precision}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe", json.dumps(spec)],
                          capture_output=True, text=True, timeout=args.probe_timeout)
    if proc.returncode != 0:
        print(f"warning: memory probe for {variant} failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])


def run_probe(spec: dict[str, Any]) -> dict[str, float]:
    """Child side of :func:`probe_peak`: build one variant, one warm-up step, two steps, report the peak.

    CUDA: ``max_memory_allocated`` over the two steps after warm-up (absolute, like the anchor table).
    CPU: the process's peak RSS minus its RSS once the models are built, i.e. what training adds on top of
    the weights (gradients, optimizer state, activations); the Python/torch runtime is left out.
    """
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    with tempfile.TemporaryDirectory(prefix="excb-probe-") as tmp:
        cfg = bench_config(spec["preset"], spec["batch"], device.type, spec["set"], spec["quick"], tmp)
        if spec["variant"] == "naive":
            naive = NaiveStep(cfg, device, build_model(cfg).to(device),
                              naive_precision(spec["naive_precision"], device))
            g, l = synthetic_batch(cfg, device, cfg.seed)
            step: Callable[[], float] = functools.partial(naive, g, l)
        else:
            run = build_tuned(cfg, device)
            g, l = synthetic_batch(cfg, device, cfg.seed)
            step = tuned_step_fn(run, g, l)
        built = _current_rss_mib()
        step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step()
        step()
        sync(device)
        if device.type == "cuda":
            return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return {"peak_mib": peak - built}


def _current_rss_mib() -> float:
    """Resident set size now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# ------------------------------------------------------------------------------------------- report
def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                            "threads": torch.get_num_threads(), "cpu": _cpu_model(),
                            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or "unknown"


def markdown_table(rows: list[Row]) -> str:
    def rate(x: float) -> str:
        return f"{x:.1f}" if x >= 10 else f"{x:.3f}"

    def mib(x: float | None) -> str:
        return "n/a" if x is None else f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB"

    lines = ["| preset | backbone | batch | K | crops | tuned img/s | naive img/s | ratio (paired min-max) "
             "| tuned peak | naive peak | precision tuned / naive |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.preset} | {r.backbone} | {r.batch} | {r.num_clusters} | {r.crops} | {rate(r.tuned_img_s)} "
                     f"| {rate(r.naive_img_s)} | {r.ratio:.2f}x ({r.paired_ratio_min:.2f}-{r.paired_ratio_max:.2f}) "
                     f"| {mib(r.tuned_peak_mib)} | {mib(r.naive_peak_mib)} "
                     f"| {r.tuned_precision} / {r.naive_precision} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--presets", default=",".join(PRESET_NAMES), help="comma list of " + ", ".join(PRESET_NAMES))
    p.add_argument("--batch", default=None,
                   help="comma list of batch sizes for every preset "
                        "(default: cpu-small 256; R50/ViT 8 on CPU, 64,128 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (default 2 CPU, 10 CUDA)")
    p.add_argument("--blocks", type=int, default=None, help="timed blocks per variant (default 3 CPU, 4 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 1 CPU, 5 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--naive-precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="baseline autocast dtype; auto = fp16 on CUDA (as the reference), fp32 on CPU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every preset, e.g. --set model.num_clusters=4096")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--probe-timeout", type=int, default=900)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 warm-up, 2 blocks of 1 step, batch 8; R50/ViT shrunk to 64/32 px and K=256")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    defaults = (1, 2, 1) if args.quick else ((5, 4, 10) if cuda else (1, 3, 2))
    args.warmup = defaults[0] if args.warmup is None else args.warmup
    args.blocks = defaults[1] if args.blocks is None else args.blocks
    args.steps = defaults[2] if args.steps is None else args.steps
    for name in ("warmup", "blocks", "steps"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be positive")
    args.preset_list = [x.strip() for x in args.presets.split(",") if x.strip()]
    unknown = [x for x in args.preset_list if x not in PRESET_NAMES]
    if unknown or not args.preset_list:
        p.error(f"--presets: unknown {unknown}; choose from {', '.join(PRESET_NAMES)}")
    try:
        args.batch_list = [int(x) for x in args.batch.split(",")] if args.batch else None
    except ValueError:
        p.error(f"--batch: expected a comma list of integers, got {args.batch!r}")
    if args.batch_list is not None and any(b < 2 for b in args.batch_list):
        p.error("--batch: every batch size must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(run_probe(json.loads(args.probe))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    info = machine_info(device)
    rows: list[Row] = []
    for preset in args.preset_list:
        for batch in args.batch_list or default_batches(preset, device, args.quick):
            t0 = time.perf_counter()
            rows.append(measure(preset, batch, device, args))
            print(f"# {preset} batch {batch}: {rows[-1].tuned_img_s:.1f} vs {rows[-1].naive_img_s:.1f} img/s "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    gpu = ", " + info["gpu"] if "gpu" in info else ""
    print(f"machine: {info['cpu']}, {info['device']}{gpu}; torch {info['torch']}; "
          f"{info['threads']} threads; load average {info.get('load_avg')}; {info['date']}")
    print(markdown_table(rows))
    result = {"benchmark": "train_throughput", "machine": info, "argv": sys.argv[1:] if argv is None else argv,
              "rows": [asdict(r) for r in rows]}
    line = json.dumps(result)
    print(line)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
