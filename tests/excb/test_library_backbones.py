"""Bring your own backbone (issue 32, training): ``model.backbone=torchvision:NAME`` / ``timm:NAME`` trains with the
default recipe, exports to ONNX with a passing parity check, and its weights load with ``strict=True`` into the
library the architecture came from; multiscale uses the libraries' own stage features or is a config error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from excb.config import ConfigError, resolve
from excb.inference.export import export_bundle
from excb.inference.onnx_runtime import OrtEmbedder, load_bundle
from excb.inference.weights_export import export_weights
from excb.models import build_model, load_backbone
from excb.models.external import to_library_keys
from excb.models.weights import META_FILE, WEIGHTS_FILE
from excb.training.trainer import train
from support import embed as es

torch.set_num_threads(1)


def _default_recipe_run(out: Path, backbone: str, *extra: str) -> Path:
    """Two steps of the default recipe (recipe=auto, no preset) on 256 digits with a library backbone."""
    cfg = resolve(overrides=["data=digits", "data.limit=256", "max_steps=2", "progress=false", "data.num_workers=0",
                             f"model.backbone={backbone}", f"out={out}", *extra])
    assert cfg.recipe == "auto" and cfg.preset is None
    train(cfg)
    return out


def _onnx_embeddings(bundle: Path) -> tuple[np.ndarray, np.ndarray]:
    ort = OrtEmbedder(load_bundle(bundle), intra_op_threads=1)
    x = np.stack([ort.preprocess(im) for im in es.digit_images()])
    return x, ort.run(x)[0]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def _check_exports(run: Path, tmp: Path) -> tuple[dict, nn.Module, Path]:
    """ONNX bundle (parity passed) and weights; load_backbone's served embedding equals the bundle's."""
    meta = export_bundle(run, tmp / "bundle", parity_count=32)
    assert meta["parity"]["passed"] and meta["parity"]["min_cosine"] >= 0.9999
    wmeta = export_weights(run, tmp / "weights")
    x, onnx_emb = _onnx_embeddings(tmp / "bundle")
    with torch.no_grad():
        torch_emb = load_backbone(tmp / "weights")(torch.from_numpy(x)).numpy()
    assert torch_emb.shape == onnx_emb.shape and _cosines(torch_emb, onnx_emb).min() >= 0.9999
    return wmeta, load_backbone(tmp / "weights", features="backbone"), tmp / "weights" / WEIGHTS_FILE


def test_torchvision_backbone_trains_exports_and_loads_strict_into_torchvision(tmp_path: Path) -> None:
    import torchvision
    from safetensors.torch import load_file

    run = _default_recipe_run(tmp_path / "run", "torchvision:resnet18")
    meta, ours, weights = _check_exports(run, tmp_path)
    assert meta["architecture"] == "torchvision:resnet18" and meta["key_layout"] == "torchvision"
    assert meta["loads_into"]["torchvision"] == "torchvision.models.get_model('resnet18') with fc = nn.Identity()"
    assert meta["embedding"]["whitening"]["kind"] == "pca"  # the default recipe's served embedding
    theirs = torchvision.models.get_model("resnet18")
    theirs.fc = nn.Identity()
    theirs.load_state_dict(load_file(str(weights)), strict=True)
    x = torch.randn(3, 3, meta["input"]["size"], meta["input"]["size"])
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs.eval()(x), atol=1e-5)


def test_torchvision_multiscale_uses_the_stages(tmp_path: Path) -> None:
    """multiscale on a torchvision ResNet: layer2 and layer3 pooled, then the pre-logits (layer4 pooled)."""
    import torchvision

    cfg = resolve(preset_name="cpu-small", overrides=["model.backbone=torchvision:resnet18",
                                                      "model.embedding=multiscale", "augment.global_size=32"])
    backbone = build_model(cfg, teacher=True).backbone.eval()
    assert backbone.stage_dims == [128, 256, 512]
    x = torch.randn(2, 3, 32, 32)
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    net.load_state_dict(to_library_keys(backbone.state_dict()), strict=True)
    net.eval()
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        s2 = net.layer2(net.layer1(h))
        s3 = net.layer3(s2)
        s4 = net.layer4(s3)
        want = [F.adaptive_avg_pool2d(s, 1).flatten(1) for s in (s2, s3, s4)]
        got = backbone.stage_features(x)
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
        assert torch.allclose(got[-1], backbone(x), atol=1e-6)


def test_multiscale_without_stages_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="multiscale.*model.embedding=final with torchvision:mobilenet_v3_small"):
        resolve(overrides=["model.backbone=torchvision:mobilenet_v3_small", "model.embedding=multiscale"])
    final = resolve(preset_name="cpu-small", overrides=["model.backbone=torchvision:mobilenet_v3_small",
                                                        "augment.global_size=32"])
    assert build_model(final).embed_dim == 1024  # its pre-logits (classifier[:-1])


def test_backbone_names_and_aliases() -> None:
    assert resolve(overrides=["model.arch=timm/test_vit"]).model.backbone == "timm:test_vit"  # LightlyTrain spelling
    assert resolve({"model": {"arch": "torchvision:resnet34"}}).pinned == ["model.backbone"]
    assert resolve(overrides=["arch=resnet50"]).model.backbone == "resnet50"  # ours keep their names
    for bad, why in [("torchvision:resnet_nope", "torchvision has no"), ("timm:nope_net", "timm has no"),
                     ("keras:resnet50", "unknown backbone")]:
        with pytest.raises(ConfigError, match=why):
            resolve(overrides=[f"model.backbone={bad}"])
    with pytest.raises(ConfigError, match="augment.global_size: torchvision:convnext_tiny cannot run on 8 px"):
        build_model(resolve(preset_name="cpu-small", overrides=["model.backbone=torchvision:convnext_tiny",
                                                                "augment.global_size=8"]))


def test_timm_backbone_multiscale_trains_exports_and_loads_strict_into_timm(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import load_file

    run = _default_recipe_run(tmp_path / "run", "timm:test_convnext", "model.embedding=multiscale")
    meta, ours, weights = _check_exports(run, tmp_path)
    assert meta["input"]["size"] == 32  # the recipe's 28 px rounded to a size its 4 stages take (locals too)
    assert meta["embedding"]["kind"] == "multiscale" and meta["embedding"]["dim"] == 32 + 48 + 64
    assert meta["key_layout"] == "timm"
    assert meta["loads_into"]["timm"] == "timm.create_model('test_convnext', num_classes=0)"
    theirs = timm.create_model("test_convnext", pretrained=False, num_classes=0)
    theirs.load_state_dict(load_file(str(weights)), strict=True)
    x = torch.randn(3, 3, meta["input"]["size"], meta["input"]["size"])
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs.eval()(x), atol=1e-5)
    assert json.loads((tmp_path / "weights" / META_FILE).read_text())["backbone"]["dim"] == 64


def test_timm_vit_gets_its_input_size_and_loads_strict(tmp_path: Path) -> None:
    """A fixed-size timm ViT is built for the training size with resampled position embeddings (local crops);
    backbone.json's constructor is the call whose model takes the weights with strict=True."""
    import timm
    from safetensors.torch import load_file

    from excb.models.weights import save_run_backbone

    cfg = resolve(preset_name="cpu-small", overrides=["model.backbone=timm:test_vit", "augment.global_size=32",
                                                      "augment.local_size=16", "model.num_clusters=32"])
    student, teacher = build_model(cfg), build_model(cfg, teacher=True).eval()
    with torch.no_grad():
        assert student.backbone(torch.zeros(2, 3, 16, 16)).shape == (2, 64)  # a local crop
    save_run_backbone(teacher, cfg, tmp_path, step=0)
    meta = json.loads((tmp_path / META_FILE).read_text())
    call = "timm.create_model('test_vit', num_classes=0, img_size=32, dynamic_img_size=True)"
    assert meta["loads_into"]["timm"] == call
    theirs = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32, dynamic_img_size=True)
    theirs.load_state_dict(load_file(str(tmp_path / WEIGHTS_FILE)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher.backbone(x), theirs.eval()(x), atol=1e-5)
