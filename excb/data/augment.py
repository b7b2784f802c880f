"""Multi-crop augmentation with the crop-scale schedule, and the deterministic eval transform (method.md §5, §4.6).

Per view: RandomResizedCrop (bicubic, antialias) -> hflip (p `flip_p`) -> colour jitter (p 0.8) -> grayscale (p 0.2)
-> Gaussian blur (p per view) -> solarize (global view 2 only) -> float + normalise -> 3 channels.

The blur probabilities in ``AugmentConfig.blur_p`` are applied as configured. ``blur_reference_parity``
reproduces the reference code's bug (it handed ``1 - p`` to a ``RandomApply`` whose ``p`` already is the
probability of applying), i.e. global 1 never blurred, global 2 blurred 90 %, local crops never blurred.

All randomness comes from the global torch RNG, as in torchvision, so the trainer can make every item's
augmentation a pure function of (seed, epoch, index) by forking that RNG.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from excb.config import AugmentConfig

REFERENCE_BLUR_KERNEL = 9  # at 224 px
REFERENCE_SIZE = 224
BLUR_SIGMA = (0.1, 2.0)
JITTER_AT_HALF = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue at strength 0.5
JITTER_P = 0.8
GRAYSCALE_P = 0.2
# ITU-R 601-2 luma, PIL's "L" weights: they sum to exactly 1, so a grey pixel stays the same grey. torchvision's
# rgb_to_grayscale uses 0.2989 (sum 0.9999) and truncates on uint8, turning grey 100 into 99.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
SOLARIZE_THRESHOLD = 128  # on uint8 pixels
SMALL_IMAGE_PIXELS = 96 * 96  # below this, augment on tensors rather than PIL


def blur_kernel_size(size: int) -> int:
    """Kernel 9 at 224 px, scaled linearly with the crop size, odd, at least 3."""
    k = int(round(REFERENCE_BLUR_KERNEL * size / REFERENCE_SIZE))
    return max(3, k | 1)


def effective_blur_probs(aug: AugmentConfig) -> tuple[float, float, float]:
    """(global 1, global 2, local) probabilities that are actually applied."""
    p = tuple(float(v) for v in aug.blur_p)
    # why the ignore below: blur_p is a 3-tuple (AugmentConfig); a generator's tuple() is typed tuple[float, ...]
    return tuple(1.0 - v for v in p) if aug.blur_reference_parity else p  # type: ignore[return-value]


def crop_scale_min(epoch: int, epochs: int, start: float, end: float) -> float:
    """Cosine from ``start`` (epoch 0) to ``end`` (epoch == epochs)."""
    if epochs <= 0:
        return start
    t = min(max(epoch / epochs, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def _gaussian_kernel1d(kernel_size: int, sigma: float) -> Tensor:
    """Same weights as torchvision's GaussianBlur: exp(-d^2 / (2 sigma^2)) over d = -k//2 .. k//2, normalised."""
    half = (kernel_size - 1) / 2.0
    w = [math.exp(-((i - half) ** 2) / (2.0 * sigma * sigma)) for i in range(kernel_size)]
    total = sum(w)
    return torch.tensor([v / total for v in w], dtype=torch.float32)  # plain Python: tiny tensors are slow


