"""Training configuration: one pydantic schema for the CLI, YAML files and the job API.

The same :class:`TrainConfig` validates ``excb train key=value ...``, a YAML/JSON file and the body of
``POST /v1/jobs``. Unknown keys are rejected (``extra="forbid"``) so a typo names the bad field instead
of silently training with a default.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from excb.errors import ConfigError  # re-exported: excb.config.ConfigError is the public name


def _yaml_on_off(value: object) -> object:
    """YAML (and ``key=true`` overrides) read ``on``/``off`` as booleans; map them back for auto/on/off fields."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


# compile=auto: a cold compile (~1 min, 2 CPU cores) breaks even near here; cached ones (~3 s) at once
COMPILE_MIN_STEPS = 2000


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


BUILTIN_BACKBONES = ("resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small")


class ModelConfig(_Section):
    """Backbone and heads (method.md §1)."""

    backbone: str = Field(
        "resnet18", description=f"one of ours ({', '.join(BUILTIN_BACKBONES)}), or any torchvision or timm "
        "classification architecture by name: torchvision:resnet34, timm:convnext_tiny (timm/NAME, LightlyTrain's "
        "spelling, reads the same; timm needs pip install 'excb[timm]'). Built untrained without its classifier; "
        "width, small_images, stem_stride and patch_size apply to ours only; model.arch is another name for it")
    small_images: bool | None = Field(
        None, description="3x3 stem without max-pool (28-64 px data). None: decided from image size."
    )
    stem_stride: Literal[1, 2] = Field(
        1, description="stride of the small-image 3x3 stem: 2 halves every feature map (~6x cheaper at 28 px)"
    )
    width: int = Field(64, ge=4, le=256, description="ResNet base channel width (64 = torchvision's)")
    patch_size: int = Field(16, ge=2, le=32)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0, description="student only; teacher uses 0")
    num_clusters: int = Field(65536, ge=2)
    projector_hidden_dim: int = Field(2048, ge=8)
    projector_hidden_layers: int = Field(2, ge=0, le=4)
    bottleneck_dim: int = Field(256, ge=4)
    predictor: bool = True
    predictor_hidden_dim: int = Field(2048, ge=8)
    mlp_bn: bool = True
    activation: Literal["relu", "gelu"] = "relu"
    sync_bn: bool = Field(True, description="convert BatchNorm to SyncBatchNorm under torchrun")
    embedding: Literal["final", "multiscale"] = Field(
        "final", description="the embedding served and evaluated: 'final' = the pooled last stage (the reference's "
        "feature); 'multiscale' = the last 3 stages (ViT: blocks) pooled, each L2-normalised, concatenated")
    whitening: Literal["off", "pca"] = Field(
        "off", description="'pca': when training ends, PCA-whiten the embedding on the run's own training images "
        "(excb.models.whitening; part of the checkpoint and the ONNX bundle); 'off': serve it as the backbone gives it")

    _on_off = field_validator("whitening", mode="before")(_yaml_on_off)

    @field_validator("backbone", mode="before")
    @classmethod
    def _check_backbone(cls, value: Any) -> Any:
        """Ours by name, or ``LIBRARY:NAME`` / ``LIBRARY/NAME`` checked against that library's model list."""
        if not isinstance(value, str) or value in BUILTIN_BACKBONES:
            return value
        lib, sep, arch = value.replace("/", ":", 1).partition(":")
        if not sep or lib not in ("torchvision", "timm"):
            raise ValueError(f"unknown backbone {value!r}: choose one of {', '.join(BUILTIN_BACKBONES)}, or "
                             "torchvision:NAME / timm:NAME")
        from excb.models.external import check_arch

        return check_arch(f"{lib}:{arch}")

    @model_validator(mode="after")
    def _check_stages(self) -> "ModelConfig":
        """multiscale on a torchvision architecture without named stages: refused here, before any training (a
        timm architecture is checked when built: whether it has ``forward_intermediates``)."""
        if self.embedding == "multiscale" and self.backbone.startswith("torchvision:"):
            from excb.models.external import no_stages_reason, torchvision_stages

            if torchvision_stages(self.backbone.partition(":")[2]) is None:
                raise ValueError(f"model.embedding=multiscale: {no_stages_reason(self.backbone)}")
        return self


