"""A training recipe fitted to the user's data and device: what ``excb train data=FOLDER`` runs without a preset.

The presets were tuned on one data set each; a folder of 1,500 icons or 4,000 digits needs other input
sizes, fewer clusters and many more epochs than Fashion-MNIST did. :func:`inspect_data` looks at the data
(count, size distribution, grey or colour) and :func:`fit` turns that and the device into config choices,
each with a one-line reason. Keys the user set explicitly (``TrainConfig.pinned``) are never touched, and the
choices made for a run directory are stored in ``recipe.json`` so a resume trains exactly the same recipe.

Why these rules (benchmarks/RESULTS.md has the runs behind them):
- input size ~ the images' own short side, within 28-32 px on a CPU (where the step cost, not the pixels,
  limits quality within a budget; smaller images are upsampled to feed a cheap stride-2 stem) and 32-224 px on
  a GPU;
- K ~ one cluster per 64 images (1024 for Fashion-MNIST's 60k, where it was tuned; 64 for a few thousand);
- the number of steps comes from a compute budget (``excb.training.budget``), because short runs on small folders
  were the main cause of features worse than raw pixels;
- the CPU recipe is the tuned ``cpu-small`` model and schedules; grey data switches off colour-only
  augmentations (solarize);
- crops never smaller than 16x16 (global) / 8x8 (local) of the image's own pixels: on 8-20 px digits the usual
  scales cut out a few pixels and blow them up;
- on a CPU, the multiscale embedding (``model.embedding``): a budgeted run stops early, where the last stage
  alone is not yet the best feature;
- grey data on a CPU trains at twice cpu-small's learning rate (4e-3 at batch 128): on validation, 600 steps,
  opencv-digits kNN +6.1 / +6.0 points over two seeds and UCI digits 96.9 -> 97.9 %; on colour icons within
  seed noise, not applied;
- horizontal flips only where the data holds both orientations (``excb.training.mirror``): off for digits and text,
  +1.8 kNN points on OpenCV's digits at 800 steps, measured side by side;
- the served embedding PCA-whitened on the run's own images at the end (``excb.models.whitening``): measured on the
  same ten-minute teachers, kNN rose on all five suite sets (Fashion-MNIST 85.8 -> 89.6 %).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from excb.config import TrainConfig, deep_merge, validate
from excb.data.datasets import ArrayDataset, DecodeTally, ImageFileDataset, build_dataset, evenly_spaced
from excb.data.shards import read_index
from excb.models.external import is_external
from excb.training.mirror import MIRROR_RATIO_MAX, mirror_ratio, pil_thumbnail, thumbnails

log = logging.getLogger("excb.recipe")

SAMPLE_IMAGES = 256          # images decoded to estimate size, colour and orientation
CHECK_IMAGES = 64            # files decoded to check that a preset's data decodes (check_data)
GREY_TOLERANCE = 6           # max channel difference (uint8) still counted as grey (JPEG chroma noise)
GREY_FRACTION = 0.9          # share of sampled images that must be grey for the set to count as grey
IMAGES_PER_CLUSTER = 64
MIN_CLUSTERS, MAX_CLUSTERS = 64, 65536
# (min, max) input size. On a CPU, 28-32 px with a stride-2 stem (14-16 px feature maps): smaller images are
# upsampled, because a stride-1 stem on 20 px has 20x20 maps (about twice the FLOPs of 28 px at stride 2, 14x14).
CPU_SIZES, GPU_SIZES = (28, 32), (32, 224)
DEFAULT_CPU_BUDGET = "10m"   # no epochs/max_steps/budget given: on a CPU, ten minutes
GPU_DEFAULT_EPOCHS, GPU_MIN_STEPS = 100, 5000
# Least native pixels a global / local crop keeps (16x16, 8x8): on small images (digits) the usual crop scales
# would cut out a few pixels and upsample them (opencv-digits, 800 steps: 77.7% -> 85.5% kNN with this rule).
GLOBAL_CROP_PIXELS, LOCAL_CROP_PIXELS = 256, 64
MAX_GLOBAL_SCALE_MIN = 0.6  # 8x8 px digits, 800 steps: 0.6 -> 94.4% kNN, 0.8 -> 91.1% (too little to learn from)
# Grey data on a CPU trains at twice cpu-small's learning rate (validation, 600 steps, side by side: opencv-digits
# 86.3 -> 92.4 / 85.8 -> 91.8 % kNN (2 seeds), UCI digits 96.9 -> 97.9 %; colour icons at 4e-3: -1.9 / +1.3, seed
# noise, so not applied there).
GREY_CPU_LR_FACTOR = 2.0


@dataclass
class DataProfile:
    """What :func:`fit` needs to know about a data set."""

    images: int
    short_side: int | None            # median short side of the sampled images (None: unknown, e.g. shards)
    long_side: int | None
    grey: bool | None                 # None: unknown
    sampled: int = 0
    mirror_ratio: float | None = None  # excb.training.mirror.mirror_ratio of the sample (None: not measured)

    def describe(self) -> str:
        size = f"median {self.short_side}x{self.long_side} px" if self.short_side else "size unknown"
        colour = {True: "grey", False: "colour", None: "colour unknown"}[self.grey]
        return f"{self.images} images, {size}, {colour}"


@dataclass
class Recipe:
    """Fitted choices (a nested override tree) and why each was made."""

    profile: DataProfile
    device: str
    choices: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"profile": asdict(self.profile), "device": self.device, "choices": self.choices,
                "reasons": self.reasons}


# ------------------------------------------------------------------------------------------------ inspection
def _median(values: list[int]) -> int | None:
    return sorted(values)[len(values) // 2] if values else None


def _is_grey(image: Any) -> bool:
    """RGB image whose channels agree within the tolerance everywhere (on a small thumbnail)."""
    import numpy as np

    thumb = image.copy()
    thumb.thumbnail((32, 32))
    a = np.asarray(thumb.convert("RGB"), dtype=np.int16)
    return int(np.abs(a[..., 0] - a[..., 1]).max()) <= GREY_TOLERANCE and \
        int(np.abs(a[..., 1] - a[..., 2]).max()) <= GREY_TOLERANCE


def _profile_arrays(images: Any) -> DataProfile:
    n, h, w = images.shape[:3]
    sample = torch.from_numpy(images[evenly_spaced(n, SAMPLE_IMAGES)]).float().unsqueeze(1)
    return DataProfile(images=n, short_side=min(h, w), long_side=max(h, w), grey=True, sampled=n,
                       mirror_ratio=mirror_ratio(thumbnails(sample)))


def _profile_files(ds: Any) -> DataProfile:
    """Decode an evenly spaced sample of files (the same safe decoder training uses); too few decodable images
    stop here with one line (excb.data.datasets.DecodeTally.check), before anything is fitted to them."""
    shorts, longs, greys, thumbs = [], [], 0, []
    tally = DecodeTally(ds.source, len(ds))
    for image in ds.decoded_sample(SAMPLE_IMAGES, tally):
        w, h = image.size
        shorts.append(min(w, h))
        longs.append(max(w, h))
        greys += _is_grey(image)
        thumbs.append(pil_thumbnail(image))
    tally.check()
    seen = len(shorts)
    grey = (greys >= GREY_FRACTION * seen) if seen else None
    ratio = mirror_ratio(torch.stack(thumbs)) if seen else None
    return DataProfile(images=len(ds), short_side=_median(shorts), long_side=_median(longs), grey=grey,
                       sampled=seen, mirror_ratio=ratio)


def _open(cfg: TrainConfig) -> Any:
    return build_dataset(cfg.data.source.strip(), split=cfg.data.split, limit=cfg.data.limit,
                         max_pixels=cfg.data.max_image_pixels)


def inspect_data(cfg: TrainConfig) -> DataProfile:
    """Count, size and colour of ``cfg.data`` (shards: count only, from their index)."""
    source = cfg.data.source.strip()
    if source.startswith("shards:"):
        index = read_index(source[len("shards:"):])
        total = sum(index.counts)
        return DataProfile(images=min(total, cfg.data.limit or total), short_side=None, long_side=None, grey=None)
    ds = _open(cfg)
    if isinstance(ds, ArrayDataset):
        return _profile_arrays(ds.images)
    return _profile_files(ds)


def check_data(cfg: TrainConfig) -> None:
    """The data check of a run whose recipe is not fitted now (a preset): as :func:`inspect_data` does, stop with
    one line when too few files decode, on a smaller sample (nothing else is measured from it)."""
    if cfg.data.source.strip().startswith("shards:"):
        return
    ds = _open(cfg)
    if isinstance(ds, ImageFileDataset):
        tally = DecodeTally(ds.source, len(ds))
        for _ in ds.decoded_sample(CHECK_IMAGES, tally):
            pass
        tally.check()


# ------------------------------------------------------------------------------------------------- fitting
def _pow2_floor(x: float) -> int:
    return 2 ** max(int(math.floor(math.log2(max(x, 1.0)))), 0)


def _pow2_round(x: float) -> int:
    return 2 ** max(int(round(math.log2(max(x, 1.0)))), 0)


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


class _Fitter:
    """Collects choices; a pinned key keeps the user's value (and later choices read that value)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.current = cfg.model_dump(mode="json")
        self.pinned = set(cfg.pinned)
        self.choices: dict[str, Any] = {}
        self.reasons: list[str] = []

    def is_pinned(self, key: str) -> bool:
        return key in self.pinned or any(key.startswith(p + ".") for p in self.pinned)

    def set(self, key: str, value: Any, why: str | None = None) -> Any:
        """Choose ``value`` for ``key`` unless the user pinned it; returns the value in effect."""
        if self.is_pinned(key):
            return _get(self.current, key)
        node = self.choices
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        cur = self.current
        for part in parts[:-1]:
            cur = cur[part]
        cur[parts[-1]] = value
        if why:
            self.reasons.append(f"{key}={value}: {why}")
        return value