def gaussian_blur_separable(x: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """torchvision's Gaussian blur (same weights, reflect padding) as two 1-D shift-and-add passes.

    Equal to ``F.gaussian_blur`` up to rounding, and ~9x faster on CPU at 224 px (0.55 vs 5.1 ms per view,
    one core) because small depthwise convolutions are slow there. Accepts [C, H, W] or [N, C, H, W].
    """
    pad = kernel_size // 2
    height, width = x.shape[-2:]
    if pad == 0 or pad >= height or pad >= width:  # reflect padding needs pad < size
        return x
    w = _gaussian_kernel1d(kernel_size, sigma).tolist()
    src = x.to(torch.float32)
    lead = src.shape[:-2]
    padded = torch.nn.functional.pad(src.reshape(1, -1, height, width), [pad, pad, pad, pad], mode="reflect")[0]
    rows = padded[:, :, 0:width] * w[0]
    for i in range(1, kernel_size):
        rows.add_(padded[:, :, i:i + width], alpha=w[i])
    out = rows[:, 0:height, :] * w[0]
    for i in range(1, kernel_size):
        out.add_(rows[:, i:i + height, :], alpha=w[i])
    out = out.reshape(*lead, height, width)
    if not torch.is_floating_point(x):
        out = out.round_().clamp_(0, 255).to(x.dtype)
    return out


class RandomGaussianBlur(v2.Transform):
    """Gaussian blur applied with probability ``p`` (the probability of *applying*; no inversion here)."""

    def __init__(self, p: float, kernel_size: int, sigma: Sequence[float] = BLUR_SIGMA) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"blur probability must be in [0, 1], got {p}")
        self.p = p
        self.kernel_size = kernel_size
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def forward(self, x: Tensor) -> Tensor:
        if self.p <= 0.0 or (self.p < 1.0 and torch.rand(1).item() >= self.p):
            return x
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        return gaussian_blur_separable(x, self.kernel_size, sigma)


def luma(x: Tensor, weights: Sequence[float] = GRAY_WEIGHTS) -> Tensor:
    """[..., 3, H, W] -> [..., 1, H, W] weighted channel sum, as float (both augmentation paths use this)."""
    r, g, b = x.to(torch.float32).unbind(-3)
    return (weights[0] * r + weights[1] * g + weights[2] * b).unsqueeze(-3)


