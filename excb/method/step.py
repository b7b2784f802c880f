"""Owns one ExCB optimisation step: student, teacher (EMA), balancer, loss, optimizer and the step metrics.

The trainer's loop only says *when* to step; this module says *what* a step is (dinov2's ``SSLMetaArch``
plays the same role). ``excb.training.budget`` times it, ``benchmarks/train_throughput.py`` measures it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Callable, Iterable, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from excb.config import COMPILE_MIN_STEPS, TrainConfig
from excb.distributed import DistContext, all_gather_cat, all_reduce_sum_int
from excb.method import schedules, stats
from excb.method.balancing import Balancer
from excb.method.kmeans import spherical_kmeans
from excb.method.loss import excb_loss
from excb.models import build_model
from excb.models.model import ExCBModel
from excb.seeds import derive_seed

log = logging.getLogger("excb.trainer")

RANK_MEAN_METRICS = ("confidence_tr", "confidence_st", "label_agreement", "acc", "changed_labels")


def compile_decision(cfg: TrainConfig, device: torch.device, total_steps: int) -> tuple[bool, str]:
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


def precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32): ``auto`` is bf16 on CUDA, fp32 elsewhere."""
    p = cfg.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def build_optimizer(cfg: TrainConfig, groups: dict[str, list[nn.Parameter]],
                    device: torch.device) -> torch.optim.Optimizer:
    """Named parameter groups (the schedules set lr/wd per group); fused kernels on CUDA."""
    wd = cfg.optim.weight_decay
    decayed = {"backbone": wd, "backbone_noreg": 0.0, "projector": wd, "projector_noreg": 0.0, "centroids": wd}
    spec = [{"name": name, "params": groups[name], "weight_decay": w, "base_wd": w}
            for name, w in decayed.items() if groups[name]]
    fused = cfg.optim.fused if cfg.optim.fused is not None else device.type == "cuda"
    kwargs: dict[str, Any] = {"lr": cfg.optim.lr, ("fused" if fused else "foreach"): True}
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(spec, momentum=cfg.optim.momentum, **kwargs)
    return torch.optim.AdamW(spec, betas=cfg.optim.betas, **kwargs)


def apply_schedules(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int, total: int,
                    warmup: int) -> dict[str, float]:
    """Set this step's learning rate and weight decays on every group; returns them for the metrics."""
    lr = schedules.learning_rate(step, total, cfg.optim.lr, warmup, cfg.optim.lr_min_factor)
    wd = schedules.weight_decay(step, total, cfg.optim.weight_decay, cfg.optim.weight_decay_end_factor)
    cfac = schedules.centroid_wd_factor(step, total, cfg.optim.centroid_wd_start_factor)
    for g in opt.param_groups:
        g["lr"] = lr
        if g["base_wd"] > 0:
            g["weight_decay"] = wd * (cfac if g["name"] == "centroids" else 1.0)
    return {"lr": lr, "wd": wd, "wd_centroid": wd * cfac}