def _input_size(f: _Fitter, p: DataProfile, on_gpu: bool) -> int:
    low, cap = GPU_SIZES if on_gpu else CPU_SIZES
    native = p.short_side or cap
    size = int(min(max(native, low), cap))
    size -= size % 2
    why = (f"the images' median short side is {p.short_side} px" if p.short_side else "image size unknown")
    where = "GPU" if on_gpu else "CPU"
    if p.short_side and native > cap:
        why += f"; capped at {cap} px on {where} so a budget buys enough steps"
    elif p.short_side and native < low:
        why += f"; upsampled to {low} px, the cheapest size on {where} that keeps >= 14 px feature maps"
    if _library_backbone(f):
        size = _library_size(size)
        why += f"; {size} px, a multiple of {LIBRARY_SIZE_STEP} as the library's downsampling stages and patches need"
    return f.set("augment.global_size", size, why)


LIBRARY_SIZE_STEP = 32  # a torchvision/timm backbone: 5 stride-2 stages (ResNet, ConvNeXt) or 16/32 px patches


def _library_backbone(f: _Fitter) -> bool:
    """A torchvision:/timm: backbone (always the user's: the recipe picks only ours)."""
    return is_external(str(_get(f.current, "model.backbone")))


def _library_size(size: int) -> int:
    """The nearest multiple of 32, at least 32: a size every library architecture takes."""
    return max(LIBRARY_SIZE_STEP, LIBRARY_SIZE_STEP * round(size / LIBRARY_SIZE_STEP))


