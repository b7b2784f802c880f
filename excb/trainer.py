"""The ExCB training loop: one code path for a laptop CPU, one GPU and many GPUs under torchrun.

A run directory holds the resolved config, ``metrics.jsonl``, ``train.log``, ``summary.json`` and atomic
checkpoints. Resume is exact: the same weights and size estimate ``s`` as an uninterrupted run, because the
data order, every augmentation and every random draw are functions of (seed, epoch, index) or of saved
generator states.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from excb import schedules, stats
from excb.balancing import Balancer
from excb.checkpoint import LAST, checkpoint_dir, load_checkpoint, save_checkpoint
from excb.config import COMPILE_MIN_STEPS, TrainConfig, dump_yaml, validate
from excb.distributed import DistContext, all_gather_cat, all_reduce_sum_int, barrier, setup
from excb.kmeans import spherical_kmeans
from excb.loss import excb_loss
from excb.models import build_model

log = logging.getLogger("excb.trainer")

Callback = Callable[[dict[str, Any]], None]
PLAN_FILE = "recipe.json"  # the fitted choices and the budget's step count: a resume reuses them


class TrainingInterrupted(RuntimeError):
    """Raised after a cooperative stop (cancel/SIGTERM) once a checkpoint has been written."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; ``checkpoints/nan.pt`` holds the state for inspection."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    epochs_completed: int
    status: str
    summary: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- data
