"""Teacher backbone weights for fine-tuning: ``backbone.safetensors`` + ``backbone.json``.

ONNX bundles serve; people who fine-tune want a weights file they load into their own model. The tensors are
stored under the names of the library users already have: torchvision's for ResNets (our ResNet keeps them,
so ``resnet50`` loads ``strict=True`` into ``torchvision.models.resnet50()`` with ``fc = Identity``) and
timm's for ViTs (``vit_small`` -> ``vit_small_patch16_224`` with ``num_classes=0``). :func:`load_backbone`
maps them back onto this project's modules, so its features are the ONNX bundle's ``embedding`` output.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

WEIGHTS_FILE = "backbone.safetensors"
META_FILE = "backbone.json"
FORMAT = "excb-backbone/1"

# our ViT module names -> timm's (everything else is already the same)
_VIT_TO_TIMM: tuple[tuple[str, str], ...] = (
    ("patch_embed.", "patch_embed.proj."),
    (".mlp.0.", ".mlp.fc1."),
    (".mlp.2.", ".mlp.fc2."),
)


def _is_vit(arch: str) -> bool:
    return arch.startswith("vit")


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """Apply each rename once: a pair starting with "." is an infix, any other a prefix."""
    for old, new in pairs:
        if old.startswith("."):
            key = key.replace(old, new, 1)
        elif key.startswith(old):
            key = new + key[len(old):]
    return key


def to_ecosystem_keys(state: dict[str, Tensor], arch: str) -> dict[str, Tensor]:
    """Our backbone state dict -> torchvision (ResNet: identical) or timm (ViT) key names."""
    if not _is_vit(arch):
        return dict(state)
    return {_rename(k, _VIT_TO_TIMM): v for k, v in state.items()}


def from_ecosystem_keys(state: dict[str, Tensor], arch: str) -> dict[str, Tensor]:
    """The inverse of :func:`to_ecosystem_keys`."""
    if not _is_vit(arch):
        return dict(state)
    back = tuple((new, old) for old, new in _VIT_TO_TIMM)
    return {_rename(k, back): v for k, v in state.items()}


def _compatible_with(cfg: Any) -> dict[str, Any]:
    """Which third-party constructor these exact tensors load into with strict=True (None: none does)."""
    m, size = cfg.model, int(cfg.augment.global_size)
    from excb.models.backbones import resolve_small_images

    out: dict[str, Any] = {"torchvision": None, "timm": None}
    if m.backbone in ("resnet18", "resnet34", "resnet50") and m.width == 64 and not resolve_small_images(m, size):
        out["torchvision"] = f"torchvision.models.{m.backbone}() with fc = nn.Identity()"
    if m.backbone == "vit_small" and m.patch_size == 16:
        out["timm"] = f"timm.create_model('vit_small_patch16_224', num_classes=0, img_size={size})"
    return out


def backbone_meta(cfg: Any, embed_dim: int, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a loader needs to rebuild the backbone and feed it: architecture, input size, mean/std."""
    m, a = cfg.model, cfg.augment
    return {
        "format": FORMAT,
        "architecture": m.backbone,
        "model": {"backbone": m.backbone, "width": m.width, "small_images": m.small_images,
                  "stem_stride": m.stem_stride, "patch_size": m.patch_size},
        "input": {"size": int(a.global_size), "channels": 3, "layout": "NCHW", "mean": list(a.mean),
                  "std": list(a.std), "transform": "excb.data.augment.eval_transform"},
        "embed_dim": int(embed_dim),
        "feature": "CLS token after the final LayerNorm" if _is_vit(m.backbone) else "global-average-pooled",
        "key_layout": "timm" if _is_vit(m.backbone) else "torchvision",
        "loads_into": _compatible_with(cfg),
        "source": source or {},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def save_backbone(backbone: nn.Module, cfg: Any, out_dir: str | os.PathLike[str],
                  source: dict[str, Any] | None = None) -> Path:
    """Write ``backbone.safetensors`` + ``backbone.json`` for ``backbone`` (a teacher's, usually); returns the
    weights path. Tensors are copied to CPU and made contiguous (safetensors refuses shared storage)."""
    from safetensors.torch import save

    from excb.fileio import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = cfg.model.backbone
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in backbone.state_dict().items()}
    tensors = to_ecosystem_keys(state, arch)
    meta = backbone_meta(cfg, int(getattr(backbone, "embed_dim")), source)
    weights = out / WEIGHTS_FILE
    atomic_write(weights, save(tensors, metadata={"format": FORMAT, "architecture": arch}))
    atomic_write(out / META_FILE, json.dumps(meta, indent=1))
    return weights


def save_run_backbone(teacher: nn.Module, cfg: Any, run_dir: str | os.PathLike[str], step: int | None = None) -> Path:
    """The trainer's end-of-run hook: the teacher's backbone into ``run_dir`` (``teacher`` may be DDP/compiled)."""
    inner = getattr(teacher, "module", teacher)
    inner = getattr(inner, "_orig_mod", inner)
    source = {"run_dir": str(Path(run_dir).resolve()), "step": step}
    return save_backbone(inner.backbone, cfg, run_dir, source)


def export_weights(source: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``excb export RUN --format torch``: the teacher backbone of a run (or checkpoint); returns backbone.json."""
    from excb.checkpoint import load_teacher

    cfg, model, ckpt, ckpt_path = load_teacher(source, "cpu")
    save_backbone(model.backbone, cfg, out_dir, {"checkpoint": str(ckpt_path.resolve()),
                                                  "step": int(ckpt.get("step", 0))})
    return json.loads((Path(out_dir) / META_FILE).read_text())


def cmd_export_weights(source: str, out: str) -> int:
    """CLI body of ``excb export RUN --format torch --out DIR``: one JSON line, or ``excb export: ...`` + 2."""
    import sys

    try:
        meta = export_weights(source, out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"excb export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"weights": str((Path(out) / WEIGHTS_FILE).resolve()), "architecture": meta["architecture"],
                      "embed_dim": meta["embed_dim"], "loads_into": meta["loads_into"]}))
    return 0


def read_backbone_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """backbone.json of a weights dir, with a clear error when it is not one."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file() or not (Path(path) / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path}: expected {WEIGHTS_FILE} and {META_FILE} (excb export RUN --format torch)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def load_backbone(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild this project's backbone from a weights dir, eval mode; output = the bundle's ``embedding``."""
    from safetensors.torch import load_file

    from excb.config import ModelConfig
    from excb.models.backbones import build_backbone

    meta = read_backbone_meta(path)
    cfg = ModelConfig.model_validate(meta["model"])
    module = build_backbone(cfg, int(meta["input"]["size"]), 0.0)
    state = from_ecosystem_keys(load_file(str(Path(path) / WEIGHTS_FILE)), meta["architecture"])
    module.load_state_dict(state, strict=True)
    return module.to(device).eval()


__all__ = ["WEIGHTS_FILE", "META_FILE", "backbone_meta", "save_backbone", "save_run_backbone", "export_weights",
           "cmd_export_weights", "load_backbone", "read_backbone_meta", "to_ecosystem_keys", "from_ecosystem_keys"]
