"""Does a data set have a handedness? Decides whether horizontal flips belong in its augmentations.

Flips teach the network that an image and its mirror image mean the same thing. That holds for photos and
clip art, where both orientations occur, and is false for digits and text, where a mirrored "2" or "J" is
never seen and flip-invariance only removes information the classes need.

The test asks the data itself. For a sample of small centred thumbnails, compare each image's nearest-neighbour
distance to the rest of the sample with its mirror image's nearest-neighbour distance to the same rest. Where
both orientations occur, a mirror image finds neighbours as close as the original does (ratio ~1); where the
data has a handedness, it lands off the data (ratio >> 1). Measured on the quality suite's sets (256-image
samples, benchmarks/RESULTS.md): open clip art 1.01, icons 1.12, Fashion-MNIST 1.39 (shoes all face left),
OpenCV digits 2.0, UCI digits 2.8.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

THUMB = 16                # thumbnail side: enough for pose and layout, cheap for an all-pairs comparison
MIRROR_RATIO_MAX = 1.25   # above this the data is treated as handed and flips are switched off
_EPS = 1e-6


def pil_thumbnail(image: Any) -> Tensor:
    """A PIL image as a float [3, THUMB, THUMB] thumbnail (aspect ignored: layout is what matters)."""
    import numpy as np
    from PIL import Image

    small = image.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(small, dtype=np.float32)).permute(2, 0, 1)


def thumbnails(images: Tensor) -> Tensor:
    """Float images [N, C, H, W] (any size) -> [N, C, THUMB, THUMB]."""
    return F.interpolate(images, size=(THUMB, THUMB), mode="bilinear", antialias=True, align_corners=False)


def _centred_unit(x: Tensor) -> Tensor:
    """Flattened, mean removed, unit length: cosine distance ignores brightness and contrast."""
    v = x.flatten(1)
    return F.normalize(v - v.mean(1, keepdim=True), dim=1)


def mirror_ratio(thumbs: Tensor) -> float | None:
    """Median nearest-neighbour distance of the mirrored thumbnails over that of the originals (None: < 8).

    Each image's own entry is excluded on both sides, so a symmetric image does not match its own mirror.
    """
    if len(thumbs) < 8:
        return None
    x, m = _centred_unit(thumbs), _centred_unit(thumbs.flip(-1))
    self_match = torch.eye(len(x), dtype=torch.bool)
    d_orig = 1 - (x @ x.T).masked_fill(self_match, -2.0).amax(1)
    d_mirror = 1 - (m @ x.T).masked_fill(self_match, -2.0).amax(1)
    return float((d_mirror.median() + _EPS) / (d_orig.median() + _EPS))
