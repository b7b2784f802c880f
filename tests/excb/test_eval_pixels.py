"""excb.inference.eval_pixels: the serving path's eval transform gives exactly the pixels of torchvision's
EvalTransform."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from excb.data.augment import eval_transform
from excb.inference.eval_pixels import EvalPixels

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("size", [16, 64, 224])
@pytest.mark.parametrize("wh", [(73, 73), (18, 18), (500, 375), (375, 500), (100, 37), (257, 300), (64, 64)])
def test_bit_identical_to_torchvision(size: int, wh: tuple[int, int]) -> None:
    rng = np.random.default_rng(size * 1000 + wh[0])
    noise = Image.fromarray((rng.random((wh[1], wh[0], 3)) * 255).astype(np.uint8))
    for image in (noise, noise.filter(ImageFilter.GaussianBlur(2)), noise.convert("L")):
        want = eval_transform(size, MEAN, STD)(image.convert("RGB")).numpy()
        got = EvalPixels(size, MEAN, STD)(image)
        assert got.dtype == np.float32 and got.shape == (3, size, size)
        assert np.array_equal(got, want)


def test_writes_into_the_batch_slot() -> None:
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    batch = np.zeros((2, 3, 16, 16), np.float32)
    out = EvalPixels(16, MEAN, STD)(image, out=batch[1])
    assert out.base is batch or np.shares_memory(out, batch)
    assert np.array_equal(batch[1], eval_transform(16, MEAN, STD)(image).numpy()) and not batch[0].any()
