"""Weights for fine-tuning (issue 15, section 3): backbone.safetensors + backbone.json, load_backbone, and the
exact key layouts of torchvision's resnet50 and timm's vit_small_patch16_224."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from support import embed as es
from excb.cli import main as excb_main
from excb.models import build_model, load_backbone
from excb.models.weights import META_FILE, WEIGHTS_FILE, save_backbone, save_run_backbone
from excb.onnx_runtime import OrtEmbedder, load_bundle

torch.set_num_threads(1)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def _fresh_teacher(backbone: str, size: int, *extra: str) -> tuple[object, nn.Module]:
    """A freshly built teacher with non-trivial BN statistics (so eval-mode differences would show)."""
    from excb.config import resolve

    cfg = resolve(preset_name="cpu-small", overrides=[*es.TINY, f"model.backbone={backbone}",
                                                      f"augment.global_size={size}", *extra])
    torch.manual_seed(3)
    teacher = build_model(cfg, teacher=True)
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return cfg, teacher.eval()


def test_cli_export_torch_matches_the_onnx_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "weights"
    assert excb_main(["export", str(es.trained_run()), "--format", "torch", "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["architecture"] == "resnet18" and Path(line["weights"]) == (out / WEIGHTS_FILE).resolve()
    meta = json.loads((out / META_FILE).read_text())
    assert meta["input"]["size"] == 16 and meta["input"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["model"]["width"] == 8 and meta["source"]["step"] == 6
    assert meta["loads_into"]["torchvision"] is None  # width 8 + small stem: our layout only

    ort = OrtEmbedder(load_bundle(es.bundle()), intra_op_threads=1)
    x = np.stack([ort.preprocess(im) for im in es.digit_images()])
    onnx_emb, _ = ort.run(x)
    module = load_backbone(out)
    assert not module.training
    with torch.no_grad():
        torch_emb = module(torch.from_numpy(x)).numpy()
    assert _cosines(torch_emb, onnx_emb).min() >= 0.9999


def test_export_torch_of_missing_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert excb_main(["export", str(tmp_path / "nope"), "--format", "torch", "--out", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err.startswith("excb export: ")
    with pytest.raises(FileNotFoundError, match="backbone.safetensors"):
        load_backbone(tmp_path)


def test_resnet50_keys_load_strict_into_torchvision(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from torchvision.models import resnet50

    cfg, teacher = _fresh_teacher("resnet50", 32, "model.width=64", "model.small_images=false")
    save_run_backbone(teacher, cfg, tmp_path, step=0)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["key_layout"] == "torchvision" and meta["embed_dim"] == 2048
    assert meta["loads_into"]["torchvision"].startswith("torchvision.models.resnet50()")

    tv = resnet50()
    tv.fc = nn.Identity()
    tv.load_state_dict(load_file(str(tmp_path / WEIGHTS_FILE)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs, loaded = teacher.backbone(x), tv.eval()(x), load_backbone(tmp_path)(x)
    assert torch.allclose(ours, theirs, atol=1e-5) and torch.allclose(ours, loaded, atol=1e-6)


def test_vit_small_keys_load_strict_into_timm(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    cfg, teacher = _fresh_teacher("vit_small", 32, "model.patch_size=16", "model.mlp_bn=false")
    save_backbone(teacher.backbone, cfg, tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["key_layout"] == "timm" and "vit_small_patch16_224" in meta["loads_into"]["timm"]

    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32)
    vit.load_state_dict(load_file(str(tmp_path / WEIGHTS_FILE)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs, loaded = teacher.backbone(x), vit.eval()(x), load_backbone(tmp_path)(x)
    assert torch.allclose(ours, theirs, atol=1e-4) and torch.allclose(ours, loaded, atol=1e-6)