def clip_per_parameter(params: list[nn.Parameter], max_norm: float) -> None:
    """DINO-style clipping: each parameter's gradient norm is capped on its own (not a global norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)


@torch.no_grad()
def ema_update(teacher_params: list[Tensor], student_params: list[Tensor], momentum: float) -> None:
    """teacher <- m*teacher + (1-m)*student, one fused ``_foreach`` call over all parameters."""
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


def _global_unique(labels: Tensor) -> Tensor:
    return torch.unique(all_gather_cat(labels)).numel() * torch.ones((), device=labels.device)


def _flatten_views(views: Tensor, channels_last: bool) -> Tensor:
    """[V, B, C, H, W] -> [V*B, C, H, W] (view-major, as the loss pairs them)."""
    x = views.reshape(views.shape[0] * views.shape[1], *views.shape[2:])
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class ExCBStep:
    """Student, EMA teacher, balancer, optimizer and loss of one run; calling it does one optimisation step.

    ``student`` may be wrapped (DDP, ``torch.compile``); ``student_core`` and ``teacher`` are the plain
    modules that checkpoints and the EMA use.
    """

    def __init__(self, cfg: TrainConfig, ctx: DistContext, total_steps: int) -> None:
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.channels_last = cfg.channels_last  # NHWC: faster convolutions on CUDA and on oneDNN CPUs
        self.student_core, self.teacher = self._build_pair()
        groups = self.student_core.param_groups()
        self.optimizer = build_optimizer(cfg, groups, self.device)
        self.trainable = [p for g in groups.values() for p in g]
        # what a step calls: the student, or its DDP / torch.compile wrapper
        self.student: Callable[..., tuple[Tensor, Tensor]] = self.student_core
        if ctx.distributed:
            ddp_ids = [self.device.index] if self.device.type == "cuda" else None
            self.student = nn.parallel.DistributedDataParallel(self.student_core, device_ids=ddp_ids)
        self.teacher_forward: Callable[[Tensor], Tensor] = self.teacher.forward_teacher
        self.compiled, why = compile_decision(cfg, self.device, total_steps)
        log.info("torch.compile: %s (%s)", "on" if self.compiled else "off", why)
        if self.compiled:  # after DDP, as torch recommends; state_dict()/EMA keep using the uncompiled modules
            self.student = torch.compile(self.student)
            self.teacher_forward = torch.compile(self.teacher.forward_teacher)
        sp = dict(self.student_core.named_parameters())
        self.ema_pairs = [(tp, sp[n]) for n, tp in self.teacher.named_parameters() if n in sp]
        b = cfg.balancing
        self.balancer = Balancer(cfg.model.num_clusters, b.method, b.mode, b.size_momentum, b.teacher_temp,
                                 b.center_momentum).to(self.device)
        self.balance_gen = torch.Generator(device=self.device).manual_seed(derive_seed(cfg.seed, "balance", ctx.rank))
        self.amp_dtype = precision(cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _build_pair(self) -> tuple[ExCBModel, ExCBModel]:
        """Student and a frozen teacher starting from the student's weights (SyncBN / channels-last applied)."""
        student = build_model(self.cfg).to(self.device)
        teacher = build_model(self.cfg, teacher=True).to(self.device)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        if self.ctx.distributed and self.cfg.model.sync_bn:
            # cast: the root is an ExCBModel, not a BatchNorm, so the module comes back converted in place
            student = cast(ExCBModel, nn.SyncBatchNorm.convert_sync_batchnorm(student))
            teacher = cast(ExCBModel, nn.SyncBatchNorm.convert_sync_batchnorm(teacher))
        if self.channels_last:
            student = student.to(memory_format=torch.channels_last)
            teacher = teacher.to(memory_format=torch.channels_last)
        return student, teacher

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    # -- state
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's model part (keys student, teacher, optimizer, scaler, balancer)."""
        return {"student": self.student_core.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "balancer": self.balancer.state_dict()}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.student_core.load_state_dict(ckpt["student"])
        self.teacher.load_state_dict(ckpt["teacher"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.balancer.load_state_dict(ckpt["balancer"])

    # -- the step
    def __call__(self, globals_: Tensor, locals_: Tensor | None, step: int, total_steps: int, warmup_steps: int,
                 want_metrics: bool) -> dict[str, Tensor]:
        """One step at schedule position ``step``: teacher targets, student loss, optimizer, EMA, size update."""
        cfg = self.cfg
        sched = apply_schedules(self.optimizer, cfg, step, total_steps, warmup_steps)
        momentum = schedules.ema_momentum(step, total_steps, cfg.ema_momentum_start, cfg.ema_momentum_end)
        b = globals_.shape[1]
        g = _flatten_views(globals_, self.channels_last)
        l = None if locals_ is None else _flatten_views(locals_, self.channels_last)
        with torch.no_grad(), self.autocast():
            z_t = self.teacher_forward(g).float()
        probs, bal_metrics = self.balancer.teacher_probs(z_t, self.balance_gen)
        with self.autocast():
            proj_z, pred_z = self.student(g, l)
        tau_s = cfg.balancing.student_temp
        k = proj_z.shape[-1]
        loss, loss_metrics = excb_loss(probs.reshape(2, b, k), (proj_z.float() / tau_s).reshape(2, b, k),
                                       (pred_z.float() / tau_s).reshape(-1, b, k))
        self._optimize(loss)
        self.update_teacher(momentum)
        self.balancer.update(probs, z_t)
        out: dict[str, Tensor] = {"loss": loss.detach()}
        if want_metrics:
            out.update(loss_metrics)
            out.update(bal_metrics)
            out.update(self._label_metrics(probs, torch.cat([proj_z.float(), pred_z.float()]) / tau_s, b))
            self._mean_over_ranks(out)
            out.update({k2: torch.tensor(v) for k2, v in sched.items()})
            out["ema_momentum"] = torch.tensor(momentum)
        return out

    def _optimize(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            clip_per_parameter(self.trainable, self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def update_teacher(self, momentum: float) -> None:
        """EMA of the student into the teacher (the teacher never gets gradients)."""
        ema_update([t for t, _ in self.ema_pairs], [s for _, s in self.ema_pairs], momentum)

    @torch.no_grad()
    def _label_metrics(self, probs: Tensor, student_logits: Tensor, b: int) -> dict[str, Tensor]:
        """Confidence, label diversity and view agreement of teacher and student, averaged over ranks."""
        t_lab, st_lab = probs.argmax(1), student_logits.argmax(1)
        global_b = all_reduce_sum_int(b, self.device) if self.ctx.distributed else b
        return {"confidence_tr": probs.max(1).values.mean(),
               "confidence_st": torch.softmax(student_logits, 1).max(1).values.mean(),
               "unique_labels_tr": _global_unique(t_lab) / global_b,
               "unique_labels_st": _global_unique(st_lab) / global_b,
               "label_agreement": (t_lab[:b] == t_lab[b:]).float().mean()}

    @torch.no_grad()
    def _mean_over_ranks(self, out: dict[str, Tensor]) -> None:
        """Per-rank averages of the metrics that are means (the others are already global)."""
        if not self.ctx.distributed:
            return
        for key in RANK_MEAN_METRICS:
            if key in out:
                v = out[key].clone()
                dist.all_reduce(v)
                out[key] = v / self.ctx.world_size

    # -- k-means centroid initialisation (method.md §4.9)
    @torch.no_grad()
    def init_centroids(self, views: Iterable[Tensor]) -> dict[str, float]:
        """Spherical k-means on the teacher's projections of ``views`` (this rank's share of the samples)."""
        cfg = self.cfg
        want = max(cfg.kmeans.samples // self.ctx.world_size, 1)
        feats: list[Tensor] = []
        have, started = 0, time.time()
        for x in views:
            with self.autocast():
                feats.append(self.teacher.project(x).float())
            have += x.shape[0]
            if have >= want:
                break
        x = torch.cat(feats)[:want]
        gen = torch.Generator(device=x.device).manual_seed(cfg.seed)
        result = spherical_kmeans(x, cfg.model.num_clusters, iterations=cfg.kmeans.iterations, generator=gen,
                                  chunk_size=cfg.kmeans.chunk_size)
        self.teacher.centroids.set_centroids(result.centroids)
        self.student_core.centroids.set_centroids(result.means)
        return {"kmeans_seconds": time.time() - started, "kmeans_samples": float(x.shape[0] * self.ctx.world_size),
                "kmeans_empty_reseeded": float(result.empty_reseeded),
                "kmeans_effective_clusters": stats.balance_stats(result.counts.float())["effective_clusters"]}

    # -- balance statistics for the metric rows
    def size_metrics(self) -> dict[str, Any]:
        """Statistics of the size estimate ``s`` and the balancing settings, for every logged step."""
        sizes = stats.balance_stats(self.balancer.sizes, kind="sizes")
        out: dict[str, Any] = {f"s_{k}": v for k, v in sizes.items() if k not in ("num_clusters", "total")}
        out["teacher_temp"] = self.cfg.balancing.teacher_temp
        out["size_momentum"] = self.cfg.balancing.size_momentum
        return out

    def size_curve(self) -> dict[str, Any]:
        """The sorted K*s curve (downsampled for plotting) plus the statistics of the full size estimate."""
        sizes = self.balancer.sizes.cpu()
        return {**stats.sorted_curve(sizes, max_points=256), "balance": stats.balance_stats(sizes, kind="sizes")}

    def epoch_balance(self) -> dict[str, Any]:
        """How evenly the epoch's teacher labels filled the clusters."""
        counts = self.balancer.cluster_count
        st = stats.balance_stats(counts, kind="counts") if float(counts.sum()) > 0 else {}
        return {"empty_clusters": st.get("empty_fraction"), "cluster_size_max": st.get("max_share"),
                "cluster_size_min": st.get("min_share"), "epoch_entropy": st.get("entropy"),
                "epoch_effective_clusters": st.get("effective_clusters")}
