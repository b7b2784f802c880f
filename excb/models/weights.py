"""Teacher weights for fine-tuning: ``backbone.safetensors`` (+ ``whitening.safetensors``) + ``backbone.json``.

ONNX bundles serve; people who fine-tune want a weights file they load into their own model. The backbone's
tensors are stored under the names of the library users already have: torchvision's for ResNets (our ResNet
keeps them, so ``resnet50`` loads ``strict=True`` into ``torchvision.models.resnet50()`` with ``fc = Identity``)
and timm's for ViTs (``vit_small`` -> ``vit_small_patch16_224`` with ``num_classes=0``).

The served embedding is not always the backbone's output: the fitted recipe serves the last 3 stages
concatenated (``model.embedding=multiscale``) and PCA-whitened (``model.whitening=pca``; its ``mean`` and ``proj``
go to ``whitening.safetensors``, so the backbone file keeps loading strict into torchvision / timm).
``backbone.json`` records both outputs: ``embedding`` (kind, whitening, dim) and ``backbone`` (dim, feature).
:func:`load_backbone` returns the served embedding by default (its output is the ONNX bundle's ``embedding``)
and the raw backbone with ``features="backbone"``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from excb.config import ModelConfig
from excb.fileio import atomic_write
from excb.models.backbones import build_backbone, resolve_small_images
from excb.models.base import Backbone
from excb.models.external import LibraryBackbone, from_library_keys, split_arch, to_library_keys
from excb.models.model import MULTISCALE_STAGES, ExCBModel, ServedEmbedding, embedding_dim
from excb.models.whitening import Whitening, whitening_meta

WEIGHTS_FILE = "backbone.safetensors"
WHITENING_FILE = "whitening.safetensors"  # the served embedding's PCA whitening (model.whitening=pca only)
META_FILE = "backbone.json"
FORMAT = "excb-backbone/1"
FEATURES = ("embedding", "backbone")  # load_backbone(features=...): the served embedding, or the raw backbone

# our ViT module names -> timm's (everything else is already the same)
_VIT_TO_TIMM: tuple[tuple[str, str], ...] = (
    ("patch_embed.", "patch_embed.proj."),
    (".mlp.0.", ".mlp.fc1."),
    (".mlp.2.", ".mlp.fc2."),
)


def _is_vit(arch: str) -> bool:
    return arch.startswith("vit")


def _library(arch: str) -> str | None:
    """"torchvision" / "timm" for a backbone brought by name (excb.models.external), None for ours."""
    found = split_arch(arch)
    return found[0] if found else None


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """Apply each rename once: a pair starting with "." is an infix, any other a prefix."""
    for old, new in pairs:
        if old.startswith("."):
            key = key.replace(old, new, 1)
        elif key.startswith(old):
            key = new + key[len(old):]
    return key


def to_ecosystem_keys(state: dict[str, Tensor], arch: str) -> dict[str, Tensor]:
    """Our backbone state dict -> torchvision (ResNet: identical) or timm (ViT) key names; a library's own
    architecture (``torchvision:NAME``, ``timm:NAME``) -> its own names."""
    if _library(arch):
        return to_library_keys(state)
    if not _is_vit(arch):
        return dict(state)
    return {_rename(k, _VIT_TO_TIMM): v for k, v in state.items()}


def from_ecosystem_keys(state: dict[str, Tensor], arch: str) -> dict[str, Tensor]:
    """The inverse of :func:`to_ecosystem_keys`."""
    if _library(arch):
        return from_library_keys(state)
    if not _is_vit(arch):
        return dict(state)
    back = tuple((new, old) for old, new in _VIT_TO_TIMM)
    return {_rename(k, back): v for k, v in state.items()}


def _compatible_with(cfg: Any, backbone: Backbone) -> dict[str, Any]:
    """Which third-party constructor these exact tensors load into with strict=True (None: none does)."""
    m, size = cfg.model, int(cfg.augment.global_size)
    out: dict[str, Any] = {"torchvision": None, "timm": None}
    library = _library(m.backbone)
    if library is not None and isinstance(backbone, LibraryBackbone):  # the library's own module: always
        out[library] = backbone.constructor(size)
        return out
    if m.backbone in ("resnet18", "resnet34", "resnet50") and m.width == 64 and not resolve_small_images(m, size):
        out["torchvision"] = f"torchvision.models.{m.backbone}() with fc = nn.Identity()"
    if m.backbone == "vit_small" and m.patch_size == 16:
        out["timm"] = f"timm.create_model('vit_small_patch16_224', num_classes=0, img_size={size})"
    return out


def _embedding_meta(cfg: Any, model: ExCBModel) -> dict[str, Any]:
    """The served embedding (the ONNX bundle's ``embedding``): kind, whitening, size, and how to load it."""
    kind = cfg.model.embedding
    whitening = whitening_meta(getattr(model, "whiten", None))
    if whitening["kind"] == "pca":
        whitening["file"] = WHITENING_FILE
    what = (f"the last {MULTISCALE_STAGES} stages (ViT: blocks) pooled, each L2-normalised, concatenated"
            if kind == "multiscale" else "the backbone's output")
    return {"kind": kind, "dim": embedding_dim(model.backbone, kind), "whitening": whitening,
            "feature": what + (", then PCA-whitened" if whitening["kind"] == "pca" else ""),
            "load": "excb.models.load_backbone(DIR)"}


def backbone_meta(cfg: Any, model: ExCBModel, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a loader needs to rebuild the backbone and the served embedding, and to feed them: architecture,
    input size, mean/std, and which output is which (``embedding`` = served, ``backbone`` = for fine-tuning)."""
    m, a = cfg.model, cfg.augment
    embedding = _embedding_meta(cfg, model)
    backbone_dim = int(model.backbone.embed_dim)
    return {
        "format": FORMAT,
        "architecture": m.backbone,
        "model": {"backbone": m.backbone, "width": m.width, "small_images": m.small_images,
                  "stem_stride": m.stem_stride, "patch_size": m.patch_size},
        "input": {"size": int(a.global_size), "channels": 3, "layout": "NCHW", "mean": list(a.mean),
                  "std": list(a.std), "transform": "excb.data.augment.eval_transform"},
        "embed_dim": embedding["dim"],  # the served embedding's, as model.json's embed_dim
        "embedding": embedding,
        "backbone": {"dim": backbone_dim, "file": WEIGHTS_FILE,
                     "feature": _backbone_feature(m.backbone),
                     "load": "excb.models.load_backbone(DIR, features='backbone')"},
        "key_layout": _library(m.backbone) or ("timm" if _is_vit(m.backbone) else "torchvision"),
        "loads_into": _compatible_with(cfg, model.backbone),
        "source": source or {},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _backbone_feature(arch: str) -> str:
    if _library(arch):
        return "the library model's pre-logits feature (its classifier removed)"
    return "CLS token after the final LayerNorm" if _is_vit(arch) else "global-average-pooled"


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """CPU, contiguous copies (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_backbone(model: ExCBModel, cfg: Any, out_dir: str | os.PathLike[str],
                  source: dict[str, Any] | None = None) -> Path:
    """Write the weights of ``model`` (an ExCB teacher, usually) to ``out_dir``: ``backbone.safetensors``, the
    whitening (when the model has one) and ``backbone.json``; returns the backbone weights path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = cfg.model.backbone
    tensors = to_ecosystem_keys(_cpu_state(model.backbone), arch)
    meta = backbone_meta(cfg, model, source)
    weights = out / WEIGHTS_FILE
    atomic_write(weights, save(tensors, metadata={"format": FORMAT, "architecture": arch}))
    whiten = getattr(model, "whiten", None)
    if whiten is not None:
        atomic_write(out / WHITENING_FILE, save(_cpu_state(whiten), metadata={"format": FORMAT}))
    else:
        (out / WHITENING_FILE).unlink(missing_ok=True)  # a re-export of another run into the same dir
    atomic_write(out / META_FILE, json.dumps(meta, indent=1))
    return weights


def save_run_backbone(teacher: ExCBModel, cfg: Any, run_dir: str | os.PathLike[str], step: int | None = None) -> Path:
    """The trainer's end-of-run hook: the teacher's weights into ``run_dir`` (``teacher`` may be DDP/compiled)."""
    inner = getattr(teacher, "module", teacher)
    inner = getattr(inner, "_orig_mod", inner)
    source = {"run_dir": str(Path(run_dir).resolve()), "step": step}
    return save_backbone(inner, cfg, run_dir, source)


def read_backbone_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """backbone.json of a weights dir, with a clear error when it is not one."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file() or not (Path(path) / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path}: expected {WEIGHTS_FILE} and {META_FILE} (excb export RUN --format torch)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def load_backbone(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                  features: str = "embedding") -> nn.Module:
    """Rebuild the teacher from a weights dir, eval mode.

    ``features="embedding"`` (default): a :class:`~excb.models.model.ServedEmbedding` whose output is the ONNX
    bundle's ``embedding`` (multiscale and whitened when the run served them). ``features="backbone"``: the raw
    backbone (output: its pooled last stage), the module to fine-tune.
    """
    if features not in FEATURES:
        raise ValueError(f"features: expected one of {', '.join(FEATURES)}, got {features!r}")
    meta = read_backbone_meta(path)
    cfg = ModelConfig.model_validate(meta["model"])
    backbone = build_backbone(cfg, int(meta["input"]["size"]), 0.0)
    state = from_ecosystem_keys(load_file(str(Path(path) / WEIGHTS_FILE)), meta["architecture"])
    backbone.load_state_dict(state, strict=True)
    module = backbone if features == "backbone" else _served_embedding(path, meta, backbone)
    return module.to(device).eval()


def _served_embedding(path: str | os.PathLike[str], meta: dict[str, Any], backbone: Backbone) -> nn.Module:
    """The backbone wrapped into what the bundle serves, as ``backbone.json``'s ``embedding`` describes it."""
    embedding = meta.get("embedding")
    if not isinstance(embedding, dict):
        raise ValueError(f"{Path(path) / META_FILE}: written before the served embedding was recorded; export it "
                         "again (excb export RUN --format torch), or load the backbone with features='backbone'")
    whiten = None
    if embedding["whitening"]["kind"] == "pca":
        whiten = Whitening(int(embedding["dim"]))
        whiten.load_state_dict(load_file(str(Path(path) / WHITENING_FILE)), strict=True)
    return ServedEmbedding(backbone, embedding["kind"], whiten)


__all__ = ["WEIGHTS_FILE", "WHITENING_FILE", "META_FILE", "FEATURES", "backbone_meta", "save_backbone",
           "save_run_backbone", "load_backbone", "read_backbone_meta",
           "to_ecosystem_keys", "from_ecosystem_keys"]
