"""Batched JPEG decode and ExCB multi-crop on device tensors: the data path for GPU training (performance.md).

A CPU DataLoader does ~67 img/s of decode + multi-crop per core; a GPU at ~1000 img/s would need ~15 cores.
Here the loader only reads bytes (shards) or hands over undecoded-size uint8 images (map-style sets), and
the training process decodes a whole batch with nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``) and
draws every view of every image at once:

* RandomResizedCrop: the torchvision rule (10 tries of scale x log-ratio, then the centre fallback),
  vectorised over ``[views x images]``; crop + resize is one ``roi_align`` per view size over the padded
  batch, with adaptive sampling (``ceil(crop / output)`` bilinear samples averaged per output pixel), i.e.
  an area-style antialias like the CPU path's antialiased bicubic resize.
* flip p ``flip_p`` (0.5); ColorJitter with p 0.8 (brightness, contrast, saturation, hue factors and a random order per
  sample, the ranges and formulas of torchvision's ``ColorJitter``); grayscale p 0.2; Gaussian blur with the
  per-view probabilities of :func:`excb.data.augment.effective_blur_probs`, the kernel-size rule of
  :func:`excb.data.augment.blur_kernel_size` and sigma ~ U(0.1, 2); solarize (global view 2); normalise.
* the crop-scale schedule of :class:`excb.data.augment.MultiCropTransform` (``set_epoch``).

Random parameters are drawn on the CPU from an explicit ``torch.Generator`` (small tensors), so a CUDA run
and a CPU test draw the same parameters from the same seed, and the trainer can make them a function of
(seed, rank, epoch, batch). Pixels are processed as float in [0, 1] (the CPU path rounds to uint8 between
ops; the difference is below one grey level per op).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor
from torchvision.ops import roi_align

from excb.config import AugmentConfig
from excb.data.augment import (
    BLUR_SIGMA,
    GRAY_WEIGHTS,
    GRAYSCALE_P,
    JITTER_AT_HALF,
    JITTER_P,
    SOLARIZE_THRESHOLD,
    blur_kernel_size,
    crop_scale_min,
    effective_blur_probs,
    luma,
)

RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
TV_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale, inside its contrast/saturation
MAX_PAD_PIXELS = 64_000_000  # per padded chunk (768 MB fp32): a few huge images must not pad the whole batch


# ------------------------------------------------------------------------------------------ batches
@dataclass
class RawBatch:
    """What the loader yields on the GPU path: JPEG bytes (``encoded``) or uint8 [C, H, W] images."""

    images: list[Tensor]
    encoded: bool
    skipped: int = 0
    labels: Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.images)

    def pin_memory(self) -> "RawBatch":
        """Pixels are copied to the GPU, so pin them; JPEG bytes go to nvJPEG from pageable memory."""
        if self.encoded:
            return self
        return replace(self, images=[x.pin_memory() for x in self.images])


def collate_raw(batch: Sequence[Any]) -> RawBatch:
    """Items are ``RawSample`` (shards, JPEG bytes), uint8 tensors, ``(tensor, label)`` or ``None`` (skipped)."""
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    images, labels, encoded = [], [], False
    for item in kept:
        if hasattr(item, "data") and hasattr(item, "key"):  # excb.data.shards.RawSample
            if item.data.numel() == 0:
                skipped += 1
                continue
            images.append(item.data)
            labels.append(int(item.label))
            encoded = True
        elif isinstance(item, tuple):
            images.append(item[0])
            labels.append(int(item[1]))
        else:
            images.append(item)
            labels.append(-1)
    label_tensor = torch.tensor(labels, dtype=torch.long) if labels else None
    return RawBatch(images, encoded, skipped, label_tensor)


class ToUint8Tensor:
    """Map-style sets on the device path: PIL image -> uint8 [C, H, W] (1 or 3 channels), no augmentation.

    ``max_side`` shrinks large images first (antialiased, aspect kept). Padding is already chunked
    (``MAX_PAD_PIXELS``), but full-size images would still travel from the loader workers (a batch of 128
    12 MP photos is 4.6 GB of uint8) and make ``roi_align``'s adaptive sampling average ~100x100 samples per
    output pixel. The trainer uses 4 x ``global_size``, which keeps >= ``local_size`` source pixels across
    even the smallest local crop.
    """

    def __init__(self, max_side: int | None = None) -> None:
        self.max_side = max_side

    def __call__(self, image: Any) -> Tensor:
        from PIL import Image
        from torchvision.transforms.v2 import functional as F

        if isinstance(image, Tensor):
            return image if image.ndim == 3 else image.unsqueeze(0)
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        if self.max_side is not None and max(image.size) > self.max_side:
            image = image.copy()
            image.thumbnail((self.max_side, self.max_side), Image.Resampling.BICUBIC, reducing_gap=3.0)
        return F.pil_to_tensor(image)


# --------------------------------------------------------------------------------------------- decode
def decode_jpegs(data: Sequence[Tensor], device: torch.device | str) -> tuple[list[Tensor], int]:
    """Decode JPEG byte tensors to RGB uint8 [3, H, W] on ``device``; undecodable ones are dropped and counted.

    One batched call (nvJPEG on CUDA); if any image in it is bad, fall back to one call per image.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    if not data:
        return [], 0
    try:
        return list(decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)), 0
    except RuntimeError:
        pass
    out: list[Tensor] = []
    for d in data:
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            continue
    return out, len(data) - len(out)