class SeededItems(Dataset):
    """Makes each item's augmentation a pure function of (seed, epoch, index).

    torchvision's transforms draw from the global torch RNG; forking it per item keeps the data identical
    whether the run was interrupted or not, and whatever the number of loader workers.
    """

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item_seed = (self.seed * 1_000_003 + self.epoch * 7_919 + index) % (2**63 - 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            random.seed(item_seed)
            return self.base[index]


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch permutation, split across ranks without overlap, able to start mid-epoch."""

    def __init__(self, n: int, local_batch: int, rank: int, world: int, seed: int) -> None:
        self.n, self.local_batch, self.rank, self.world, self.seed = n, local_batch, rank, world, seed
        self.epoch = 0
        self.start_batch = 0

    def batches_per_epoch(self) -> int:
        return (self.n // self.world) // self.local_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.local_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        per_rank = self.batches_per_epoch() * self.local_batch
        mine = perm[self.rank :: self.world][:per_rank]
        return iter(mine[self.start_batch * self.local_batch :].tolist())


def _make_loader(items: SeededItems, sampler: ResumableSampler, cfg: TrainConfig, device: torch.device,
                 collate: Callable[[list[Any]], Any]) -> DataLoader:
    from excb.data.loader import dataloader_settings

    opts = dataloader_settings(device, cfg.data.num_workers)
    return DataLoader(
        items,
        batch_size=sampler.local_batch,
        sampler=sampler,
        num_workers=opts["num_workers"],
        collate_fn=collate,
        pin_memory=opts["pin_memory"],
        drop_last=True,
        persistent_workers=False,  # re-created per epoch so the crop-scale schedule takes effect
        prefetch_factor=opts["prefetch_factor"],
        generator=torch.Generator().manual_seed(cfg.seed),  # never consume the global RNG
    )


def _make_stream_loader(stream: Any, cfg: TrainConfig, device: torch.device) -> DataLoader:
    """Shards: the stream batches and collates itself (equal full batches per rank); workers split it."""
    from excb.data.loader import dataloader_settings

    opts = dataloader_settings(device, cfg.data.num_workers)
    return DataLoader(stream, batch_size=None, num_workers=opts["num_workers"], pin_memory=opts["pin_memory"],
                      persistent_workers=False, prefetch_factor=opts["prefetch_factor"])


def _use_gpu_augment(cfg: TrainConfig, device: torch.device) -> bool:
    """``data.gpu_augment``: auto = decode and augment on the device when it is a GPU."""
    mode = cfg.data.gpu_augment
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def _augment_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """GPU-path augmentation draws are a function of (seed, rank, epoch, batch), so resume replays them."""
    return (seed * 1_000_003 + rank * 7_919 + epoch * 104_729 + batch * 15_485_863 + 17) % (2**63 - 1)


# ---------------------------------------------------------------------------------------- helpers
def _compile_decision(cfg: TrainConfig, device: torch.device, total_steps: int) -> tuple[bool, str]:
    """Whether to torch.compile, and why: ``auto`` compiles only long runs on a device inductor can build for."""
    if cfg.compile != "auto":
        return cfg.compile == "on", f"compile={cfg.compile}"
    if total_steps < COMPILE_MIN_STEPS:
        return False, f"auto: {total_steps} steps < {COMPILE_MIN_STEPS}, compiling would not pay off"
    if device.type == "cpu":
        cxx = os.environ.get("CXX") or "g++"
        if shutil.which(cxx) is None:
            return False, f"auto: no C++ compiler ({cxx}) for inductor's CPU kernels"
    return True, f"auto: {total_steps} steps"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def _precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    p = cfg.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def _optimizer(cfg: TrainConfig, groups: dict[str, list[nn.Parameter]], device: torch.device) -> torch.optim.Optimizer:
    wd = cfg.optim.weight_decay
    spec = [
        {"name": "backbone", "params": groups["backbone"], "weight_decay": wd},
        {"name": "backbone_noreg", "params": groups["backbone_noreg"], "weight_decay": 0.0},
        {"name": "projector", "params": groups["projector"], "weight_decay": wd},
        {"name": "projector_noreg", "params": groups["projector_noreg"], "weight_decay": 0.0},
        {"name": "centroids", "params": groups["centroids"], "weight_decay": wd},
    ]
    spec = [g for g in spec if g["params"]]
    for g in spec:
        g["base_wd"] = g["weight_decay"]
    fused = cfg.optim.fused if cfg.optim.fused is not None else device.type == "cuda"
    kwargs: dict[str, Any] = {"lr": cfg.optim.lr}
    if fused:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(spec, momentum=cfg.optim.momentum, **kwargs)
    return torch.optim.AdamW(spec, betas=cfg.optim.betas, **kwargs)


def _apply_schedules(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int, total: int, warmup: int) -> dict[str, float]:
    lr = schedules.learning_rate(step, total, cfg.optim.lr, warmup, cfg.optim.lr_min_factor)
    wd = schedules.weight_decay(step, total, cfg.optim.weight_decay, cfg.optim.weight_decay_end_factor)
    cfac = schedules.centroid_wd_factor(step, total, cfg.optim.centroid_wd_start_factor)
    for g in opt.param_groups:
        g["lr"] = lr
        if g["base_wd"] > 0:
            g["weight_decay"] = wd * (cfac if g["name"] == "centroids" else 1.0)
    return {"lr": lr, "wd": wd, "wd_centroid": wd * cfac}


def _clip_per_parameter(params: list[nn.Parameter], max_norm: float) -> None:
    """DINO-style clipping: each parameter's gradient norm is capped on its own (not a global norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)


@torch.no_grad()
def _ema_update(teacher_params: list[Tensor], student_params: list[Tensor], momentum: float) -> None:
    """teacher <- m*teacher + (1-m)*student, one fused ``_foreach`` call over all parameters."""
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _global_unique(labels: Tensor) -> Tensor:
    return torch.unique(all_gather_cat(labels)).numel() * torch.ones((), device=labels.device)


# ------------------------------------------------------------------------------------------ the run
class RunLogger:
    """Writes metrics.jsonl/train.log on rank 0 and forwards every event to the callback."""

    def __init__(self, run_dir: Path, ctx: DistContext, callback: Callback | None) -> None:
        self.run_dir, self.ctx, self.callback = run_dir, ctx, callback
        self.metrics_path = run_dir / "metrics.jsonl"

    def rewind(self, step: int) -> None:
        """After a resume, drop rows logged past the checkpoint so the series has no duplicates."""
        if not self.ctx.is_main or not self.metrics_path.exists():
            return
        kept = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, self.metrics_path)

    def emit(self, event: dict[str, Any], persist: bool = True) -> None:
        if not self.ctx.is_main:
            return
        if persist:
            with self.metrics_path.open("a") as fh:
                fh.write(json.dumps(event) + "\n")
        if self.callback is not None:
            self.callback(event)


