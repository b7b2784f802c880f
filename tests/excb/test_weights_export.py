"""Weights for fine-tuning (issue 15, section 3): backbone.safetensors + backbone.json, load_backbone, and the
exact key layouts of torchvision's resnet50 and timm's vit_small_patch16_224. Issue 27 item 2: load_backbone's
output is the served embedding for the default recipe too (multiscale + PCA whitening), and
features="backbone" is the raw backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from excb.cli import main as excb_main
from excb.inference.onnx_runtime import OrtEmbedder, load_bundle
from excb.models import build_model, load_backbone
from excb.models.weights import META_FILE, WEIGHTS_FILE, WHITENING_FILE, save_backbone, save_run_backbone
from support import embed as es

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
    assert meta["embedding"]["kind"] == "final" and meta["embedding"]["whitening"] == {"kind": "off"}
    assert meta["embed_dim"] == meta["embedding"]["dim"] == meta["backbone"]["dim"] == 64
    assert not (out / WHITENING_FILE).exists()
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
        ours, theirs, loaded = teacher.backbone(x), tv.eval()(x), load_backbone(tmp_path, features="backbone")(x)
    assert torch.allclose(ours, theirs, atol=1e-5) and torch.allclose(ours, loaded, atol=1e-6)


def test_vit_small_keys_load_strict_into_timm(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    cfg, teacher = _fresh_teacher("vit_small", 32, "model.patch_size=16", "model.mlp_bn=false")
    save_backbone(teacher, cfg, tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["key_layout"] == "timm" and "vit_small_patch16_224" in meta["loads_into"]["timm"]

    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32)
    vit.load_state_dict(load_file(str(tmp_path / WEIGHTS_FILE)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs, loaded = teacher.backbone(x), vit.eval()(x), load_backbone(tmp_path, features="backbone")(x)
    assert torch.allclose(ours, theirs, atol=1e-4) and torch.allclose(ours, loaded, atol=1e-6)


def _default_recipe_run(root: Path) -> Path:
    """A short fixed-step run of the default recipe (no preset: recipe=auto) with the embedding it serves on a
    CPU pinned, so a GPU machine trains the same: multiscale, PCA-whitened at the end of the run."""
    from excb.config import resolve
    from excb.training.trainer import train

    out = root / "run"
    train(resolve(overrides=["data=digits", "data.limit=256", "max_steps=3", "device=cpu", "progress=false",
                             "data.num_workers=0", "model.embedding=multiscale", "model.whitening=pca",
                             f"out={out}"]))
    return out


def test_default_recipe_weights_give_the_served_embedding(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from excb.inference.export import export_bundle

    run = _default_recipe_run(tmp_path)
    model_json = export_bundle(run, tmp_path / "bundle", parity_count=32)
    assert model_json["whitening"]["kind"] == "pca" and model_json["whitening"]["fitted"]
    out = tmp_path / "weights"
    assert excb_main(["export", str(run), "--format", "torch", "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    meta = json.loads((out / META_FILE).read_text())
    served, backbone = meta["embedding"], meta["backbone"]
    assert served["kind"] == "multiscale" and served["whitening"]["kind"] == "pca" and served["whitening"]["fitted"]
    assert served["dim"] == meta["embed_dim"] == model_json["embed_dim"] == line["embed_dim"] == 32 + 64 + 128
    assert backbone["dim"] == line["backbone_dim"] == 128 and meta["key_layout"] == "torchvision"

    ort = OrtEmbedder(load_bundle(tmp_path / "bundle"), intra_op_threads=1)
    x = np.stack([ort.preprocess(im) for im in es.digit_images()])
    onnx_emb, _ = ort.run(x)
    with torch.no_grad():
        torch_emb = load_backbone(out)(torch.from_numpy(x)).numpy()
        raw = load_backbone(out, features="backbone")(torch.from_numpy(x)).numpy()
    assert torch_emb.shape == onnx_emb.shape and _cosines(torch_emb, onnx_emb).min() >= 0.9999
    assert raw.shape == (len(x), 128)
    # the run directory's own copy (written by the trainer after the whitening fit) is the same embedding
    with torch.no_grad():
        run_emb = load_backbone(run)(torch.from_numpy(x)).numpy()
    assert _cosines(run_emb, onnx_emb).min() >= 0.9999


def test_weights_without_the_embedding_record_name_the_way_out(tmp_path: Path) -> None:
    cfg, teacher = _fresh_teacher("resnet18", 16)
    save_backbone(teacher, cfg, tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    del meta["embedding"]  # as written before issue 27
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="features='backbone'"):
        load_backbone(tmp_path)
    assert load_backbone(tmp_path, features="backbone")(torch.randn(1, 3, 16, 16)).shape == (1, 64)
    with pytest.raises(ValueError, match="features: expected one of embedding, backbone"):
        load_backbone(tmp_path, features="pixels")