def _model(f: _Fitter, p: DataProfile, size: int, on_gpu: bool) -> None:
    small = size <= 64
    f.set("model.small_images", small)
    if not on_gpu:
        f.set("model.stem_stride", 2 if size >= 28 else 1,
              "a stride-2 3x3 stem (a quarter of the feature-map area), as cpu-small on CPU")
        f.set("model.backbone", "resnet18")
        f.set("model.width", 16, "ResNet-18 at width 16: the model cpu-small was tuned with on a 2-core CPU")
        head = {"projector_hidden_dim": 512, "bottleneck_dim": 128, "predictor_hidden_dim": 512}
        if not is_external(str(_get(f.current, "model.backbone"))):  # measured on our ResNet; a library's
            f.set("model.embedding", "multiscale", "a CPU budget stops early, where the last 3 stages together "
                  "rank neighbours better than the last alone (kNN +2.6 to +3.9 points at 800 steps; within a "
                  "point at 2400-2900)")  # architecture serves its own pre-logits unless multiscale is asked for
    else:
        f.set("model.backbone", "resnet18" if p.images < 200_000 else "resnet50",
              f"{'ResNet-18' if p.images < 200_000 else 'ResNet-50'} for {p.images} images on a GPU")
        f.set("model.width", 64)
        head = {"projector_hidden_dim": 2048, "bottleneck_dim": 256, "predictor_hidden_dim": 2048}
    for key, value in head.items():
        f.set(f"model.{key}", value)
    f.set("model.sync_bn", on_gpu)
    f.set("model.whitening", "pca", "the served embedding is PCA-whitened on the run's own images when training "
          "ends, so no few directions dominate its cosines (suite, same teachers: kNN +0.3 to +6 points)")