class Run:
    """State of one training run; ``train()`` drives it."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext) -> None:
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.run_dir = Path(cfg.out)
        self.step = 0
        self.epoch = 0
        self.epoch_batch = 0
        self.images_seen = 0
        self.skipped = 0
        self.wall_time = 0.0
        self._build_data()
        self._build_models()

    # -- construction
    def _build_data(self) -> None:
        """Map-style sets go through SeededItems + ResumableSampler (exact resume); ``shards:`` sources stream.

        On the GPU path (``data.gpu_augment``) the loader yields undecoded JPEG bytes (shards) or uint8
        images, and :meth:`device_views` decodes and multi-crops them on the device.
        """
        from excb.data.augment import MultiCropTransform
        from excb.data.datasets import build_dataset
        from excb.data.gpu_augment import GpuMultiCrop, ToUint8Tensor, collate_raw
        from excb.data.loader import collate_multicrop, dataloader_settings
        from excb.data.shards import open_shards

        cfg = self.cfg
        self.gpu_augment = _use_gpu_augment(cfg, self.device)
        self.transform: Any = GpuMultiCrop(cfg.augment) if self.gpu_augment else MultiCropTransform(cfg.augment)
        self.collate = collate_raw if self.gpu_augment else collate_multicrop
        local_batch = cfg.batch_size // self.ctx.world_size
        if local_batch < 1 or cfg.batch_size % self.ctx.world_size:
            raise ValueError(f"batch_size: {cfg.batch_size} is not divisible by world size {self.ctx.world_size}")
        self.stream: Any = None
        self.items: Any = None
        self.sampler: Any = None
        if cfg.data.source.strip().startswith("shards:"):
            self.stream = open_shards(
                cfg.data.source.strip(), transform=None if self.gpu_augment else self.transform,
                mode="raw" if self.gpu_augment else "pil", seed=cfg.seed, rank=self.ctx.rank,
                world_size=self.ctx.world_size, batch_size=local_batch, collate=self.collate,
                shuffle_buffer=cfg.data.shuffle_buffer, limit=cfg.data.limit, max_pixels=cfg.data.max_image_pixels)
            n_images = len(self.stream)
        else:
            item_transform = ToUint8Tensor(4 * cfg.augment.global_size) if self.gpu_augment else self.transform
            base = build_dataset(cfg.data.source, split=cfg.data.split, limit=cfg.data.limit,
                                 transform=item_transform, max_pixels=cfg.data.max_image_pixels)
            self.items = SeededItems(base, cfg.seed)
            self.sampler = ResumableSampler(len(base), local_batch, self.ctx.rank, self.ctx.world_size, cfg.seed)
            n_images = len(base)
        self.steps_per_epoch = (n_images // self.ctx.world_size) // local_batch
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"batch_size: {cfg.batch_size} is larger than the data set ({n_images} images from {cfg.data.source!r})"
            )
        log.info("data: %d images, %s augmentation, loader %s", n_images, "device" if self.gpu_augment else "CPU",
                 dataloader_settings(self.device, cfg.data.num_workers))
        self.set_length(cfg)

    def set_length(self, cfg: TrainConfig) -> None:
        """Total steps, warm-up and epochs from ``cfg`` (again after a budget calibration changed them)."""
        self.cfg = cfg
        planned = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(planned, cfg.max_steps) if cfg.max_steps else planned
        self.warmup_steps = min(int(round(cfg.optim.warmup_epochs * self.steps_per_epoch)), self.total_steps // 2)
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

    def _build_models(self) -> None:
        cfg, device = self.cfg, self.device
        student = build_model(cfg).to(device)
        teacher = build_model(cfg, teacher=True).to(device)
        teacher.load_state_dict(student.state_dict())
        for p in teacher.parameters():
            p.requires_grad_(False)
        if self.ctx.distributed and cfg.model.sync_bn:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        if cfg.channels_last and device.type == "cuda":
            student = student.to(memory_format=torch.channels_last)
            teacher = teacher.to(memory_format=torch.channels_last)
        self.student_core = student
        self.teacher = teacher
        groups = student.param_groups()
        self.optimizer = _optimizer(cfg, groups, device)
        self.trainable = [p for g in groups.values() for p in g]
        self.student: nn.Module = student
        if self.ctx.distributed:
            ddp_ids = [device.index] if device.type == "cuda" else None
            self.student = nn.parallel.DistributedDataParallel(student, device_ids=ddp_ids)
        self.teacher_forward: Callable[[Tensor], Tensor] = teacher.forward_teacher
        self.compiled, why = _compile_decision(cfg, device, self.total_steps)
        log.info("torch.compile: %s (%s)", "on" if self.compiled else "off", why)
        if self.compiled:  # after DDP, as torch recommends; state_dict()/EMA keep using the uncompiled modules
            self.student = torch.compile(self.student)
            self.teacher_forward = torch.compile(teacher.forward_teacher)
        sp = dict(self.student_core.named_parameters())
        self.ema_pairs = [(tp, sp[n]) for n, tp in teacher.named_parameters() if n in sp]
        b = cfg.balancing
        self.balancer = Balancer(cfg.model.num_clusters, b.method, b.mode, b.size_momentum, b.teacher_temp,
                                 b.center_momentum).to(device)
        self.balance_gen = torch.Generator(device=device).manual_seed(cfg.seed * 31 + self.ctx.rank)
        self.amp_dtype = _precision(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)

    # -- checkpoints
    def state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "balance": self.balance_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": 1,
            "config": json.loads(self.cfg.model_dump_json()),
            "student": self.student_core.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "epoch_batch": self.epoch_batch,
            "images_seen": self.images_seen,
            "skipped": self.skipped,
            "wall_time": self.wall_time,
            "rng": rng,
        }

    def save(self, name: str = LAST) -> Path | None:
        path = None
        if self.ctx.is_main:
            path = save_checkpoint(checkpoint_dir(self.run_dir) / name, self.state())
        barrier()
        return path

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.student_core.load_state_dict(ckpt["student"])
        self.teacher.load_state_dict(ckpt["teacher"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.balancer.load_state_dict(ckpt["balancer"])
        for key in ("step", "epoch", "epoch_batch", "images_seen", "skipped", "wall_time"):
            setattr(self, key, ckpt[key])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.balance_gen.set_state(ckpt["rng"]["balance"])
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)

    # -- k-means centroid initialisation (method.md §4.9)
    @torch.no_grad()
    def init_centroids(self) -> dict[str, float]:
        cfg = self.cfg
        k = cfg.model.num_clusters
        want = max(cfg.kmeans.samples // self.ctx.world_size, 1)
        feats: list[Tensor] = []
        have = 0
        started = time.time()
        # a shuffle of its own (epoch = cfg.epochs), as in the reference; the crop scale of epoch 0
        for i, batch in enumerate(self.batches(cfg.epochs, 0, schedule_epoch=0)):
            globals_, _, _ = self.device_views(batch, cfg.epochs, i)
            x = globals_[i % 2]
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                feats.append(self.teacher.project(x).float())
            have += x.shape[0]
            if have >= want:
                break
        x = torch.cat(feats)[:want]
        gen = torch.Generator(device=x.device).manual_seed(cfg.seed)
        result = spherical_kmeans(x, k, iterations=cfg.kmeans.iterations, generator=gen, chunk_size=cfg.kmeans.chunk_size)
        self.teacher.centroids.set_centroids(result.centroids)
        self.student_core.centroids.set_centroids(result.means)
        counts = result.counts.float()
        return {"kmeans_seconds": time.time() - started, "kmeans_samples": float(x.shape[0] * self.ctx.world_size),
                "kmeans_empty_reseeded": float(result.empty_reseeded),
                "kmeans_effective_clusters": stats.balance_stats(counts)["effective_clusters"]}

    # -- data
    def batches(self, epoch: int, start_batch: int, schedule_epoch: int | None = None) -> Iterator[Any]:
        """This rank's loader batches of ``epoch`` from ``start_batch`` on (at most the epoch's remaining steps).

        Map-style sets resume exactly mid-epoch; a shard stream restarts the epoch's stream (same order)
        and stops after the remaining steps.
        """
        self.transform.set_epoch(epoch if schedule_epoch is None else schedule_epoch, max(self.total_epochs, 1))
        if self.stream is not None:
            self.stream.set_epoch(epoch)
            loader = _make_stream_loader(self.stream, self.cfg, self.device)
        else:
            self.items.epoch = epoch
            self.sampler.epoch, self.sampler.start_batch = epoch, start_batch
            loader = _make_loader(self.items, self.sampler, self.cfg, self.device, self.collate)
        return itertools.islice(loader, max(self.steps_per_epoch - start_batch, 0))

    def device_views(self, batch: Any, epoch: int, index: int) -> tuple[Tensor, Tensor | None, int]:
        """``(globals, locals, skipped)`` on the device; the GPU path decodes and multi-crops here."""
        if self.gpu_augment:
            from excb.data.gpu_augment import augment_batch

            gen = torch.Generator().manual_seed(_augment_seed(self.cfg.seed, self.ctx.rank, epoch, index))
            return augment_batch(batch, self.transform, self.device, gen)
        g = batch.globals.to(self.device, non_blocking=True)
        l = batch.locals.to(self.device, non_blocking=True) if batch.locals is not None else None
        return g, l, batch.skipped

    # -- one optimisation step
    def train_step(self, globals_: Tensor, locals_: Tensor | None, want_metrics: bool) -> dict[str, Tensor]:
        cfg, device = self.cfg, self.device
        sched = _apply_schedules(self.optimizer, cfg, self.step, self.total_steps, self.warmup_steps)
        momentum = schedules.ema_momentum(self.step, self.total_steps, cfg.ema_momentum_start, cfg.ema_momentum_end)
        n_glob, b = globals_.shape[0], globals_.shape[1]
        g = globals_.reshape(n_glob * b, *globals_.shape[2:])
        l = locals_.reshape(locals_.shape[0] * b, *locals_.shape[2:]) if locals_ is not None else None
        if cfg.channels_last and device.type == "cuda":
            g = g.contiguous(memory_format=torch.channels_last)
            l = l.contiguous(memory_format=torch.channels_last) if l is not None else None
        amp = dict(device_type=device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)
        with torch.no_grad(), torch.autocast(**amp):
            z_t = self.teacher_forward(g).float()
        probs, bal_metrics = self.balancer.teacher_probs(z_t, self.balance_gen)
        with torch.autocast(**amp):
            proj_z, pred_z = self.student(g, l)
        tau_s = cfg.balancing.student_temp
        k = proj_z.shape[-1]
        teacher_p = probs.reshape(2, b, k)
        proj_logits = (proj_z.float() / tau_s).reshape(2, b, k)
        pred_logits = (pred_z.float() / tau_s).reshape(-1, b, k)
        loss, loss_metrics = excb_loss(teacher_p, proj_logits, pred_logits)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            _clip_per_parameter(self.trainable, cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        _ema_update([t for t, _ in self.ema_pairs], [s for _, s in self.ema_pairs], momentum)
        self.balancer.update(probs, z_t)
        out: dict[str, Tensor] = {"loss": loss.detach()}
        if want_metrics:
            with torch.no_grad():
                t_lab = probs.argmax(1)
                student_p = torch.cat([proj_z.float(), pred_z.float()]) / tau_s
                st_lab = student_p.argmax(1)
                global_b = all_reduce_sum_int(b, device) if self.ctx.distributed else b
                out.update(loss_metrics)
                out.update(bal_metrics)
                out["confidence_tr"] = probs.max(1).values.mean()
                out["confidence_st"] = torch.softmax(student_p, 1).max(1).values.mean()
                out["unique_labels_tr"] = _global_unique(t_lab) / global_b
                out["unique_labels_st"] = _global_unique(st_lab) / global_b
                out["label_agreement"] = (t_lab[:b] == t_lab[b:]).float().mean()
                for key in ("confidence_tr", "confidence_st", "label_agreement", "acc", "changed_labels"):
                    if key in out and self.ctx.distributed:
                        v = out[key].clone()
                        dist.all_reduce(v)
                        out[key] = v / self.ctx.world_size
            out.update({k2: torch.tensor(v) for k2, v in sched.items()})
            out["ema_momentum"] = torch.tensor(momentum)
        return out


def _step_row(run: Run, tensors: dict[str, Tensor], step_seconds: float, images: int) -> dict[str, Any]:
    row: dict[str, Any] = {"type": "step", "step": run.step, "epoch": run.epoch, "total_steps": run.total_steps,
                           "time": time.time()}
    for k, v in tensors.items():
        row[k] = float(v)
    sizes = stats.balance_stats(run.balancer.sizes, kind="sizes")
    row.update({f"s_{k}": v for k, v in sizes.items() if k not in ("num_clusters", "total")})
    row["teacher_temp"] = run.cfg.balancing.teacher_temp
    row["size_momentum"] = run.cfg.balancing.size_momentum
    row["img_per_s"] = images / max(step_seconds, 1e-9)
    row["skipped_files"] = run.skipped
    row["crop_min_scale"] = run.transform.scale_min
    return row


def _curve_row(run: Run) -> dict[str, Any]:
    """The sorted K*s curve (downsampled for plotting) plus the statistics of the full size estimate."""
    sizes = run.balancer.sizes.cpu()
    curve = stats.sorted_curve(sizes, max_points=256)
    return {"type": "cluster_sizes", "step": run.step, "epoch": run.epoch, "time": time.time(), **curve,
            "balance": stats.balance_stats(sizes, kind="sizes")}


def _epoch_row(run: Run) -> dict[str, Any]:
    counts = run.balancer.cluster_count
    st = stats.balance_stats(counts, kind="counts") if float(counts.sum()) > 0 else {}
    return {"type": "epoch", "step": run.step, "epoch": run.epoch, "time": time.time(),
            "empty_clusters": st.get("empty_fraction"), "cluster_size_max": st.get("max_share"),
            "cluster_size_min": st.get("min_share"), "epoch_entropy": st.get("entropy"),
            "epoch_effective_clusters": st.get("effective_clusters")}


def _knn_row(run: Run) -> dict[str, Any] | None:
    """Online kNN of the teacher on the labelled train/test split of the run's own data (rank 0 only).

    A source without labels (an unlabelled folder) just skips it, with a warning in train.log.
    """
    from excb.evaluation import evaluate, labelled_splits, model_transform

    cfg = run.cfg
    try:
        train_ds, test_ds = labelled_splits(cfg.data.source, model_transform(cfg), cfg.eval.train_limit,
                                            cfg.eval.test_limit)
    except (ValueError, FileNotFoundError) as exc:
        log.warning("online kNN skipped: %s", exc)
        return None
    run.teacher.eval()
    try:
        res = evaluate(run.teacher.features, train_ds, test_ds, k=cfg.eval.knn_k,
                       temperature=cfg.eval.knn_temperature, batch_size=256, device=run.device)
    finally:
        run.teacher.train()
    return {"type": "eval", "step": run.step, "epoch": run.epoch, "time": time.time(),
            "knn_acc": res["knn_acc"], "knn_majority_acc": res["knn_majority_acc"], "knn_k": cfg.eval.knn_k}


def _setup_file_log(run_dir: Path, ctx: DistContext) -> logging.Handler | None:
    if not ctx.is_main:
        return None
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("excb").addHandler(handler)
    logging.getLogger("excb").setLevel(logging.INFO)
    return handler


def train(cfg: TrainConfig, callback: Callback | None = None, should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train (or resume) a run described by ``cfg``; see docs/internals.md for the run-directory layout."""
    cfg = validate(json.loads(cfg.model_dump_json()))  # private, validated copy
    ctx = setup(cfg.device)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _setup_file_log(run_dir, ctx)
    try:
        return _train(cfg, ctx, run_dir, callback, should_stop)
    finally:
        if handler is not None:
            logging.getLogger("excb").removeHandler(handler)
            handler.close()


