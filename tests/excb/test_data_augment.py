"""Multi-crop augmentation: shapes, normalisation, crop-scale schedule, blur probabilities (method.md §5, §10.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from excb.config import AugmentConfig, resolve
from excb.data.augment import (
    MultiCropTransform,
    blur_kernel_size,
    crop_scale_min,
    effective_blur_probs,
    eval_transform,
    gaussian_blur_separable,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _photo(w: int = 120, h: int = 90) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 2 % 256, yy * 3 % 256, (xx + yy) % 256], -1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def test_shapes_and_dtypes_cpu_small_grey():
    aug = resolve(preset_name="cpu-small").augment
    t = MultiCropTransform(aug)
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8), "L")
    globals_, locals_ = t(grey)
    assert len(globals_) == 2 and len(locals_) == aug.num_local_crops
    for x in globals_:
        assert x.shape == (3, 28, 28) and x.dtype == torch.float32
        # grey input: channels carry the same pixels, only the per-channel normalisation differs
        px = x * torch.tensor(aug.std).view(3, 1, 1) + torch.tensor(aug.mean).view(3, 1, 1)
        assert torch.allclose(px[0], px[1], atol=1e-5) and torch.allclose(px[0], px[2], atol=1e-5)
    assert all(x.shape == (3, 16, 16) and x.dtype == torch.float32 for x in locals_)


def test_shapes_default_224_from_rgb_photo():
    t = MultiCropTransform(AugmentConfig())
    globals_, locals_ = t(_photo(500, 375))
    assert [tuple(x.shape) for x in globals_] == [(3, 224, 224)] * 2
    assert [tuple(x.shape) for x in locals_] == [(3, 96, 96)] * 6
    assert all(torch.isfinite(x).all() for x in globals_ + locals_)


def test_constant_image_normalises_exactly():
    aug = AugmentConfig(global_size=32, local_size=16, num_local_crops=2, jitter_strength=0.0, solarize_p=1.0)
    t = MultiCropTransform(aug)
    grey100 = Image.new("RGB", (40, 40), (100, 100, 100))  # below the solarize threshold: unchanged
    globals_, locals_ = t(grey100)
    want = (100 / 255 - torch.tensor(aug.mean)) / torch.tensor(aug.std)
    for x in globals_ + locals_:
        assert torch.allclose(x.mean(dim=(1, 2)), want, atol=1e-4)
        assert float(x.std(dim=(1, 2)).max()) < 1e-4


def test_solarize_only_on_second_global_view():
    aug = AugmentConfig(global_size=16, local_size=16, num_local_crops=1, jitter_strength=0.0, solarize_p=1.0)
    t = MultiCropTransform(aug)
    torch.manual_seed(0)
    globals_, locals_ = t(Image.new("L", (16, 16), 200))  # above the threshold: inverted when solarized
    mean0 = torch.tensor(aug.mean)[0]
    std0 = torch.tensor(aug.std)[0]
    px = [float(x[0].mean() * std0 + mean0) * 255 for x in (globals_[0], globals_[1], locals_[0])]
    assert px == [pytest.approx(200, abs=1), pytest.approx(55, abs=1), pytest.approx(200, abs=1)]


def test_crop_scale_schedule_values():
    aug = AugmentConfig()
    t = MultiCropTransform(aug)
    assert t.global_scale == (0.26, 1.0) and t.local_scale == (0.05, 0.26)
    assert t.set_epoch(0, 10) == pytest.approx(0.26)
    assert t.set_epoch(5, 10) == pytest.approx(0.20)
    assert t.set_epoch(10, 10) == pytest.approx(0.14)
    assert t.global_scale == pytest.approx((0.14, 1.0)) and t.local_scale == pytest.approx((0.05, 0.14))
    t.set_epoch(3, 10)
    want = 0.14 + 0.5 * 0.12 * (1 + math.cos(math.pi * 0.3))
    assert t.global_scale[0] == pytest.approx(want) and t.local_scale[1] == pytest.approx(want)
    assert all(v.crop.scale == t.global_scale for v in t.global_views)
    assert crop_scale_min(7, 0, 0.4, 0.3) == 0.4


def test_blur_kernel_sizes_and_separable_blur_matches_torchvision():
    assert [blur_kernel_size(s) for s in (224, 96, 28, 16, 448)] == [9, 5, 3, 3, 19]
    x = torch.randint(0, 256, (3, 40, 37), dtype=torch.uint8)
    for k, sigma in ((9, 1.7), (3, 0.4), (5, 2.0)):
        ref = F.gaussian_blur(x, [k, k], [sigma, sigma]).int()
        assert (gaussian_blur_separable(x, k, sigma).int() - ref).abs().max() <= 1
        xf = x.float() / 255
        assert torch.allclose(gaussian_blur_separable(xf, k, sigma), F.gaussian_blur(xf, [k, k], [sigma, sigma]),
                              atol=1e-5)


def _blur_rates(blur_p, parity: bool, n: int = 300) -> np.ndarray:
    """Fraction of (global 1, global 2, local) views blurred, measured from the pixels.

    A 1-pixel checkerboard, no colour jitter, full-image crops and sigma fixed at 2: a blurred view loses
    nearly all of its pixel-to-pixel contrast, an unblurred one keeps most of it.
    """
    aug = AugmentConfig(global_size=32, local_size=32, num_local_crops=2, global_scale_min_start=1.0,
                        global_scale_min_end=1.0, local_scale_min=1.0, jitter_strength=0.0, solarize_p=0.0,
                        blur_p=blur_p, blur_reference_parity=parity)
    t = MultiCropTransform(aug, blur_sigma=(2.0, 2.0))
    board = Image.fromarray(((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8), "L")
    torch.manual_seed(1234)
    energy = []
    for _ in range(n):
        globals_, locals_ = t(board)
        energy.append([float((x[0, :, 1:] - x[0, :, :-1]).abs().mean()) for x in globals_ + locals_])
    blurred = np.array(energy) < 0.3 * _SHARP_ENERGY
    return np.array([blurred[:, 0].mean(), blurred[:, 1].mean(), blurred[:, 2:].mean()])


_SHARP_ENERGY = 1.0 / 0.229  # neighbouring pixels 0 and 1 after normalisation with std 0.229


def test_blur_detector_is_calibrated():
    assert np.allclose(_blur_rates((0.0, 0.0, 0.0), parity=False, n=60), 0.0)
    assert np.allclose(_blur_rates((1.0, 1.0, 1.0), parity=False, n=60), 1.0)


def test_blur_probabilities_correct_vs_reference_parity():
    correct = _blur_rates((1.0, 0.1, 1.0), parity=False)
    assert correct[0] == 1.0 and correct[2] == 1.0 and abs(correct[1] - 0.1) < 0.06
    parity = _blur_rates((1.0, 0.1, 1.0), parity=True)
    assert parity[0] == 0.0 and parity[2] == 0.0 and abs(parity[1] - 0.9) < 0.06
    asym = _blur_rates((0.5, 0.3, 0.8), parity=False)
    assert np.all(np.abs(asym - [0.5, 0.3, 0.8]) < 0.1)
    assert effective_blur_probs(AugmentConfig(blur_reference_parity=True)) == pytest.approx((0.0, 0.9, 0.0))


def test_eval_transform_is_deterministic_resize_and_center_crop():
    t = eval_transform(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    photo = _photo(500, 375)
    a, b = t(photo), t(photo)
    assert a.shape == (3, 224, 224) and a.dtype == torch.float32 and torch.equal(a, b)
    # resize short side 375 -> 256, then centre 224: compare with an independent PIL reference
    ref = photo.resize((341, 256), Image.Resampling.BICUBIC).crop((58, 16, 282, 240))
    ref_t = (torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255
             - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert (a - ref_t).abs().mean() < 0.05
    small = eval_transform(28, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(Image.new("L", (28, 28), 255))
    assert small.shape == (3, 28, 28) and torch.allclose(small, torch.ones_like(small), atol=1e-5)


def test_grayscale_keeps_grey_exactly_on_pil_and_uint8_tensors():
    from excb.data.augment import RandomGrayscale
    gray = RandomGrayscale(1.0)
    assert set(F.pil_to_tensor(gray(Image.new("RGB", (5, 5), (100, 100, 100)))).unique().tolist()) == {100}
    t = torch.full((3, 5, 5), 100, dtype=torch.uint8)
    assert set(gray(t).unique().tolist()) == {100} and gray(t).shape == (3, 5, 5)
    red = torch.zeros(3, 2, 2, dtype=torch.uint8)
    red[0] = 255
    assert set(gray(red).unique().tolist()) == {76}  # round(0.299 * 255), PIL's "L" value for pure red
    assert F.pil_to_tensor(F.to_pil_image(red).convert("L")).unique().tolist() == [76]