class DataConfig(_Section):
    """Where images come from. ``source`` is a folder, ``digits``, ``fashion-mnist[:ROOT]``, ``list:FILE`` or
    ``shards:PATH_OR_URL`` (tar shards written by ``excb data pack``)."""

    source: str = "digits"
    split: Literal["train", "test", "all"] = "train"
    limit: int | None = Field(None, ge=1, description="use only the first N images (deterministic)")
    num_workers: int | None = Field(None, ge=0, description="None: chosen from the machine")
    max_image_pixels: int = Field(64_000_000, ge=1024, description="decompression-bomb cap")
    gpu_augment: Literal["auto", "on", "off"] = Field(
        "auto", description="decode + multi-crop on the training device; auto = on when training on CUDA"
    )
    shuffle_buffer: int = Field(1000, ge=1,
                                description="shards: sources: samples in each loader worker's shuffle buffer")
    cache_mb: int = Field(1024, ge=0, description="image files on the device-augmentation path: decoded items kept "
                          "in memory after their first epoch, up to this many MiB (in-process loading); 0: off")

    _on_off = field_validator("gpu_augment", mode="before")(_yaml_on_off)


class AugmentConfig(_Section):
    """Multi-crop augmentation (method.md §5)."""

    global_size: int = Field(224, ge=8)
    local_size: int = Field(96, ge=8)
    num_local_crops: int = Field(6, ge=0, le=16)
    global_scale_min_start: float = Field(0.26, gt=0.0, le=1.0)
    global_scale_min_end: float = Field(0.14, gt=0.0, le=1.0)
    local_scale_min: float = Field(0.05, gt=0.0, le=1.0)
    flip_p: float = Field(0.5, ge=0.0, le=1.0, description="horizontal flip probability per view")
    jitter_strength: float = Field(0.5, ge=0.0, le=2.0)
    solarize_p: float = Field(0.2, ge=0.0, le=1.0)
    blur_p: tuple[float, float, float] = Field(
        (1.0, 0.1, 1.0), description="configured blur prob. for global 1, global 2, local crops"
    )
    blur_reference_parity: bool = Field(
        False, description="reproduce the reference code's inverted blur probabilities (1-p)"
    )
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


