"""The GPU multi-crop, run on CPU tensors: same parameter distributions and pixel ops as the CPU path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from excb.config import AugmentConfig
from excb.data import gpu_augment as G
from excb.data.augment import MultiCropTransform, blur_kernel_size, effective_blur_probs
from excb.data.shards import RawSample
from support import HANG_GUARD_S, REPO_ROOT

torch.set_num_threads(1)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def _aug(**kw) -> AugmentConfig:
    base = dict(global_size=24, local_size=12, num_local_crops=3)
    return AugmentConfig(**{**base, **kw})


@pytest.mark.parametrize("hw", [(40, 50), (375, 500), (12, 120)])  # the last one exercises the fallback crop
@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.26)])
def test_crop_boxes_match_torchvision(hw: tuple[int, int], scale: tuple[float, float]) -> None:
    n = 3000
    torch.manual_seed(0)
    cpu = v2.RandomResizedCrop(16, scale=scale)
    ref = [cpu.make_params([torch.zeros(1, *hw)]) for _ in range(n)]
    boxes = G.sample_crop_boxes(torch.tensor([hw] * n), scale, torch.Generator().manual_seed(1))
    top, left, h, w = boxes.T.numpy()
    assert (h >= 1).all() and (w >= 1).all() and (top + h <= hw[0]).all() and (left + w <= hw[1]).all()
    area = hw[0] * hw[1]
    for name, mine, theirs in [
        ("scale", h * w / area, np.array([r["height"] * r["width"] / area for r in ref])),
        ("aspect", w / h, np.array([r["width"] / r["height"] for r in ref])),
        ("centre_y", top + h / 2, np.array([r["top"] + r["height"] / 2 for r in ref])),
        ("centre_x", left + w / 2, np.array([r["left"] + r["width"] / 2 for r in ref])),
    ]:
        assert _ks(mine, theirs) < 0.05, name


def test_view_parameter_rates_and_ranges_match_the_cpu_path() -> None:
    aug = _aug(solarize_p=0.2)
    cpu = MultiCropTransform(aug)
    gpu = G.GpuMultiCrop(aug)
    gen = torch.Generator().manual_seed(0)
    b = 4000
    sizes = torch.tensor([[40, 48]] * b)
    gp, lp = gpu.global_params(sizes, gen), gpu.local_params(sizes, gen)
    flip, jitter, gray = cpu.global_views[0].pil_ops.transforms[1:4]
    color = jitter.transforms[0]
    assert abs(gp.flip.float().mean() - flip.p) < 0.02 and abs(lp.flip.float().mean() - flip.p) < 0.02
    assert abs(gp.jitter.float().mean() - jitter.p) < 0.02 and abs(gp.gray.float().mean() - gray.p) < 0.02
    ref = [color.make_params([torch.zeros(3, 2, 2)]) for _ in range(3000)]
    names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
    bounds = (color.brightness, color.contrast, color.saturation, color.hue)
    for k, (name, (lo, hi)) in enumerate(zip(names, bounds)):
        mine = gp.factors[:, k].numpy()
        assert lo - 1e-6 <= mine.min() and mine.max() <= hi + 1e-6, name
        assert mine.min() < lo + 0.02 * (hi - lo) and mine.max() > hi - 0.02 * (hi - lo), name
        assert _ks(mine, np.array([r[name] for r in ref])) < 0.05, name
    # each sample's op order is a uniform random permutation, like torch.randperm(4) in ColorJitter
    assert all(sorted(row) == [0, 1, 2, 3] for row in gp.order[:50].tolist())
    first = np.bincount(gp.order[:, 0].numpy(), minlength=4) / len(gp.order)
    assert np.abs(first - 0.25).max() < 0.02
    # blur and solarize per view (view-major: first b rows are global 1)
    probs = effective_blur_probs(aug)
    assert abs(gp.blur[:b].float().mean() - probs[0]) < 0.02 and abs(gp.blur[b:].float().mean() - probs[1]) < 0.02
    assert abs(lp.blur.float().mean() - probs[2]) < 0.02
    assert not gp.solarize[:b].any() and abs(gp.solarize[b:].float().mean() - 0.2) < 0.02 and not lp.solarize.any()
    assert 0.1 <= gp.sigma.min() and gp.sigma.max() <= 2.0
    assert abs(cpu.global_views[1].blur.p - probs[1]) < 1e-9


def test_reference_parity_blur_probabilities() -> None:
    gpu = G.GpuMultiCrop(_aug(blur_reference_parity=True))
    gp = gpu.global_params(torch.tensor([[20, 20]] * 2000), torch.Generator().manual_seed(0))
    assert not gp.blur[:2000].any() and abs(gp.blur[2000:].float().mean() - 0.9) < 0.03
    assert not gpu.local_params(torch.tensor([[20, 20]] * 100), torch.Generator()).blur.any()


def test_crop_scale_schedule_is_the_cpu_one() -> None:
    aug = _aug()
    cpu, gpu = MultiCropTransform(aug), G.GpuMultiCrop(aug)
    for epoch in (0, 3, 10):
        assert cpu.set_epoch(epoch, 10) == gpu.set_epoch(epoch, 10)
        assert cpu.global_scale == gpu.global_scale and cpu.local_scale == gpu.local_scale
    sizes = torch.tensor([[64, 64]] * 2000)
    gp = gpu.global_params(sizes, torch.Generator().manual_seed(0))
    frac = (gp.boxes[:, 2] * gp.boxes[:, 3]).float() / 64 ** 2
    assert frac.min() >= 0.14 - 0.01 and frac.min() < 0.16


@pytest.mark.parametrize("op,ref", [(G.adjust_brightness, F.adjust_brightness), (G.adjust_contrast, F.adjust_contrast),
                                    (G.adjust_saturation, F.adjust_saturation)])
def test_jitter_ops_equal_torchvision(op, ref) -> None:
    x = torch.rand(6, 3, 11, 13, generator=torch.Generator().manual_seed(0))
    f = torch.linspace(0.0, 1.8, 6)
    out = op(x, f)
    for i in range(6):
        torch.testing.assert_close(out[i], ref(x[i], float(f[i])), atol=1e-5, rtol=0)


def test_colour_jitter_skips_only_what_is_the_identity_on_grey_images() -> None:
    """Saturation and hue are skipped for grey samples (they change nothing there, < 1e-4 from torchvision's
    0.9999 luma sum), never for colour ones; a mixed batch gives each sample what the full jitter gives it."""
    gen = torch.Generator().manual_seed(3)
    grey = torch.rand(5, 1, 9, 9, generator=gen).expand(5, 3, 9, 9).clone()
    colour = torch.rand(5, 3, 9, 9, generator=gen)
    x = torch.cat([grey, colour])
    assert G.grey_samples(x).tolist() == [True] * 5 + [False] * 5
    apply = torch.ones(10, dtype=torch.bool)
    factors = torch.tensor([[1.3, 0.7, 1.6, 0.3]] * 10)
    order = torch.stack([torch.randperm(4, generator=gen) for _ in range(10)])
    out = G.color_jitter(x, apply, factors, order)
    full = x.clone()
    for i in range(10):
        for op in order[i].tolist():
            full[i:i + 1] = G._JITTER_OPS[op](full[i:i + 1], factors[i:i + 1, op])
    torch.testing.assert_close(out[5:], full[5:], atol=1e-6, rtol=0)  # colour: every op, exactly as before
    torch.testing.assert_close(out[:5], full[:5], atol=1e-4, rtol=0)  # grey: the same image
    assert G.grey_samples(out[:5]).all()


def test_hue_grayscale_blur_solarize_equal_torchvision() -> None:
    x = torch.rand(6, 3, 15, 17, generator=torch.Generator().manual_seed(1))
    hue = torch.linspace(-0.5, 0.5, 6)
    sig = torch.linspace(0.1, 2.0, 6)
    out_h, out_b = G.adjust_hue(x, hue), G.gaussian_blur(x, sig, 9)
    for i in range(6):
        torch.testing.assert_close(out_h[i], F.adjust_hue(x[i], float(hue[i])), atol=1e-5, rtol=0)
        torch.testing.assert_close(out_b[i], F.gaussian_blur(x[i], [9, 9], [float(sig[i])] * 2), atol=1e-5, rtol=0)
    # grayscale: PIL's "L" (integer ITU-R 601 luma) within rounding, and grey stays exactly grey
    pil_l = torch.stack([F.pil_to_tensor(F.to_pil_image(x[i]).convert("L")) for i in range(6)]).float() / 255
    u8_grey = torch.stack([F.pil_to_tensor(F.to_pil_image(x[i])) for i in range(6)]).float() / 255
    torch.testing.assert_close(G.grayscale(u8_grey), pil_l, atol=1.01 / 255, rtol=0)
    grey = torch.full((2, 3, 4, 4), 100 / 255)
    torch.testing.assert_close(G.grayscale(grey), grey[:, :1], atol=1e-6, rtol=0)
    u8 = (x * 255).round().to(torch.uint8)
    out = G.apply_view_ops(u8.float() / 255, _only_solarize([True, False] * 3), 3, (0.0,) * 3, (1.0,) * 3)
    for i in range(6):
        expect = (F.solarize(u8[i], 128) if i % 2 == 0 else u8[i]).float() / 255
        torch.testing.assert_close(out[i], expect, atol=1e-6, rtol=0)
    assert blur_kernel_size(24) == 3 and blur_kernel_size(224) == 9


def _only_solarize(mask: list[bool]) -> G.ViewParams:
    n = len(mask)
    off = torch.zeros(n, dtype=torch.bool)
    return G.ViewParams(boxes=torch.zeros(n, 4), flip=off, jitter=off, factors=torch.ones(n, 4),
                        order=torch.arange(4).repeat(n, 1), gray=off, blur=off, sigma=torch.ones(n),
                        solarize=torch.tensor(mask))


def test_crop_resize_close_to_antialiased_resize() -> None:
    yy, xx = torch.meshgrid(torch.arange(60.0), torch.arange(80.0), indexing="ij")
    img = (0.5 + 0.5 * torch.sin(yy / 5) * torch.cos(xx / 7)).expand(1, 3, 60, 80).contiguous()
    boxes = torch.tensor([[0, 0, 60, 80], [5, 10, 40, 30], [20, 20, 10, 12]])
    out = G.crop_resize(img, torch.zeros(3, dtype=torch.long), boxes, 24)
    for k, (t, l, h, w) in enumerate(boxes.tolist()):
        ref = F.resized_crop(img[0], t, l, h, w, [24, 24], antialias=True)
        assert (out[k] - ref).abs().mean() < 0.02


def _halves_image(size: int = 32) -> torch.Tensor:
    """Left half red, right half blue: flips and grayscale are visible in the output."""
    x = torch.zeros(3, size, size, dtype=torch.uint8)
    x[0, :, : size // 2] = 220
    x[2, :, size // 2:] = 220
    return x


def _flip_and_gray_rates(views: torch.Tensor, aug: AugmentConfig) -> tuple[float, float]:
    mean = torch.tensor(aug.mean).view(1, 3, 1, 1)
    std = torch.tensor(aug.std).view(1, 3, 1, 1)
    x = views * std + mean
    half = x.shape[-1] // 2
    left_red = x[:, 0, :, :half].mean((1, 2)) > x[:, 0, :, half:].mean((1, 2))
    gray = (x.amax(1) - x.amin(1)).amax((1, 2)) < 0.02
    colour = ~gray
    return float((~left_red[colour]).float().mean()), float(gray.float().mean())


def test_end_to_end_flip_gray_and_pixel_statistics_match_the_cpu_path() -> None:
    aug = _aug(global_scale_min_start=1.0, global_scale_min_end=1.0, num_local_crops=0, solarize_p=0.0,
               blur_p=(0.0, 0.0, 0.0))
    image = _halves_image()
    n = 600
    torch.manual_seed(0)
    cpu = MultiCropTransform(aug)
    cpu_views = torch.stack([cpu(image)[0][0] for _ in range(n)])
    g, l = G.GpuMultiCrop(aug)([image] * n, torch.Generator().manual_seed(0))
    assert g.shape == (2, n, 3, 24, 24) and l is None and g.dtype == torch.float32
    gpu_views = g[0]
    (cpu_flip, cpu_gray), (gpu_flip, gpu_gray) = (_flip_and_gray_rates(v, aug) for v in (cpu_views, gpu_views))
    assert abs(cpu_flip - 0.5) < 0.07 and abs(gpu_flip - 0.5) < 0.07
    assert abs(cpu_gray - 0.2) < 0.05 and abs(gpu_gray - 0.2) < 0.05
    # jitter spreads per-view channel means alike on both paths (means within 4 standard errors, similar spread)
    cm, gm = cpu_views.mean((2, 3)).numpy(), gpu_views.mean((2, 3)).numpy()
    for c in range(3):
        se = np.sqrt((cm[:, c].var() + gm[:, c].var()) / n)
        assert abs(cm[:, c].mean() - gm[:, c].mean()) < 4 * se, c
        assert 0.85 < gm[:, c].std() / cm[:, c].std() < 1.15, c


def test_full_multicrop_on_mixed_sizes_and_grey() -> None:
    aug = _aug(blur_p=(1.0, 1.0, 1.0), solarize_p=1.0)
    rng = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 30, 41), dtype=torch.uint8, generator=rng),
              torch.randint(0, 256, (1, 17, 19), dtype=torch.uint8, generator=rng),
              torch.randint(0, 256, (3, 64, 20), dtype=torch.uint8, generator=rng)]
    crops = G.GpuMultiCrop(aug)
    g1, l1 = crops(images, torch.Generator().manual_seed(5))
    g2, l2 = crops(images, torch.Generator().manual_seed(5))
    assert g1.shape == (2, 3, 3, 24, 24) and l1.shape == (3, 3, 3, 12, 12)
    assert torch.isfinite(g1).all() and torch.isfinite(l1).all()
    assert torch.equal(g1, g2) and torch.equal(l1, l2)  # a pure function of the generator
    lo = (0 - torch.tensor(aug.mean)) / torch.tensor(aug.std)
    hi = (1 - torch.tensor(aug.mean)) / torch.tensor(aug.std)
    per_c = g1.transpose(0, 2).reshape(3, -1)
    assert (per_c.min(1).values >= lo - 1e-4).all() and (per_c.max(1).values <= hi + 1e-4).all()


def _jpeg(seed: int, h: int, w: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(a).save(out, format="JPEG", quality=95)
    return out.getvalue()


def test_batched_decode_and_collate_skip_bad_samples() -> None:
    blobs = [_jpeg(0, 20, 30), b"\xff\xd8not a jpeg at all", _jpeg(1, 33, 17)]
    samples = [RawSample(i, torch.frombuffer(bytearray(b), dtype=torch.uint8), i) for i, b in enumerate(blobs)]
    batch = G.collate_raw(samples + [None, RawSample(9, torch.empty(0, dtype=torch.uint8), 0)])
    assert batch.encoded and batch.size == 3 and batch.skipped == 2
    images, bad = G.decode_jpegs(batch.images, "cpu")
    assert bad == 1 and [tuple(x.shape) for x in images] == [(3, 20, 30), (3, 33, 17)]
    pil = np.asarray(Image.open(io.BytesIO(blobs[0])).convert("RGB")).transpose(2, 0, 1).astype(np.int16)
    assert np.abs(images[0].numpy().astype(np.int16) - pil).mean() < 2.0  # libjpeg vs PIL's libjpeg: ~equal
    g, l, skipped = G.augment_batch(batch, G.GpuMultiCrop(_aug()), "cpu", torch.Generator().manual_seed(0))
    assert skipped == 3 and g.shape == (2, 2, 3, 24, 24) and l.shape == (3, 2, 3, 12, 12)


def test_map_style_items_collate_to_pixels() -> None:
    to_tensor = G.ToUint8Tensor()
    grey = to_tensor(Image.fromarray(np.zeros((8, 9), np.uint8), mode="L"))
    rgb = to_tensor(Image.fromarray(np.zeros((5, 7, 3), np.uint8)))
    batch = G.collate_raw([(grey, 3), (rgb, 1), None])
    assert not batch.encoded and batch.skipped == 1 and batch.labels.tolist() == [3, 1]
    assert grey.shape == (1, 8, 9) and rgb.shape == (3, 5, 7)


def test_large_images_are_shrunk_in_the_loader() -> None:
    """A 12 MP photo does not travel to the augmenter at 12 MP: the long side is capped, aspect and mean kept."""
    to_tensor = G.ToUint8Tensor(max_side=112)
    photo = Image.fromarray(np.full((3000, 4000, 3), 90, np.uint8))
    x = to_tensor(photo)
    assert x.shape == (3, 84, 112) and set(x.unique().tolist()) == {90}
    assert photo.size == (4000, 3000)  # the caller's image is left alone
    assert to_tensor(Image.fromarray(np.zeros((20, 30), np.uint8), mode="L")).shape == (1, 20, 30)


def test_data_throughput_benchmark_quick(tmp_path) -> None:
    """benchmarks/data_throughput.py --quick: both multi-crop paths and both end-to-end figures are reported."""
    import json
    import os
    import subprocess
    import sys

    script = REPO_ROOT / "benchmarks" / "data_throughput.py"
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--threads", "1", "--json-out", str(out),
                           "--set", "data.gpu_augment=on"], capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    mc, ee = result["multicrop"], result["end_to_end"]
    assert mc["cpu_img_s"] > 0 and mc["device_img_s"] > 0 and mc["ratio"] == pytest.approx(
        mc["device_img_s"] / mc["cpu_img_s"])
    assert ee["gpu_augment"] is True and ee["real_img_s"] > 0 and ee["synthetic_img_s"] > 0
    assert len(ee["blocks"]["real"]) == len(ee["blocks"]["synthetic"]) == 2
    assert "| decode + multi-crop" in proc.stdout


def test_padding_chunks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tall and a wide image would pad to a huge square: the batch is cut into chunks, same output."""
    rng = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=rng)
              for h, w in [(20, 30), (90, 12), (12, 90), (25, 25)]]
    crops = G.GpuMultiCrop(_aug())
    whole = crops(images, torch.Generator().manual_seed(3))
    assert G._chunks(torch.tensor([[20, 30], [90, 12], [12, 90], [25, 25]]), 5000) == [(0, 1), (1, 2), (2, 4)]
    monkeypatch.setattr(G, "MAX_PAD_PIXELS", 5000)
    chunked = crops(images, torch.Generator().manual_seed(3))
    torch.testing.assert_close(whole[0], chunked[0])
    torch.testing.assert_close(whole[1], chunked[1])
