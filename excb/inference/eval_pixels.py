"""The eval transform (``excb.data.augment.EvalTransform``) without torchvision's dispatch, for the serving
hot path: the same pixels, bit for bit, at a fraction of the per-image overhead.

Why a second implementation of one transform: torchvision's version runs ~10 tensor operations per image
(~0.25 ms on a 73 px image, more than decoding it), which the embed service pays on every request. Here:

- resize the short side to ``round(size * 256 / 224)``, the long side to ``int(short * long / short_in)``
  exactly as torchvision computes it, with the kernel torchvision itself calls (torch's native uint8 bicubic
  antialias); skipped, as torchvision skips it, when the size already matches. Pillow's bicubic was tried:
  it rounds differently (1-2 grey levels on ~0.3 % of pixels) and is 2.5x slower on large downscales;
- centre-crop ``size`` x ``size`` with torchvision's offsets (``int(round((h - size) / 2))``), as a view;
- ``(v * (1/255) - mean) / std`` per channel from a 256-entry float32 table built with torch's operation order
  (``to_dtype(scale=True)`` then ``normalize``), written by one table lookup straight into the caller's
  batch slot: one copy of the pixels from the decoded image to the ORT input.

tests/excb/test_eval_pixels.py checks bit-identity with ``EvalTransform`` over sizes and aspect ratios.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(new_width, new_height) with the short side ``short``: torchvision's ``_compute_resized_output_size``."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def crop_offsets(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of a centred ``size`` crop: torchvision's ``center_crop`` rounding."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def normalisation_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[3, 256] float32: ``(v * (1/255) - mean_c) / std_c`` in float32, torch's order (multiply, subtract,
    divide), so every value equals what ``to_dtype(scale=True)`` + ``normalize`` produce."""
    v = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    return ((v[None, :] - m) / s).astype(np.float32)


class EvalPixels:
    """``image (PIL) -> float32 [3, S, S]``, or written into ``out`` (a slot of a preallocated batch)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = int(size)
        self.resize_to = int(round(self.size * 256 / 224))
        self.table = normalisation_table(mean, std)

    def __call__(self, image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((3, self.size, self.size), dtype=np.float32)
        pixels = self.crop(image)
        for c in range(3):
            np.take(self.table[c], pixels[:, :, c], out=out[c])
        return out

    def crop(self, image: Image.Image) -> np.ndarray:
        """The resized, centre-cropped pixels as a uint8 [S, S, 3] view (RGB; grey is repeated)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        nw, nh = resized_size(w, h, self.resize_to)
        arr = np.asarray(image)
        if (nw, nh) != (w, h):
            arr = resize_bicubic(arr, nw, nh)
        left, top = crop_offsets(nw, nh, self.size)
        return arr[top:top + self.size, left:left + self.size]


def resize_bicubic(hwc: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [height, width, 3] with torch's native uint8 bicubic antialias kernel (the one
    torchvision's resize runs on CPU), on a channels-last view: no float copy of the image."""
    import torch
    from torch.nn.functional import interpolate

    if not hwc.flags.writeable:  # np.asarray(PIL image) is read-only; torch wants to own writable memory
        hwc = hwc.copy()
    x = torch.from_numpy(hwc).permute(2, 0, 1).unsqueeze(0)
    y = interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return y[0].permute(1, 2, 0).numpy()


__all__ = ["EvalPixels", "normalisation_table", "resized_size", "crop_offsets"]