class OptimConfig(_Section):
    """Optimizer and schedules (method.md §4.2-4.3)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.6, gt=0.0)
    lr_min_factor: float = Field(1e-4, ge=0.0, le=1.0)
    warmup_epochs: float = Field(10.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-4, ge=0.0)
    weight_decay_end_factor: float = Field(1.0, gt=0.0, description="cosine wd -> wd*factor")
    centroid_wd_start_factor: float = Field(
        10.0, ge=0.0, description="centroid wd multiplier, cosine from this to 1 (reference 'wdx10c1')"
    )
    clip_grad: float = Field(0.0, ge=0.0, description="per-parameter norm clip; 0 = off")
    fused: bool | None = Field(None, description="fused optimizer kernels; None = when on CUDA")


class BalancingConfig(_Section):
    """Balancing operator and temperatures (method.md §2)."""

    method: Literal["excb", "dino-centering", "none"] = "excb"
    mode: Literal["paper", "reference"] = "reference"
    size_momentum: float = Field(0.999, ge=0.0, lt=1.0, description="m_s of the size EMA")
    teacher_temp: float = Field(0.04, gt=0.0)
    student_temp: float = Field(0.1, gt=0.0)
    center_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="dino-centering only")


class KMeansConfig(_Section):
    """Spherical k-means centroid initialisation (method.md §4.9)."""

    enabled: bool = True
    samples: int = Field(500_000, ge=1)
    iterations: int = Field(50, ge=1)
    chunk_size: int = Field(25_000, ge=1)


class MlflowConfig(_Section):
    """Where ``logger=mlflow`` writes (excb/training/mlflow_logger.py)."""

    tracking_uri: str | None = Field(
        None, description="an MLflow tracking URI (http://host:5000, sqlite:///PATH, databricks); None: "
        "EXCB_MLFLOW_TRACKING_URI, else a local SQLite store in out/mlruns/ (mlflow.db)")
    experiment: str = Field("excb", min_length=1, description="MLflow experiment name (created when missing)")
    run_name: str | None = Field(None, description="MLflow run name; None: the out directory's name")


class EvalConfig(_Section):
    """Optional kNN evaluation during/after training (needs a labelled data set)."""

    knn_every_epochs: int = Field(0, ge=0, description="0 = never during training")
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0.0)
    train_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)


PRESET_NAMES = ("cpu-small", "resnet50-ep400", "vit-s16-ep800")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*$")
_UNIT_SECONDS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
DURATION_FORMS = "a number with a unit: 600s (or sec), 10m (or min), 2h"


def budget_seconds(text: str) -> float:
    """``"10m"``, ``"600s"``, ``"2h"`` -> seconds; raises ValueError naming the accepted forms. A bare number is
    refused: ``budget=10`` is ten minutes to some and ten seconds to others."""
    match = _DURATION.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration; write {DURATION_FORMS}")
    if match.group(2) is None:
        raise ValueError(f"{str(text).strip()} has no unit; write {DURATION_FORMS}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class TrainConfig(_Section):
    """Everything a training run needs; the resolved copy is written to ``RUN_DIR/config.yaml``."""

    preset: str | None = Field(None, description=f"start from a preset ({', '.join(PRESET_NAMES)}); it sets "
                               "recipe=off unless recipe is given")
    recipe: Literal["auto", "off", "fitted"] = Field(
        "auto", description="auto: fit input size, model, K, batch, schedules and length to the data and device "
        "at the start of training (excb/training/recipe.py; keys set explicitly are kept). off: the defaults or the "
        "preset as they are (the default with a preset). fitted: already fitted (written into the run's config.yaml)")
    pinned: list[str] = Field(default_factory=list, description="dotted keys the user set explicitly; the "
                              "fitted recipe never changes them (filled in by resolve())")
    budget: str | None = Field(None, description="compute budget (600s, 10m, 2h): turned into max_steps by timing "
                               "a few real steps on this machine at the start; overrides epochs; resume keeps the "
                               "step count of the first start")
    out: str = "runs/excb"
    seed: int = Field(0, ge=0, le=2**32 - 1, description="the run's seed (every derived seed comes from it); "
                      "0 to 2**32-1, what NumPy and every generator accept")
    epochs: int = Field(100, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(1024, ge=2, description="global batch size (split across ranks)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = Field(True, description="channels-last (NHWC) convolutions: the same arithmetic, "
                                "faster on CUDA and on oneDNN CPUs (1.2-1.5x the cpu-small step on 2 cores)")
    compile: Literal["auto", "on", "off"] = Field(
        "off", description="torch.compile the student and the teacher's forward (1.2x the train-step speed of "
        "cpu-small on 2 CPU cores, after about a minute of compiling; on CPU it needs a C++ compiler). auto = on "
        f"for runs of at least {COMPILE_MIN_STEPS} steps when a C++ compiler is found (CPU) or on CUDA",
    )
    ema_momentum_start: float = Field(0.996, ge=0.0, le=1.0)
    ema_momentum_end: float = Field(1.0, ge=0.0, le=1.0)
    checkpoint_every_steps: int = Field(500, ge=1)
    keep_epoch_checkpoints: bool = False
    log_every_steps: int = Field(1, ge=1)
    histogram_every_steps: int = Field(50, ge=1, description="how often the sorted K*s curve is logged")
    progress: bool = True
    logger: Literal["jsonl", "tensorboard", "mlflow"] = Field(
        "jsonl", description="metrics.jsonl always; tensorboard: also TensorBoard scalars in out/tb "
        "(pip install 'excb[tensorboard]'); mlflow: also MLflow metrics, params and artifacts (the mlflow.* "
        "fields; pip install 'excb[mlflow]')")
    resume: Literal["auto", "never", "must"] = Field(
        "auto", description="auto: continue the run in out if its checkpoint's config matches (fields that may "
        "differ: excb.training.rerun.MAY_CHANGE_ON_RESUME); never: refuse an out that already holds a run; must: fail "
        "without a checkpoint to continue")
    overwrite: bool = Field(False, description="start over in an out that holds a run: its checkpoints, metrics "
                            "and config are moved to out/replaced/STAMP/ first")
    checkpoint: str | None = Field(None, description="warm start a new run from another run's weights (run "
                                   "directory or .pt): student, teacher and, when num_clusters matches, the "
                                   "cluster-size estimate; fresh optimizer and schedules from step 0")
    _on_off = field_validator("compile", mode="before")(_yaml_on_off)
    _recipe_off = field_validator("recipe", mode="before")(
        lambda value: {True: "auto", False: "off"}.get(value, value) if isinstance(value, bool) else value)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    optim: OptimConfig = OptimConfig()
    balancing: BalancingConfig = BalancingConfig()
    kmeans: KMeansConfig = KMeansConfig()
    eval: EvalConfig = EvalConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @field_validator("budget", mode="before")
    @classmethod
    def _check_budget(cls, value: Any) -> Any:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            budget_seconds(str(value))  # budget=10 reads as a number: say the unit is missing, not "not a string"
        return value

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.preset is not None and self.preset not in PRESET_NAMES:
            raise ValueError(f"preset: unknown preset {self.preset!r}; choose one of {', '.join(PRESET_NAMES)}")
        if self.overwrite and self.resume == "must":
            raise ValueError("overwrite: overwrite=true starts over, resume=must continues; choose one")
        if self.augment.global_scale_min_end > self.augment.global_scale_min_start:
            raise ValueError("augment.global_scale_min_end must be <= augment.global_scale_min_start")
        if self.augment.local_scale_min > self.augment.global_scale_min_end:
            raise ValueError("augment.local_scale_min must be <= augment.global_scale_min_end")
        return self


# Short top-level keys users and other tools rely on, mapped to their dotted home.
SHORT_KEYS: dict[str, str] = {
    "data": "data.source",
    "backbone": "model.backbone",
    "arch": "model.backbone",
    "num_clusters": "model.num_clusters",
}

_PRESETS: dict[str, dict[str, Any]] = {
    # Tuned for a 2-core CPU: a small ResNet on 28-32 px images, few clusters, AdamW.
    "cpu-small": {
        "epochs": 30,
        # 128 beat 256 by 4.9 kNN points at the same 10-minute budget (more updates; ExCB stays balanced at
        # small batches); 64 was no better than 128 (RESULTS.md, screening runs).
        "batch_size": 128,
        "device": "cpu",
        "precision": "fp32",
        "channels_last": True,
        "checkpoint_every_steps": 200,
        "histogram_every_steps": 20,
        "model": {
            "backbone": "resnet18",
            "small_images": True,
            "stem_stride": 2,  # 14x14 maps after the stem: ~6x cheaper backbone step, 2x the epochs per minute
            "width": 16,
            "num_clusters": 1024,
            "projector_hidden_dim": 512,
            "projector_hidden_layers": 2,
            "bottleneck_dim": 128,
            "predictor_hidden_dim": 512,
            "sync_bn": False,
        },
        # Batched multi-crop on CPU tensors: 1.8x the img/s of per-image PIL crops at 28 px on 2 cores.
        "data": {"source": "fashion-mnist", "gpu_augment": "on"},
        "augment": {
            "global_size": 28,
            "local_size": 16,
            "num_local_crops": 4,  # 16 px locals are cheap: 4 instead of 2 was +0.2 kNN at a 10-minute budget
            "global_scale_min_start": 0.4,
            "global_scale_min_end": 0.3,
            "local_scale_min": 0.1,
            "solarize_p": 0.0,
        },
        "optim": {"name": "adamw", "lr": 2e-3, "warmup_epochs": 1.0, "weight_decay": 0.04,
                  "weight_decay_end_factor": 10.0, "lr_min_factor": 0.01},
        # The reference m_s = 0.999 (a 0.99 EMA was tried first: noisier sizes, the balancer overrode the
        # teacher's argmax for 52-78% of rows, 75.2% vs 79.9% Fashion-MNIST kNN at 716 steps; RESULTS.md).
        "balancing": {"size_momentum": 0.999},
        # Short CPU runs: a faster-following teacher (the reference 0.996 suits 100s of epochs) that never
        # freezes: ending at 1.0, it all but stops following a run of a few thousand steps in its last third
        # (with it and batch 128 together: 78.6% -> 83.6% kNN at a 10-minute budget; RESULTS.md).
        "ema_momentum_start": 0.99,
        "ema_momentum_end": 0.998,
        "kmeans": {"samples": 10_000, "iterations": 20},
        # 1.2x the train-step speed once compiled; auto skips it for short runs and machines without g++.
        "compile": "auto",
    },
    # Reference hyper-parameters, method.md §6.
    "resnet50-ep400": {
        "epochs": 400,
        "batch_size": 1024,
        "model": {"backbone": "resnet50", "num_clusters": 65536, "mlp_bn": True, "activation": "relu"},
        "optim": {"name": "sgd", "lr": 0.6, "weight_decay": 1e-4, "weight_decay_end_factor": 1.0},
        # The released models saw the reference code's inverted blur, (0, 0.9, 0) for (global 1, global 2,
        # local): reproduce it here. blur_reference_parity=false applies the configured (1.0, 0.1, 1.0), as DINO.
        "augment": {"blur_reference_parity": True},
    },
    "vit-s16-ep800": {
        "epochs": 800,
        "batch_size": 1024,
        "model": {"backbone": "vit_small", "num_clusters": 65536, "mlp_bn": False, "activation": "gelu",
                  "drop_path_rate": 0.1, "patch_size": 16},
        "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 0.04, "weight_decay_end_factor": 10.0},
        "augment": {"blur_reference_parity": True},  # as the released training (see resnet50-ep400)
    },
}


def preset(name: str) -> dict[str, Any]:
    """Return a deep copy of a preset's overrides (raises ``KeyError`` naming the choices)."""
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return copy.deepcopy(_PRESETS[name])


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` laid over ``base``, section by section (neither is modified)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def leaf_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of the leaves of a nested mapping: ``{"optim": {"lr": 1}}`` -> ``["optim.lr"]``."""
    keys: list[str] = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys.extend(leaf_keys(value, dotted + ".") if isinstance(value, Mapping) and value else [dotted])
    return keys


# Dotted names that stand for another field: model.arch, what LightlyTrain users (and issue 32) call the backbone.
FIELD_ALIASES: dict[str, str] = {"model.arch": "model.backbone"}


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"{part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _expand_short_keys(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Move short keys (``data: digits``) to their dotted home, leaving sections untouched."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SHORT_KEYS and not isinstance(value, Mapping):
            _set_dotted(out, SHORT_KEYS[key], value)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    for alias, home in FIELD_ALIASES.items():  # dotted aliases, inside a section (model: {arch: ...}) or not
        section, _, leaf = alias.partition(".")
        if alias in out:
            _set_dotted(out, home, out.pop(alias))
        elif isinstance(out.get(section), Mapping) and leaf in out[section]:
            node = dict(out[section])
            value = node.pop(leaf)
            out[section] = node
            _set_dotted(out, home, value)
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read as YAML so ``1e-3``, ``true`` and ``[1,2]`` work."""
    if "=" not in item:
        raise ConfigError(item, "overrides must look like key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(item, "empty key")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    if isinstance(value, (dict,)):
        value = text
    return key, value


def overrides_to_tree(items: list[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=0.1", "data=digits"]`` into a nested dict (short keys expanded)."""
    return dotted_to_tree(parse_override(item) for item in items)


def dotted_to_tree(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """``[("optim.lr", 0.1), ("data", "digits")]`` -> a nested dict (short keys expanded; a mapping value is laid
    over the section it names), as ``excb.train(**overrides)`` and ``key=value`` overrides both need."""
    tree: dict[str, Any] = {}
    for key, value in pairs:
        home = SHORT_KEYS.get(key) or FIELD_ALIASES.get(key, key)
        if isinstance(value, Mapping) and home in tree and isinstance(tree[home], dict):
            value = deep_merge(tree[home], value)
        _set_dotted(tree, home, value)
    return tree


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "a config file must hold a mapping")
    return data


def resolve(raw: Mapping[str, Any] | None = None, overrides: list[str] | None = None,
            preset_name: str | None = None) -> TrainConfig:
    """Build a validated config: preset < raw (file/JSON body) < ``key=value`` overrides.

    The preset may come from the argument, from ``raw["preset"]`` or from an override ``preset=NAME``.
    """
    body = _expand_short_keys(dict(raw or {}))
    over = overrides_to_tree(list(overrides or []))
    name = over.get("preset") or body.get("preset") or preset_name
    tree: dict[str, Any] = {}
    if name is not None:
        if not isinstance(name, str) or name not in _PRESETS:
            raise ConfigError("preset", f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
        tree = preset(name)
        tree["preset"] = name
        tree["recipe"] = "off"  # a preset is a recipe: fitting starts only when asked for (recipe=auto)
    tree = deep_merge(tree, body)
    tree = deep_merge(tree, over)
    tree["pinned"] = _pinned(body, over)
    return validate(tree)


_NOT_PINNABLE = {"out", "preset", "recipe", "pinned", "data.source", "progress", "resume", "overwrite", "checkpoint"}


def _pinned(body: Mapping[str, Any], over: Mapping[str, Any]) -> list[str]:
    """Keys the user set. A body that already carries ``pinned`` was resolved before (a job's stored config,
    a run's config.yaml): its list is kept rather than every key of the full dump."""
    given = body.get("pinned")
    if isinstance(given, list):
        keys = {str(k) for k in given}
    else:
        keys = set(leaf_keys(body))
    keys |= set(leaf_keys(over))
    return sorted(keys - _NOT_PINNABLE)


def validate(tree: Mapping[str, Any]) -> TrainConfig:
    """Validate a nested dict, turning pydantic's error into a :class:`ConfigError` naming the field."""
    from pydantic import ValidationError

    try:
        return TrainConfig.model_validate(dict(tree))
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ())) or "config"
        if err.get("type") == "extra_forbidden":
            raise ConfigError(field, _unknown_field(field)) from exc
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        raise ConfigError(field, message) from exc


def _unknown_field(field: str) -> str:
    """"not a config field", with the nearest real one (``optim.lrr`` -> ``optim.lr``) when one is close."""
    import difflib

    names = [row[0] for row in config_fields()]
    names += sorted({name.rsplit(".", 1)[0] for name in names if "." in name}) + list(SHORT_KEYS) + list(FIELD_ALIASES)
    close = difflib.get_close_matches(field, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"not a config field{hint} (excb train --help-config lists them all)"


RUN_CONFIG = "config.yaml"  # RUN_DIR/config.yaml: written by the trainer alone (the config it runs, recipe fitted)


def dump_yaml(cfg: TrainConfig) -> str:
    """Serialise a resolved config (round-trips through :func:`resolve`)."""
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


# ------------------------------------------------------------------------------------------ field reference
def _type_name(annotation: Any) -> str:
    """``Literal['a', 'b']`` -> ``a|b``, ``int | None`` -> ``int|None``, ``tuple[float, float]`` as written."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: list[Any]) -> str:
    """Pydantic's ``ge``/``gt``/``le``/``lt`` constraints as text (``>=1, <1``)."""
    signs = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
    return ", ".join(f"{sign}{getattr(m, attr)}" for m in metadata for attr, sign in signs if hasattr(m, attr))


def config_fields(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(dotted name, type, default, description)`` of every leaf field, read from the pydantic schema so the
    reference (``excb train --help-config``) can never drift from what is validated."""
    rows: list[tuple[str, str, str, str]] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += config_fields(annotation, f"{prefix}{name}.")
            continue
        default = info.get_default(call_default_factory=True)
        type_text = _type_name(annotation) + (f" ({bounds})" if (bounds := _bounds(info.metadata)) else "")
        default_text = json.dumps(list(default) if isinstance(default, tuple) else default)
        rows.append((prefix + name, type_text, default_text, (info.description or "").strip()))
    return rows


def format_config_fields(width: int = 100) -> str:
    """The field reference as text: ``name  type = default``, the description wrapped underneath."""
    import textwrap

    short: dict[str, str] = {}
    for alias, home in SHORT_KEYS.items():
        short[home] = f"{short[home]}, {alias}" if home in short else alias
    rows = config_fields()
    name_width = max(len(r[0]) for r in rows)
    lines = ["TrainConfig fields: set them as key=value, in a --config file or in a job body. Defaults are "
             "before a preset or the fitted recipe (recipe=auto) changes them; excb train --dry-run shows the "
             "values a run would use.", ""]
    for name, type_, default, desc in rows:
        lines.append(f"  {name:<{name_width}}  {type_} = {default}")
        text = desc + (f" (short key: {short[name]})" if name in short and "short key" not in desc else "")
        lines += textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6) if text else []
    return "\n".join(lines) + "\n"
