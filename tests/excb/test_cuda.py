"""The GPU path (issue 16): CUDA step vs CPU step, the tuned bf16 step vs fp32, GPU decode + multi-crop,
a one-process torchrun, export from a CUDA checkpoint, and `excb up` with device=cuda.

All marked ``cuda`` and skipped without a GPU; ``benchmarks/gpu_suite.sh`` runs them with ``pytest -m cuda``.
Tolerances are stated next to each assertion: fp32 CPU vs CUDA differ only by reduction order (TF32 is
switched off here), bf16 keeps ~3 significant digits, nvJPEG's IDCT differs from libjpeg by ~1 grey level.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from excb.config import TrainConfig
from excb.distributed import DistContext
from excb.method.step import ema_update
from excb.training.trainer import Run
from support import HANG_GUARD_S
from support import REPO_ROOT as REPO

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FP32_STEP = ["precision=fp32", "channels_last=false", "optim.fused=false", "data.gpu_augment=off",
             "kmeans.enabled=false"]


def _tiny(tmp: Path, *extra: str) -> TrainConfig:
    from support.training import tiny  # the trainer tests' tiny digits config, so both suites train the same net

    return tiny(tmp, *extra)


@pytest.fixture(autouse=True)
def _no_tf32() -> None:
    """TF32 matmuls would make the fp32 CUDA step differ from the CPU one by ~1e-3; compare true fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _run(cfg: TrainConfig, device: str) -> Run:
    torch.manual_seed(cfg.seed)
    return Run(cfg, DistContext(rank=0, world_size=1, local_rank=0, device=torch.device(device)))


def _copy_state(src: Run, dst: Run) -> None:
    """Same weights, size estimate and balancing generator seed on both runs, whatever device built them."""
    dst.learner.student_core.load_state_dict(src.learner.student_core.state_dict())
    dst.learner.teacher.load_state_dict(src.learner.teacher.state_dict())
    dst.learner.balancer.load_state_dict(src.learner.balancer.state_dict())