def _resume_if_any(run: Run, logger: RunLogger) -> bool:
    cfg = run.cfg
    last = checkpoint_dir(run.run_dir) / LAST
    if cfg.resume == "never" or not last.exists():
        if cfg.resume == "must":
            raise FileNotFoundError(f"resume=must but no checkpoint at {last}")
        return False
    ckpt = load_checkpoint(last, map_location=run.device)
    run.restore(ckpt)
    logger.rewind(run.step)
    log.info("resumed from %s at step %d (epoch %d, batch %d)", last, run.step, run.epoch, run.epoch_batch)
    return True


def _plan_config(cfg: TrainConfig, ctx: DistContext, run_dir: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The recipe of this run: the one stored with its checkpoint (a resume trains the same recipe and step
    count), or one fitted now to the data and device (``recipe=auto``; excb/recipe.py)."""
    from excb.recipe import apply, fit_config

    stored = run_dir / PLAN_FILE
    if cfg.resume != "never" and stored.exists() and (checkpoint_dir(run_dir) / LAST).exists():
        plan = json.loads(stored.read_text())
        return apply(cfg, plan.get("choices", {}), plan.get("length", {})), plan
    fitted, recipe = fit_config(cfg, ctx.device, ctx.world_size)
    return fitted, (recipe.to_json() if recipe is not None else {})


def _write_plan(run_dir: Path, ctx: DistContext, cfg: TrainConfig, plan: dict[str, Any]) -> None:
    if ctx.is_main:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        (run_dir / PLAN_FILE).write_text(json.dumps(plan, indent=2))


def _fit_to_budget(run: "Run", plan: dict[str, Any], started: float, logger: RunLogger) -> TrainConfig:
    """Time real steps, then set max_steps (and a fitted recipe's warm-up) so the schedules end with the budget."""
    from excb.budget import calibrate, length_overrides
    from excb.recipe import apply

    cal = calibrate(run.cfg, run, started)
    length = length_overrides(run.cfg, cal.steps, run.steps_per_epoch, fitted=run.cfg.recipe == "fitted")
    plan["length"], plan["calibration"] = length, cal.to_json()
    log.info("budget %s: %.3f s/step measured, %.0f s of set-up -> %d steps", run.cfg.budget, cal.seconds_per_step,
             cal.seconds_before_training, cal.steps)
    logger.emit({"type": "budget", "step": 0, "time": time.time(), **cal.to_json()})
    return apply(run.cfg, {}, length)


def _train(cfg: TrainConfig, ctx: DistContext, run_dir: Path, callback: Callback | None,
           should_stop: Callable[[], bool] | None) -> TrainResult:
    started = time.time()
    _seed_everything(cfg.seed + ctx.rank)  # per-rank seeds (the reference seeds every rank alike, §10.5)
    cfg, plan = _plan_config(cfg, ctx, run_dir)
    _write_plan(run_dir, ctx, cfg, plan)
    run = Run(cfg, ctx)
    logger = RunLogger(run_dir, ctx, callback)
    resumed = _resume_if_any(run, logger)
    if not resumed and cfg.kmeans.enabled and cfg.model.num_clusters > 1:
        km = run.init_centroids()
        logger.emit({"type": "kmeans", "step": 0, "time": time.time(), **km})
    if not resumed and cfg.budget and "length" not in plan:
        run.set_length(_fit_to_budget(run, plan, started, logger))
        _write_plan(run_dir, ctx, run.cfg, plan)
    log.info("run %s: %d steps (%d per epoch), device %s, world %d, precision %s", run_dir, run.total_steps,
             run.steps_per_epoch, ctx.device, ctx.world_size, run.amp_dtype or "fp32")
    if not resumed:
        run.save()
    progress = None
    if ctx.is_main and cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=run.total_steps, initial=run.step, desc="excb train", unit="step", dynamic_ncols=True)
    status = "completed"
    check = None
    if cfg.budget and not resumed:
        from excb.budget import BudgetCheck
        from excb.config import budget_seconds

        check = BudgetCheck(budget_seconds(cfg.budget), started, run.total_steps, run.step, plan)
    try:
        _loop(run, logger, should_stop, progress, check)
    except TrainingInterrupted:
        status = "interrupted"
        raise
    finally:
        if progress is not None:
            progress.close()
        summary = _summary(run, status)
        if ctx.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if ctx.is_main:  # weights for fine-tuning next to the checkpoints (excb.models.load_backbone reads them)
        from excb.models.weights import save_run_backbone

        save_run_backbone(run.teacher, run.cfg, run_dir, run.step)
    logger.emit({"type": "done", "step": run.step, "time": time.time(), "summary": summary})
    return TrainResult(run_dir, run.step, run.epoch, status, summary)


def _correct_length(run: Run, check: Any, logger: RunLogger) -> None:
    """Move the end of a budgeted run once, from the loop's measured pace (excb.budget.BudgetCheck)."""
    from excb.budget import length_overrides
    from excb.recipe import apply

    steps = check.corrected_steps(run.step)
    length = length_overrides(run.cfg, steps, run.steps_per_epoch, fitted=run.cfg.recipe == "fitted")
    log.info("budget check at step %d: %d -> %d steps at the loop's pace", run.step, run.total_steps, steps)
    check.plan["length"] = length
    check.plan["corrected_at_step"] = run.step
    run.set_length(apply(run.cfg, {}, length))
    _write_plan(run.run_dir, run.ctx, run.cfg, check.plan)
    logger.emit({"type": "budget", "step": run.step, "time": time.time(), "steps": steps})


def _loop(run: Run, logger: RunLogger, should_stop: Callable[[], bool] | None, progress: Any,
          check: Any = None) -> None:
    cfg = run.cfg
    while run.step < run.total_steps:
        if run.epoch_batch == 0:
            run.balancer.reset_epoch_counts()
        t_last = time.perf_counter()
        for batch in run.batches(run.epoch, run.epoch_batch):
            if run.step >= run.total_steps:
                break
            g, l, skipped = run.device_views(batch, run.epoch, run.epoch_batch)
            run.skipped += all_reduce_sum_int(skipped, run.device) if run.ctx.distributed else skipped
            want = (run.step + 1) % cfg.log_every_steps == 0 or run.step + 1 == run.total_steps
            tensors = run.train_step(g, l, want)
            images = all_reduce_sum_int(g.shape[1], run.device) if run.ctx.distributed else g.shape[1]
            loss = float(tensors["loss"])
            if not math.isfinite(loss):
                run.save("nan.pt")
                raise NonFiniteLossError(f"loss became {loss} at step {run.step}; state saved to checkpoints/nan.pt")
            run.step += 1
            run.epoch_batch += 1
            run.images_seen += images
            now = time.perf_counter()
            run.wall_time += now - t_last
            if want:
                logger.emit(_step_row(run, tensors, now - t_last, images))
            t_last = now
            if run.step % cfg.histogram_every_steps == 0 or run.step == run.total_steps:
                logger.emit(_curve_row(run))
            if check is not None and check.due(run.step):
                _correct_length(run, check, logger)
                if progress is not None:
                    progress.total = run.total_steps
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.3f}", refresh=False)
            stop = bool(should_stop()) if should_stop is not None else False
            if run.step % cfg.checkpoint_every_steps == 0 or stop:
                path = run.save()
                logger.emit({"type": "checkpoint", "step": run.step, "time": time.time(), "path": str(path)}, persist=False)
            if stop:
                raise TrainingInterrupted(f"stopped at step {run.step}; checkpoint written")
        if run.epoch_batch >= run.steps_per_epoch:
            logger.emit(_epoch_row(run))
            run.epoch += 1
            run.epoch_batch = 0
            every = cfg.eval.knn_every_epochs
            if every and run.epoch % every == 0:
                row = _knn_row(run) if run.ctx.is_main else None
                if row is not None:
                    logger.emit(row)
                barrier()
            if cfg.keep_epoch_checkpoints:
                run.save(f"epoch{run.epoch:04d}.pt")
    path = run.save()
    logger.emit({"type": "checkpoint", "step": run.step, "time": time.time(), "path": str(path)}, persist=False)


def _summary(run: Run, status: str) -> dict[str, Any]:
    return {
        "status": status,
        "steps": run.step,
        "total_steps": run.total_steps,
        "epochs": run.epoch,
        "images_seen": run.images_seen,
        "skipped_files": run.skipped,
        "wall_time_seconds": run.wall_time,
        "world_size": run.ctx.world_size,
        "device": str(run.ctx.device),
        "compiled": run.compiled,
        "balance": stats.balance_stats(run.balancer.sizes, kind="sizes"),
    }