def pad_batch(images: Sequence[Tensor], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Stack variable-size [C, H, W] uint8 images into float [B, 3, Hmax, Wmax] in [0, 1] (edge-padded); sizes
    [B, 2]."""
    device = torch.device(device)
    sizes = torch.tensor([[x.shape[-2], x.shape[-1]] for x in images], dtype=torch.long)
    h, w = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    same = bool((sizes[:, 0] == h).all() and (sizes[:, 1] == w).all())
    if same:
        out = torch.stack([x.to(device, non_blocking=True).expand(3, -1, -1) for x in images]).float()
    else:
        out = torch.empty(len(images), 3, h, w, device=device)
        for i, x in enumerate(images):
            ih, iw = x.shape[-2], x.shape[-1]
            out[i, :, :ih, :iw] = x.to(device, non_blocking=True)  # broadcasts grey to 3
            # edge-replicate the padding: bilinear samples at a crop's last row/column then read the edge
            # pixel, as roi_align's own border clamping does on an unpadded image (zeros would darken edges)
            out[i, :, :ih, iw:] = out[i, :, :ih, iw - 1:iw]
            out[i, :, ih:, :] = out[i, :, ih - 1:ih, :]
    return out.div_(255.0), sizes


# --------------------------------------------------------------------------------------- parameters
def sample_crop_boxes(sizes: Tensor, scale: tuple[float, float], gen: torch.Generator,
                      ratio: tuple[float, float] = RATIO) -> Tensor:
    """torchvision RandomResizedCrop.get_params, vectorised: [N, 4] (top, left, height, width) for sizes [N, 2]."""
    n = sizes.shape[0]
    height, width = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, CROP_TRIES, generator=gen, dtype=torch.float64))
    log_r = (math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0]))
             * torch.rand(n, CROP_TRIES, generator=gen, dtype=torch.float64))
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.double().argmax(1, keepdim=True)
    w_ok, h_ok = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    # the centre-crop fallback when no try fits
    in_ratio = (width / height)[:, 0]
    fw = torch.where(in_ratio < ratio[0], width[:, 0],
                     torch.where(in_ratio > ratio[1], torch.round(height[:, 0] * ratio[1]), width[:, 0]))
    fh = torch.where(in_ratio < ratio[0], torch.round(width[:, 0] / ratio[0]), height[:, 0])
    any_ok = ok.any(1)
    h_sel, w_sel = torch.where(any_ok, h_ok, fh), torch.where(any_ok, w_ok, fw)
    u = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    top = torch.where(any_ok, torch.floor(u[:, 0] * (height[:, 0] - h_sel + 1)),
                      torch.div(height[:, 0] - h_sel, 2, rounding_mode="floor"))
    left = torch.where(any_ok, torch.floor(u[:, 1] * (width[:, 0] - w_sel + 1)),
                       torch.div(width[:, 0] - w_sel, 2, rounding_mode="floor"))
    return torch.stack([top, left, h_sel, w_sel], 1).long()


@dataclass
class ViewParams:
    """Random parameters of ``N`` views (view-major: index = view * B + image); all on the CPU."""

    boxes: Tensor        # [N, 4] long: top, left, height, width
    flip: Tensor         # [N] bool
    jitter: Tensor       # [N] bool: colour jitter applied
    factors: Tensor      # [N, 4]: brightness, contrast, saturation, hue
    order: Tensor        # [N, 4] long: permutation of the four jitter ops
    gray: Tensor         # [N] bool
    blur: Tensor         # [N] bool
    sigma: Tensor        # [N]
    solarize: Tensor     # [N] bool
    extra: dict[str, Any] = field(default_factory=dict)


def jitter_ranges(strength: float) -> tuple[tuple[float, float], ...]:
    """(brightness, contrast, saturation, hue) factor ranges of the CPU path's ColorJitter."""
    b, c, s, h = (v * strength / 0.5 for v in JITTER_AT_HALF)
    h = min(h, 0.5)
    return (max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h)


def sample_view_params(sizes: Tensor, views: int, scale: tuple[float, float], jitter_strength: float,
                       blur_p: Sequence[float], solarize_p: Sequence[float], gen: torch.Generator,
                       blur_sigma: Sequence[float] = BLUR_SIGMA, flip_p: float = 0.5) -> ViewParams:
    """Parameters for ``views`` views of each image (``sizes`` [B, 2]); ``blur_p``/``solarize_p`` per view."""
    b = sizes.shape[0]
    n = views * b
    per_view = lambda p: torch.tensor([float(p[v]) for v in range(views)]).repeat_interleave(b)  # noqa: E731
    boxes = sample_crop_boxes(sizes.repeat(views, 1), scale, gen)
    flip = torch.rand(n, generator=gen) < flip_p
    jitter = (torch.rand(n, generator=gen) < JITTER_P) & (jitter_strength > 0)
    lo = torch.tensor([r[0] for r in jitter_ranges(jitter_strength)])
    hi = torch.tensor([r[1] for r in jitter_ranges(jitter_strength)])
    factors = lo + (hi - lo) * torch.rand(n, 4, generator=gen)
    order = torch.rand(n, 4, generator=gen).argsort(1)
    gray = torch.rand(n, generator=gen) < GRAYSCALE_P
    blur = torch.rand(n, generator=gen) < per_view(blur_p)
    sigma = blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * torch.rand(n, generator=gen)
    solarize = torch.rand(n, generator=gen) < per_view(solarize_p)
    return ViewParams(boxes, flip, jitter, factors, order, gray, blur, sigma, solarize)


# ------------------------------------------------------------------------------------ pixel operations
def crop_resize(x: Tensor, image_index: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop boxes (top, left, h, w) out of ``x`` [B, C, H, W] and resize to ``size``² -> [N, C, size, size]."""
    b = boxes.to(x.device, torch.float32)
    rois = torch.stack([image_index.to(x.device, torch.float32), b[:, 1], b[:, 0], b[:, 1] + b[:, 3],
                        b[:, 0] + b[:, 2]], 1)
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def grayscale(x: Tensor, weights: Sequence[float] = GRAY_WEIGHTS) -> Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] luma. The grayscale op uses the CPU path's weights (grey stays grey);
    contrast and saturation pass torchvision's, as its ColorJitter (used on the CPU path) does."""
    return luma(x, weights)


def _blend(a: Tensor, b: Tensor, ratio: Tensor) -> Tensor:
    r = ratio.view(-1, 1, 1, 1)
    return (r * a + (1.0 - r) * b).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, torch.zeros_like(x), f)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, grayscale(x, TV_GRAY_WEIGHTS).mean(dim=(-3, -2, -1), keepdim=True), f)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, grayscale(x, TV_GRAY_WEIGHTS), f)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    flat = maxc == minc
    chroma = maxc - minc
    one = torch.ones_like(maxc)
    s = chroma / torch.where(flat, one, maxc)
    div = torch.where(flat, one, chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.remainder((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """HSV -> RGB in closed form: channel n (r, g, b = 5, 3, 1) is v - v*s*clamp(min(k, 4 - k), 0, 1) with
    k = (n + 6h) mod 6; the same values as the six-sector table, without building and gathering it."""
    h6 = (h * 6.0).unsqueeze(1)
    n = torch.tensor([5.0, 3.0, 1.0], device=h.device, dtype=h.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + h6, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    vs = v.unsqueeze(1)
    return (vs - vs * s.unsqueeze(1) * ramp).clamp_(0.0, 1.0)


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    """Rotate the hue by ``f`` (a fraction of the circle, in [-0.5, 0.5]) per sample, as torchvision does."""
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(h, s, v)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
COLOUR_OPS = (2, 3)  # saturation, hue: the identity on grey images (up to torchvision's 0.9999 luma sum)


def color_jitter(x: Tensor, apply: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Per-sample ColorJitter: for each position in each sample's random order, apply that op to those samples."""
    idx_all = apply.to(x.device).nonzero().flatten()  # same device as the masks below
    if idx_all.numel() == 0:
        return x
    x = x.clone()
    factors, order = factors.to(x.device), order.to(x.device)
    colour = ~grey_samples(x)  # brightness and contrast keep a grey image grey; saturation and hue leave it as is
    for pos in range(4):
        for op in range(4):
            mask = order[idx_all, pos] == op
            if op in COLOUR_OPS:
                mask &= colour[idx_all]
            sel = idx_all[mask]
            if sel.numel():
                x[sel] = _JITTER_OPS[op](x[sel], factors[sel, op])
    return x


def grey_samples(x: Tensor) -> Tensor:
    """[N] True where all three channels are equal (a grey image; a quarter of a CPU step's time went into hue
    rotations of grey digits and clothes that changed nothing)."""
    same = (x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])
    return same.flatten(1).all(1)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Per-sample Gaussian blur (torchvision's weights, reflect padding), separable grouped convolutions."""
    pad = kernel_size // 2
    n, c, height, width = x.shape
    if n == 0 or pad == 0 or pad >= height or pad >= width:
        return x
    d = torch.arange(kernel_size, device=x.device, dtype=torch.float32) - (kernel_size - 1) / 2.0
    k = torch.exp(-(d[None] ** 2) / (2.0 * sigma.to(x.device, torch.float32)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, k]
    y = nnf.pad(x.reshape(1, n * c, height, width), [pad, pad, pad, pad], mode="reflect")
    y = nnf.conv2d(y, k.view(n * c, 1, 1, kernel_size).to(y.dtype), groups=n * c)
    y = nnf.conv2d(y, k.view(n * c, 1, kernel_size, 1).to(y.dtype), groups=n * c)
    return y.view(n, c, height, width)


def _where_rows(mask: Tensor, fn: Any, x: Tensor) -> Tensor:
    idx = mask.to(x.device).nonzero().flatten()
    if idx.numel():
        x = x.clone()
        x[idx] = fn(x[idx], idx)
    return x


def apply_view_ops(x: Tensor, p: ViewParams, kernel_size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """flip -> jitter -> grayscale -> blur -> solarize -> normalise on float [N, 3, S, S] in [0, 1]."""
    x = _where_rows(p.flip, lambda v, _i: v.flip(-1), x)
    x = color_jitter(x, p.jitter, p.factors, p.order)
    x = _where_rows(p.gray, lambda v, _i: grayscale(v).expand(-1, 3, -1, -1), x)
    x = _where_rows(p.blur, lambda v, i: gaussian_blur(v, p.sigma.to(x.device)[i], kernel_size), x)
    threshold = SOLARIZE_THRESHOLD / 255.0
    x = _where_rows(p.solarize, lambda v, _i: torch.where(v >= threshold, 1.0 - v, v), x)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


# ------------------------------------------------------------------------------------------ multi-crop
class GpuMultiCrop:
    """The ExCB multi-crop of a batch on the batch's device: ``(globals [2, B, 3, G, G], locals [L, B, 3, l, l])``."""

    def __init__(self, aug: AugmentConfig, blur_sigma: Sequence[float] = BLUR_SIGMA) -> None:
        self.aug = aug
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_probs = effective_blur_probs(aug)
        self.scale_min = aug.global_scale_min_start  # read by the trainer's epoch row, as on MultiCropTransform
        self.global_scale: tuple[float, float] = (aug.global_scale_min_start, 1.0)
        self.local_scale: tuple[float, float] = (aug.local_scale_min, aug.global_scale_min_start)

    def set_epoch(self, epoch: int, epochs: int) -> float:
        """The same cosine crop-scale schedule as the CPU path's MultiCropTransform.set_epoch."""
        smin = crop_scale_min(epoch, epochs, self.aug.global_scale_min_start, self.aug.global_scale_min_end)
        self.scale_min = smin
        self.global_scale = (smin, 1.0)
        self.local_scale = (min(self.aug.local_scale_min, smin), smin)
        return smin

    def global_params(self, sizes: Tensor, gen: torch.Generator) -> ViewParams:
        return sample_view_params(sizes, 2, self.global_scale, self.aug.jitter_strength,
                                  self.blur_probs[:2], (0.0, self.aug.solarize_p), gen, self.blur_sigma,
                                  self.aug.flip_p)

    def local_params(self, sizes: Tensor, gen: torch.Generator) -> ViewParams:
        n = self.aug.num_local_crops
        return sample_view_params(sizes, n, self.local_scale, self.aug.jitter_strength, (self.blur_probs[2],) * n,
                                  (0.0,) * n, gen, self.blur_sigma, self.aug.flip_p)

    def _finish(self, crops: Tensor, params: ViewParams, views: int, size: int) -> Tensor:
        out = apply_view_ops(crops, params, blur_kernel_size(size), self.aug.mean, self.aug.std)
        return out.view(views, crops.shape[0] // views, 3, size, size)

    def __call__(self, images: Sequence[Tensor], gen: torch.Generator,
                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor | None]:
        """``images``: uint8 [C, H, W] tensors (any sizes; on ``device`` or moved there)."""
        if not images:
            raise ValueError("GpuMultiCrop: empty batch")
        device = torch.device(device) if device is not None else images[0].device
        sizes = torch.tensor([[x.shape[-2], x.shape[-1]] for x in images], dtype=torch.long)
        n_local = self.aug.num_local_crops
        gp = self.global_params(sizes, gen)
        lp = self.local_params(sizes, gen) if n_local else None
        b, gs, ls = len(images), self.aug.global_size, self.aug.local_size
        g_crops = torch.empty(2 * b, 3, gs, gs, device=device)
        l_crops = torch.empty(n_local * b, 3, ls, ls, device=device) if lp is not None else None
        for lo, hi in _chunks(sizes, MAX_PAD_PIXELS):
            x, _ = pad_batch(images[lo:hi], device)
            for views, params, out, size in ((2, gp, g_crops, gs), (n_local, lp, l_crops, ls)):
                if params is None or out is None:
                    continue
                rows = (torch.arange(views)[:, None] * b + torch.arange(lo, hi)[None]).flatten()
                out[rows.to(device)] = crop_resize(x, torch.arange(lo, hi).repeat(views) - lo, params.boxes[rows], size)
        globals_ = self._finish(g_crops, gp, 2, gs)
        locals_ = self._finish(l_crops, lp, n_local, ls) if lp is not None and l_crops is not None else None
        return globals_, locals_

    def __repr__(self) -> str:
        return (f"GpuMultiCrop(global={self.aug.global_size}x2 scale={self.global_scale}, "
                f"local={self.aug.local_size}x{self.aug.num_local_crops} scale={self.local_scale}, "
                f"blur_p={self.blur_probs})")


def _chunks(sizes: Tensor, max_pixels: int) -> list[tuple[int, int]]:
    """Consecutive ranges whose padded size (count x max H x max W) stays under ``max_pixels`` (>= 1 image each)."""
    out, lo, mh, mw = [], 0, 0, 0
    for i, (h, w) in enumerate(sizes.tolist()):
        nh, nw = max(mh, h), max(mw, w)
        if i > lo and (i - lo + 1) * nh * nw > max_pixels:
            out.append((lo, i))
            lo, nh, nw = i, h, w
        mh, mw = nh, nw
    out.append((lo, len(sizes)))
    return out


def augment_batch(batch: RawBatch, crops: GpuMultiCrop, device: torch.device | str,
                  gen: torch.Generator) -> tuple[Tensor, Tensor | None, int]:
    """Decode (if JPEG bytes) and multi-crop a loader batch on ``device``; returns (globals, locals, skipped)."""
    images, skipped = (decode_jpegs(batch.images, device) if batch.encoded else (batch.images, 0))
    skipped += batch.skipped
    if not images:
        return torch.empty(2, 0, 3, crops.aug.global_size, crops.aug.global_size, device=device), None, skipped
    g, l = crops(images, gen, device)
    return g, l, skipped