def _batch(cfg: TrainConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random crops shaped like the loader's output (globals [2, B, 3, G, G], locals [L, B, 3, l, l]), on the CPU."""
    gen, a, b = torch.Generator().manual_seed(seed), cfg.augment, cfg.batch_size
    g = torch.randn(2, b, 3, a.global_size, a.global_size, generator=gen)
    if not a.num_local_crops:
        return g, None
    return g, torch.randn(a.num_local_crops, b, 3, a.local_size, a.local_size, generator=gen)


def _steps(run: Run, batches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[dict[str, float]]:
    out = []
    for g, l in batches:
        res = run.train_step(g.to(run.device), l.to(run.device) if l is not None else None, want_metrics=True)
        run.step += 1
        out.append({k: float(v) for k, v in res.items()})
    return out


# ------------------------------------------------------------------------------------------- training step
def test_cuda_fp32_step_matches_cpu_step(tmp_path: Path) -> None:
    """Three fp32 steps: loss rel 1e-4, balancer metrics abs 1e-4, size estimate abs 1e-6, weights abs 1e-4."""
    cpu = _run(_tiny(tmp_path / "cpu", "device=cpu", *FP32_STEP), "cpu")
    gpu = _run(_tiny(tmp_path / "gpu", "device=cuda", *FP32_STEP), "cuda")
    _copy_state(cpu, gpu)
    batches = [_batch(cpu.cfg, seed) for seed in range(3)]
    a, b = _steps(cpu, batches), _steps(gpu, batches)
    for row_cpu, row_gpu in zip(a, b):
        assert row_gpu["loss"] == pytest.approx(row_cpu["loss"], rel=1e-4)
        for key in ("changed_labels", "llb_min", "lhb_min", "confidence_tr"):
            assert row_gpu[key] == pytest.approx(row_cpu[key], abs=1e-4), key
    torch.testing.assert_close(gpu.learner.balancer.sizes.cpu(), cpu.learner.balancer.sizes, atol=1e-6, rtol=0)
    for (name, p_cpu), p_gpu in zip(cpu.learner.teacher.state_dict().items(),
                                    gpu.learner.teacher.state_dict().values()):
        if p_cpu.is_floating_point():
            torch.testing.assert_close(p_gpu.cpu(), p_cpu, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_bf16_channels_last_fused_step_matches_fp32(tmp_path: Path, optim: str) -> None:
    """The tuned step (bf16 autocast, channels_last, fused optimizer) vs plain fp32 on the same GPU.

    Tolerance: loss within 5 % per step over three steps, teacher weights after the EMA within 1e-3.
    """
    common = ["device=cuda", "data.gpu_augment=off", "kmeans.enabled=false", f"optim.name={optim}"]
    ref = _run(_tiny(tmp_path / "fp32", *common, "precision=fp32", "channels_last=false", "optim.fused=false"), "cuda")
    fast = _run(_tiny(tmp_path / "bf16", *common, "precision=bf16", "channels_last=true", "optim.fused=true"), "cuda")
    _copy_state(ref, fast)
    assert fast.learner.amp_dtype == torch.bfloat16 and fast.learner.optimizer.defaults.get("fused") is True
    assert any(p.is_contiguous(memory_format=torch.channels_last) and p.dim() == 4
               for p in fast.learner.student_core.parameters())
    batches = [_batch(ref.cfg, seed) for seed in range(3)]
    a, b = _steps(ref, batches), _steps(fast, batches)
    for row_ref, row_fast in zip(a, b):
        assert np.isfinite(row_fast["loss"])
        assert row_fast["loss"] == pytest.approx(row_ref["loss"], rel=5e-2)
    for (name, p_ref), p_fast in zip(ref.learner.teacher.state_dict().items(),
                                     fast.learner.teacher.state_dict().values()):
        if p_ref.is_floating_point():
            torch.testing.assert_close(p_fast.float(), p_ref.float(), atol=1e-3, rtol=1e-2, msg=name)


def test_foreach_ema_on_cuda_equals_the_per_parameter_loop() -> None:
    """``_foreach_lerp_`` over all parameters == the reference's loop, to fp32 rounding (abs 1e-6)."""
    gen = torch.Generator().manual_seed(0)
    teacher = [torch.randn(64, 32, generator=gen).cuda() for _ in range(5)]
    student = [torch.randn(64, 32, generator=gen).cuda() for _ in range(5)]
    expected = [t.clone().mul_(0.996).add_(s, alpha=1 - 0.996) for t, s in zip(teacher, student)]
    ema_update(teacher, student, 0.996)
    for t, e in zip(teacher, expected):
        torch.testing.assert_close(t, e, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------- data
def _photo_jpeg(seed: int, h: int, w: int) -> bytes:
    """Smooth colours + mild noise: JPEG-friendly like a photo, so decoders agree to ~1 grey level."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([127 + 90 * np.sin(rng.uniform(0.01, 0.05) * xx + rng.uniform(0.01, 0.05) * yy + c)
                     for c in range(3)], -1)
    arr = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", quality=90)
    return out.getvalue()


def test_gpu_decode_and_multicrop_match_the_cpu_path() -> None:
    """nvJPEG vs libjpeg: mean abs difference < 1.5 grey levels; the device multi-crop of the same pixels with
    the same generator equals the CPU-tensor one to 2e-3 (normalised units); per-channel view statistics of
    the device path match ``MultiCropTransform`` (the CPU DataLoader path) within 4 standard errors."""
    from excb.config import AugmentConfig
    from excb.data import gpu_augment as G
    from excb.data.augment import MultiCropTransform

    blobs = [_photo_jpeg(i, 375, 500) for i in range(8)] + [_photo_jpeg(9, 333, 250)]
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    on_gpu, bad_gpu = G.decode_jpegs(data, "cuda")
    on_cpu, bad_cpu = G.decode_jpegs(data, "cpu")
    assert bad_gpu == bad_cpu == 0 and all(x.is_cuda for x in on_gpu)
    for x, y in zip(on_gpu, on_cpu):
        assert x.shape == y.shape
        assert (x.cpu().float() - y.float()).abs().mean() < 1.5
    aug = AugmentConfig(global_size=64, local_size=32, num_local_crops=4)
    crops = G.GpuMultiCrop(aug)
    g_dev, l_dev = crops(on_cpu, torch.Generator().manual_seed(3), "cuda")
    g_cpu, l_cpu = crops(on_cpu, torch.Generator().manual_seed(3), "cpu")
    assert g_dev.is_cuda and g_dev.shape == (2, 9, 3, 64, 64) and l_dev.shape == (4, 9, 3, 32, 32)
    torch.testing.assert_close(g_dev.cpu(), g_cpu, atol=2e-3, rtol=0)
    torch.testing.assert_close(l_dev.cpu(), l_cpu, atol=2e-3, rtol=0)
    n = 96
    image = on_cpu[0]
    torch.manual_seed(0)
    cpu_tf = MultiCropTransform(aug)
    cpu_views = torch.stack([cpu_tf(Image.fromarray(image.permute(1, 2, 0).numpy()))[0][0] for _ in range(n)])
    dev_views = crops([image.cuda()] * n, torch.Generator().manual_seed(1), "cuda")[0][0].cpu()
    cm, gm = cpu_views.mean((2, 3)).numpy(), dev_views.mean((2, 3)).numpy()
    for c in range(3):
        se = np.sqrt((cm[:, c].var() + gm[:, c].var()) / n)
        assert abs(cm[:, c].mean() - gm[:, c].mean()) < 4 * se, c


# -------------------------------------------------------------------------------------- torchrun + export
def test_torchrun_one_process_nccl_trains_and_checkpoints(tmp_path: Path) -> None:
    """torchrun, one process: NCCL process group (gloo if NCCL is missing), an all-reduce, 4 steps, a checkpoint."""
    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist
        sys.path.insert(0, {str(REPO / 'tests')!r})
        backend = "nccl" if dist.is_nccl_available() else "gloo"
        torch.cuda.set_device(0)
        dist.init_process_group(backend)
        t = torch.ones(1, device="cuda" if backend == "nccl" else "cpu")
        dist.all_reduce(t)
        assert float(t) == 1.0
        from pathlib import Path
        from support.training import tiny
        from excb.training.trainer import train
        res = train(tiny(Path(sys.argv[1]), "device=cuda", "max_steps=4"))
        print("backend", backend, "steps", res.steps, "status", res.status)
        dist.destroy_process_group()
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(script), str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=HANG_GUARD_S, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "steps 4 status completed" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_export_from_a_cuda_checkpoint_passes_parity(tmp_path: Path) -> None:
    """A CUDA-trained checkpoint (bf16, channels_last, fused) loads on the CPU, exports and passes parity."""
    from excb.inference.export import export_bundle
    from excb.training.trainer import train

    result = train(_tiny(tmp_path / "run", "device=cuda", "precision=bf16", "channels_last=true", "max_steps=4"))
    assert result.summary["device"].startswith("cuda")
    meta = export_bundle(tmp_path / "run", tmp_path / "bundle", parity_count=32)
    assert meta["parity"]["passed"], meta["parity"]


# ---------------------------------------------------------------------------------------------- excb up
def test_excb_up_digits_job_on_cuda_embeds(tmp_path: Path) -> None:
    """`excb up` + `excb jobs submit` with device=cuda: the job succeeds and GET /embed answers with its model."""
    pytest.importorskip("fastapi")
    pytest.importorskip("celery")
    pytest.importorskip("pydantic_settings")
    import httpx
    import yaml

    from support.live import excb_up, tail, wait_embed
    from support.services import tiny_job

    with excb_up(tmp_path, EXCB_EMBED__RESCAN_SECONDS="1") as up:
        base, env = up.base, up.env
        job_file = tmp_path / "job.yaml"
        job_file.write_text(yaml.safe_dump(tiny_job(max_steps=8, device="cuda")))
        sub = subprocess.run([sys.executable, "-m", "excb.cli", "jobs", "--url", base, "submit", str(job_file),
                              "--follow"], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert sub.returncode == 0 and "SUCCEEDED" in sub.stdout, sub.stdout[-3000:] + tail(up.log)
        job = httpx.get(f"{base}/v1/jobs/{sub.stdout.split()[1]}").json()
        assert job["config"]["device"] == "cuda"
        body = wait_embed(base, job["model_id"]).json()
        assert len(body["data"]) == 1 and len(body["data"][0]["embedding"]) > 0