def _clusters(f: _Fitter, p: DataProfile) -> None:
    k = int(min(max(_pow2_round(p.images / IMAGES_PER_CLUSTER), MIN_CLUSTERS), MAX_CLUSTERS))
    k = min(k, _pow2_floor(p.images / 4))  # a tiny folder: k-means needs several points per centroid
    f.set("model.num_clusters", k, f"about one cluster per {IMAGES_PER_CLUSTER} images ({p.images} images), "
          f"within [{MIN_CLUSTERS}, {MAX_CLUSTERS}] and at most a quarter of the images")
    f.set("kmeans.samples", min(p.images, 10_000 if k <= 4096 else 500_000))
    f.set("kmeans.iterations", 20)


def _batch(f: _Fitter, p: DataProfile, on_gpu: bool, world: int) -> int:
    cap = 512 if on_gpu else 128
    batch = int(min(cap, max(_pow2_floor(p.images / 8), 16)))
    batch = max(batch - batch % world, world)
    return f.set("batch_size", batch, f"at most {cap} on {'GPU' if on_gpu else 'CPU'} and at least 8 steps per "
                 f"epoch ({p.images // batch} at this batch); more updates beat bigger batches at a fixed budget")


def _crops(f: _Fitter, p: DataProfile, size: int) -> None:
    local = max(8, int(round(size * 4 / 7)) // 2 * 2)
    why = "4/7 of the global crop, as cpu-small's 16 px locals at 28 px"
    if _library_backbone(f):
        local = min(_library_size(local), size)
        why += f", at a multiple of {LIBRARY_SIZE_STEP} px for the library's backbone"
    f.set("augment.local_size", local, why)
    f.set("augment.num_local_crops", 4)
    area = (p.short_side or 0) * (p.long_side or 0)
    end = min(max(GLOBAL_CROP_PIXELS / area, 0.3), MAX_GLOBAL_SCALE_MIN) if area else 0.3
    local_min = min(max(LOCAL_CROP_PIXELS / area, 0.1), end / 2) if area else 0.1
    scale_why: str | None = None
    if end > 0.3:
        scale_why = (f"{p.short_side}x{p.long_side} px images: crops keep >= {GLOBAL_CROP_PIXELS} (global) and "
                     f">= {LOCAL_CROP_PIXELS} (local) of the image's own pixels, so they are not blown-up blur")
    f.set("augment.global_scale_min_start", round(min(end + 0.1, 0.9), 3), scale_why)
    f.set("augment.global_scale_min_end", round(end, 3))
    f.set("augment.local_scale_min", round(local_min, 3))


def _optim(f: _Fitter, p: DataProfile, batch: int, on_gpu: bool) -> None:
    base, why = 2e-3, "AdamW 2e-3 at batch 128 (cpu-small), square-root scaled with the batch"
    if p.grey and not on_gpu:
        base *= GREY_CPU_LR_FACTOR
        why = (f"grey images on a CPU: AdamW {base:g} at batch 128 ({GREY_CPU_LR_FACTOR:g}x cpu-small's 2e-3), "
               "square-root scaled with the batch; a short run learns digits faster (validation, 600 steps: "
               "opencv-digits kNN 86.3 -> 92.4 % and 85.8 -> 91.8 % over two seeds, UCI digits 96.9 -> 97.9 %; "
               "colour icons at 4e-3 moved -1.9 / +1.3 over two seeds, so colour keeps 2e-3)")
    lr = round(base * math.sqrt(batch / 128), 6)
    f.set("optim.name", "adamw")
    f.set("optim.lr", lr, why)
    f.set("optim.weight_decay", 0.04)
    f.set("optim.weight_decay_end_factor", 10.0)
    f.set("optim.lr_min_factor", 0.01)
    f.set("balancing.size_momentum", 0.999)
    if not on_gpu:
        f.set("ema_momentum_start", 0.99, "a faster-following teacher for runs of a few thousand steps")
        f.set("ema_momentum_end", 0.998)


def _flip(f: _Fitter, p: DataProfile) -> None:
    if p.mirror_ratio is None:
        return
    if p.mirror_ratio > MIRROR_RATIO_MAX:
        f.set("augment.flip_p", 0.0, f"mirrored images lie {p.mirror_ratio:.2f}x farther from the data than the "
              f"images do (> {MIRROR_RATIO_MAX}): the data has a handedness (as digits, text, or objects always shown "
              "facing one way), so no flips")
    else:
        f.set("augment.flip_p", 0.5, f"mirrored images lie {p.mirror_ratio:.2f}x as far from the data as the "
              f"images do (<= {MIRROR_RATIO_MAX}): both orientations occur, so flips")


def _colour(f: _Fitter, p: DataProfile) -> None:
    if p.grey:
        f.set("augment.solarize_p", 0.0, "grey images: colour-only augmentations off")
    else:
        f.set("augment.solarize_p", 0.2)


def _device_settings(f: _Fitter, on_gpu: bool) -> None:
    if not on_gpu:
        f.set("device", "cpu")
        f.set("precision", "fp32")
        f.set("channels_last", True, "NHWC convolutions: 1.2-1.5x the train step of this model on a CPU "
              "(oneDNN), same arithmetic")
        f.set("data.gpu_augment", "on", "batched tensor multi-crop: 1.8x the img/s of per-image crops on CPU")
        f.set("compile", "off", "a cold torch.compile costs about a minute of a CPU budget for a 1.2x step")
        f.set("checkpoint_every_steps", 200)
        f.set("histogram_every_steps", 20)


def _length(f: _Fitter, on_gpu: bool, steps_per_epoch: int) -> None:
    """No budget, epochs or max_steps given: CPUs get a default budget, GPUs a step count."""
    if any(f.is_pinned(k) for k in ("budget", "epochs", "max_steps")):
        return
    if not on_gpu:
        f.set("budget", DEFAULT_CPU_BUDGET, "no epochs, max_steps or budget given: a 10-minute CPU budget "
              "(calibrated to a step count on this machine)")
        return
    steps = max(GPU_DEFAULT_EPOCHS * steps_per_epoch, GPU_MIN_STEPS)
    f.set("epochs", math.ceil(steps / steps_per_epoch), f"no length given: {steps} steps "
          f"(max of {GPU_DEFAULT_EPOCHS} epochs and {GPU_MIN_STEPS} steps)")


def fit(cfg: TrainConfig, profile: DataProfile, device: torch.device, world_size: int = 1) -> Recipe:
    """Choices for every key the user did not pin, given the data and the device."""
    on_gpu = device.type == "cuda"
    f = _Fitter(cfg)
    size = _input_size(f, profile, on_gpu)
    _model(f, profile, size, on_gpu)
    _clusters(f, profile)
    batch = _batch(f, profile, on_gpu, world_size)
    _crops(f, profile, size)
    _optim(f, profile, batch, on_gpu)
    _colour(f, profile)
    _flip(f, profile)
    _device_settings(f, on_gpu)
    _length(f, on_gpu, max(profile.images // batch, 1))
    return Recipe(profile=profile, device=str(device), choices=f.choices, reasons=f.reasons)


def apply(cfg: TrainConfig, choices: dict[str, Any], length: dict[str, Any] | None = None) -> TrainConfig:
    """``cfg`` with fitted choices (pinned keys are never in them) and a budget's length merged in."""
    tree = deep_merge(deep_merge(cfg.model_dump(mode="json"), choices), length or {})
    if choices:
        tree["recipe"] = "fitted"
    return validate(tree)


def fit_config(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> tuple[TrainConfig, Recipe | None]:
    """Fit when ``cfg.recipe == "auto"`` (else return it unchanged) and log what was chosen. Either way the data
    is checked first: too few decodable images stop here (UndecodableDataError), with one line."""
    if cfg.recipe != "auto":
        check_data(cfg)
        return cfg, None
    profile = inspect_data(cfg)
    recipe = fit(cfg, profile, device, world_size)
    log.info("recipe fitted to the data (%s) on %s:", profile.describe(), device)
    for line in recipe.reasons:
        log.info("  %s", line)
    if cfg.pinned:
        log.info("  kept as given: %s", ", ".join(cfg.pinned))
    return apply(cfg, recipe.choices), recipe