class RandomGrayscale(v2.Transform):
    """Grayscale with probability ``p``, 3 channels kept; exact on grey input (PIL's weights, rounded on uint8)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Image.Image | Tensor) -> Image.Image | Tensor:
        if self.p <= 0.0 or (self.p < 1.0 and torch.rand(1).item() >= self.p):
            return x
        if isinstance(x, Image.Image):
            return x.convert("L").convert(x.mode) if x.mode != "L" else x
        if x.shape[-3] == 1:
            return x
        grey = luma(x)
        if not torch.is_floating_point(x):
            grey = grey.round_().clamp_(0, 255)
        return grey.to(x.dtype).expand_as(x).contiguous()


def _jitter(strength: float) -> v2.Transform:
    b, c, s, h = (v * strength / 0.5 for v in JITTER_AT_HALF)
    return v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=min(h, 0.5))], p=JITTER_P)


class _View:
    """One view: geometric and colour ops on PIL (fast C code), blur/solarize/normalise on a tensor.

    The crop's ``scale`` is mutable so the schedule can move it between epochs.
    """

    def __init__(self, size: int, scale: tuple[float, float], jitter: float, blur_p: float, solarize_p: float,
                 mean: Sequence[float], std: Sequence[float], blur_sigma: Sequence[float], flip_p: float) -> None:
        self.crop = v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True)
        self.pil_ops = v2.Compose([
            self.crop,
            v2.RandomHorizontalFlip(flip_p),
            _jitter(jitter) if jitter > 0 else v2.Identity(),
            RandomGrayscale(GRAYSCALE_P),
        ])
        self.blur = RandomGaussianBlur(blur_p, blur_kernel_size(size), blur_sigma)
        self.solarize = v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=solarize_p) if solarize_p > 0 else None
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        x = self.pil_ops(image)
        if isinstance(x, Image.Image):
            x = F.pil_to_tensor(x)
        x = self.blur(x)
        if self.solarize is not None:
            x = self.solarize(x)
        x = F.to_dtype(x, torch.float32, scale=True)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)  # grey sets: every op above is a no-op across channels, replicate last
        return F.normalize(x, self.mean, self.std)


def _as_input(image: Any) -> Image.Image | Tensor:
    """Large PIL L/RGB images stay PIL (PIL's C resize/jitter is fastest there); small ones and tensors
    become uint8 [C, H, W] tensors (per-call overhead dominates on 28 px images and PIL's is higher)."""
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        return image if image.width * image.height > SMALL_IMAGE_PIXELS else F.pil_to_tensor(image)
    if isinstance(image, Tensor):
        x = image if image.ndim == 3 else image.unsqueeze(0)
        if x.dtype != torch.uint8:
            x = F.to_dtype(x, torch.uint8, scale=True)
        if x.shape[0] not in (1, 3):
            raise ValueError(f"expected 1 or 3 channels, got {x.shape[0]}")
        return x
    raise TypeError(f"expected a PIL image or a tensor, got {type(image).__name__}")


def _to_uint8_tensor(image: Any) -> Tensor:
    x = _as_input(image)
    return F.pil_to_tensor(x) if isinstance(x, Image.Image) else x


class MultiCropTransform:
    """PIL image -> ``(globals: [2 tensors], locals: [num_local_crops tensors])``, float, normalised, 3 channels."""

    def __init__(self, aug: AugmentConfig, blur_sigma: Sequence[float] = BLUR_SIGMA) -> None:
        self.aug = aug
        self.blur_probs = effective_blur_probs(aug)
        self.scale_min = aug.global_scale_min_start
        view = functools.partial(_View, jitter=aug.jitter_strength, mean=aug.mean, std=aug.std,
                                 blur_sigma=blur_sigma, flip_p=aug.flip_p)
        g_scale = (self.scale_min, 1.0)
        self.global_views = [
            view(aug.global_size, g_scale, blur_p=self.blur_probs[0], solarize_p=0.0),
            view(aug.global_size, g_scale, blur_p=self.blur_probs[1], solarize_p=aug.solarize_p),
        ]
        l_scale = (aug.local_scale_min, self.scale_min)
        self.local_views = [view(aug.local_size, l_scale, blur_p=self.blur_probs[2], solarize_p=0.0)
                            for _ in range(aug.num_local_crops)]

    def set_epoch(self, epoch: int, epochs: int) -> float:
        """Apply the cosine crop-scale schedule; returns the global minimum scale for this epoch."""
        smin = crop_scale_min(epoch, epochs, self.aug.global_scale_min_start, self.aug.global_scale_min_end)
        self.scale_min = smin
        for view in self.global_views:
            view.crop.scale = (smin, 1.0)
        for view in self.local_views:
            view.crop.scale = (min(self.aug.local_scale_min, smin), smin)
        return smin

    @property
    def global_scale(self) -> tuple[float, float]:
        return tuple(self.global_views[0].crop.scale)

    @property
    def local_scale(self) -> tuple[float, float] | None:
        return tuple(self.local_views[0].crop.scale) if self.local_views else None

    def __call__(self, image: Any) -> tuple[list[Tensor], list[Tensor]]:
        x = _as_input(image)
        return [view(x) for view in self.global_views], [view(x) for view in self.local_views]

    def __repr__(self) -> str:
        return (f"MultiCropTransform(global={self.aug.global_size}x2 scale={self.global_scale}, "
                f"local={self.aug.local_size}x{len(self.local_views)} scale={self.local_scale}, "
                f"blur_p={self.blur_probs}, parity={self.aug.blur_reference_parity})")


class EvalTransform:
    """Resize the short side to size*256/224 (bicubic, antialias), centre-crop ``size``, normalise, 3 channels."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = int(size)
        self.resize_to = int(round(self.size * 256 / 224))
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def __call__(self, image: Any) -> Tensor:
        x = _to_uint8_tensor(image)
        x = F.resize(x, [self.resize_to], interpolation=InterpolationMode.BICUBIC, antialias=True)
        x = F.center_crop(x, [self.size, self.size])
        x = F.to_dtype(x, torch.float32, scale=True)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return F.normalize(x.contiguous(), self.mean, self.std)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, resize={self.resize_to}, mean={self.mean}, std={self.std})"


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> EvalTransform:
    """The deterministic transform for kNN, linear probe, export parity and the embed service."""
    return EvalTransform(size, mean, std)
