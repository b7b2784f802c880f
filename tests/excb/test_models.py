"""Tests for excb.models: shapes, centroid gradients, parameter groups, init and export wrapper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50 as tv_resnet50
from torchvision.models.resnet import BasicBlock, Bottleneck

from excb.config import ConfigError, TrainConfig, resolve
from excb.models import GROUP_NAMES, ExCBModel, ExportWrapper, build_model
from excb.models.backbones import VisionTransformer

torch.set_num_threads(1)

K = 32
BOTTLENECK = 16


def tiny_cfg(backbone: str = "resnet18", global_size: int = 16, local_size: int = 8, **model: object) -> TrainConfig:
    """A tiny model config; extra keyword arguments override model.* fields."""
    fields: dict[str, object] = {
        "backbone": backbone, "width": 8, "num_clusters": K, "projector_hidden_dim": 32,
        "projector_hidden_layers": 2, "bottleneck_dim": BOTTLENECK, "predictor_hidden_dim": 32,
        "patch_size": 4,
    }
    fields.update(model)
    return resolve({"model": fields, "augment": {"global_size": global_size, "local_size": local_size}})


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "backbone,small,gsize,lsize,embed",
    [
        ("resnet18", True, 16, 8, 64),
        ("resnet18", False, 32, 16, 64),
        ("resnet34", True, 16, 8, 64),
        ("resnet50", True, 16, 8, 256),
        ("resnet50", False, 32, 16, 256),
        ("vit_tiny", None, 16, 8, 192),
        ("vit_tiny", None, 32, 16, 192),
    ],
)
def test_student_and_teacher_shapes(backbone: str, small: bool | None, gsize: int, lsize: int, embed: int) -> None:
    cfg = tiny_cfg(backbone, gsize, lsize, small_images=small)
    model = build_model(cfg)
    assert model.embed_dim == embed == model.backbone.embed_dim
    b, n_local = 2, 3
    g, loc = images(2 * b, gsize), images(n_local * b, lsize, seed=1)
    proj_z, pred_z = model.forward_student(g, loc)
    assert proj_z.shape == (2 * b, K)
    assert pred_z.shape == ((2 + n_local) * b, K)
    assert model.features(g).shape == (2 * b, embed)
    proj = model.project(g)
    assert proj.shape == (2 * b, BOTTLENECK)
    torch.testing.assert_close(proj.norm(dim=-1), torch.ones(2 * b))
    teacher = build_model(cfg, teacher=True)
    assert teacher.forward_teacher(g).shape == (2 * b, K)
    assert teacher(g).shape == (2 * b, K)  # forward dispatches on the teacher flag (DDP wrapping)
    assert set(teacher.state_dict()) == set(model.state_dict())


def test_student_without_locals_and_ordering() -> None:
    """pred_z rows are [globals..., locals...]: the global rows equal a globals-only pass in eval mode."""
    model = build_model(tiny_cfg()).eval()
    g, loc = images(4, 16), images(6, 8, seed=1)
    with torch.no_grad():
        proj_only, pred_only = model.forward_student(g, None)
        proj_z, pred_z = model.forward_student(g, loc)
        _, pred_loc = model.forward_student(loc, None)
    assert pred_only.shape == (4, K)
    torch.testing.assert_close(proj_z, proj_only)
    torch.testing.assert_close(pred_z[:4], pred_only)
    torch.testing.assert_close(pred_z[4:], pred_loc)


def test_small_images_auto() -> None:
    assert build_model(tiny_cfg(global_size=32)).backbone.conv1.kernel_size == (3, 3)
    big = build_model(tiny_cfg(global_size=96))
    assert big.backbone.conv1.kernel_size == (7, 7)
    assert isinstance(big.backbone.maxpool, nn.MaxPool2d)
    forced = build_model(tiny_cfg(global_size=96, small_images=True)).backbone
    assert forced.conv1.stride == (1, 1) and isinstance(forced.maxpool, nn.Identity)


def test_small_stem_stride_two_halves_every_map() -> None:
    """stem_stride=2: the same weights' shapes, a 2x smaller map after the stem and (at 28 px) 2x2 at layer4."""
    base = build_model(tiny_cfg(global_size=28, local_size=16)).backbone
    fast = build_model(tiny_cfg(global_size=28, local_size=16, stem_stride=2)).backbone
    assert fast.conv1.stride == (2, 2) and base.conv1.stride == (1, 1)
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    x = images(2, 28)
    stem = lambda m: m.relu(m.bn1(m.conv1(x)))  # noqa: E731
    assert stem(fast).shape[-2:] == (14, 14) and stem(base).shape[-2:] == (28, 28)
    deep = lambda m: m.layer4(m.layer3(m.layer2(m.layer1(stem(m)))))  # noqa: E731
    assert deep(fast).shape[-2:] == (2, 2) and deep(base).shape[-2:] == (4, 4)
    assert fast(images(2, 16)).shape == (2, fast.embed_dim)  # a 16 px local crop still reaches 1x1
    with pytest.raises(ConfigError):
        tiny_cfg(stem_stride=3)


def test_vit_position_embedding_interpolation() -> None:
    vit = build_model(tiny_cfg("vit_tiny", 16, 8)).backbone
    assert isinstance(vit, VisionTransformer)
    assert vit.pos_embed.shape == (1, 1 + 16, 192)
    assert vit.pos_embed_for(4, 4) is vit.pos_embed
    small = vit.pos_embed_for(2, 2)
    assert small.shape == (1, 1 + 4, 192)
    torch.testing.assert_close(small[:, 0], vit.pos_embed[:, 0])
    big = vit.pos_embed_for(8, 6)
    assert big.shape == (1, 1 + 48, 192)
    grid = vit.pos_embed[:, 1:].reshape(1, 4, 4, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(big[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 48, 192))
    # a 2x2 -> 4x4 resize of a constant grid stays constant: the resize mixes neighbours, not channels
    with torch.no_grad():
        vit.pos_embed[:, 1:] = 0.5
    torch.testing.assert_close(vit.pos_embed_for(2, 2)[:, 1:], torch.full((1, 4, 192), 0.5))
    vit.eval()  # nn.Module.eval must not be shadowed (reference quirk §10.16)
    assert not vit.training
    assert vit(images(2, 8)).shape == (2, 192)
    assert vit(images(2, 24)).shape == (2, 192)


def test_vit_features_last4() -> None:
    vit = build_model(tiny_cfg("vit_tiny", 16, 8)).backbone.eval()
    x = images(3, 16)
    with torch.no_grad():
        last4 = vit.features_last4(x)
        cls = vit(x)
    assert last4.shape == (3, 4 * 192)
    torch.testing.assert_close(last4[:, -192:], cls)  # the last chunk is the ordinary feature
    assert not torch.allclose(last4[:, :192], cls)


def test_vit_patch_size_must_divide_global_size() -> None:
    with pytest.raises(ConfigError) as info:
        build_model(tiny_cfg("vit_tiny", 18, 8))
    assert info.value.field == "model.patch_size"


def test_teacher_has_no_drop_path() -> None:
    cfg = tiny_cfg("vit_tiny", 16, 8, drop_path_rate=0.3)
    student, teacher = build_model(cfg), build_model(cfg, teacher=True)
    s_rates = [blk.drop_path.p for blk in student.backbone.blocks]
    assert s_rates[0] == 0.0 and s_rates[-1] == pytest.approx(0.3)
    assert all(b > a for a, b in zip(s_rates, s_rates[1:]))  # linear rise over depth
    assert all(blk.drop_path.p == 0.0 for blk in teacher.backbone.blocks)
    teacher.load_state_dict(student.state_dict())
    x = images(4, 16)
    with torch.no_grad():
        torch.manual_seed(0)
        s1, s2 = student.features(x), student.features(x)
        t1, t2 = teacher.features(x), teacher.features(x)
    assert not torch.allclose(s1, s2)  # stochastic depth active in train mode
    torch.testing.assert_close(t1, t2)


@pytest.mark.parametrize("backbone", ["resnet18", "vit_tiny"])
def test_cosines_in_range_and_fp32_under_autocast(backbone: str) -> None:
    model = build_model(tiny_cfg(backbone))
    g, loc = images(4, 16), images(4, 8, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.features(g).dtype == torch.bfloat16  # autocast reaches the backbone...
        proj_z, pred_z = model.forward_student(g, loc)
        z = model.cluster_similarities(g)
    for out in (proj_z, pred_z, z):
        assert out.dtype == torch.float32  # ...but the centroid layer stays fp32
        assert out.abs().max() <= 1.0 + 1e-5
    v = torch.randn(K, BOTTLENECK)
    model.centroids.set_centroids(v * 7.0)
    cos = model.centroids(v)
    torch.testing.assert_close(cos.diagonal(), torch.ones(K))
    assert cos.min() >= -1.0 - 1e-5


def test_set_centroids_rejects_bad_input() -> None:
    layer = build_model(tiny_cfg()).centroids
    with pytest.raises(ValueError, match="shape"):
        layer.set_centroids(torch.randn(K + 1, BOTTLENECK))
    with pytest.raises(ValueError, match="NaN"):
        layer.set_centroids(torch.full((K, BOTTLENECK), float("nan")))


def _grads(model: ExCBModel) -> tuple[torch.Tensor | None, float]:
    w = model.centroids.weight_v.grad
    conv = model.backbone.conv1.weight.grad
    return w, 0.0 if conv is None else float(conv.abs().sum())


def test_centroid_gradient_only_from_projection() -> None:
    model = build_model(tiny_cfg())
    g, loc = images(4, 16), images(4, 8, seed=1)
    proj_z, pred_z = model.forward_student(g, loc)
    pred_z.sum().backward()
    w_grad, conv_grad = _grads(model)
    assert w_grad is None or float(w_grad.abs().sum()) == 0.0  # predictor rows: centroids detached
    assert conv_grad > 0.0  # ...but the backbone still learns from them
    assert all(p.grad is not None for p in model.predictor.parameters())

    model.zero_grad(set_to_none=True)
    proj_z, pred_z = model.forward_student(g, loc)
    proj_z.sum().backward()
    w_grad, conv_grad = _grads(model)
    assert w_grad is not None and float(w_grad.abs().sum()) > 0.0
    assert conv_grad > 0.0
    assert all(p.grad is None for p in model.predictor.parameters())


def test_detached_centroids_keep_input_gradient() -> None:
    layer = build_model(tiny_cfg()).centroids
    x = torch.randn(5, BOTTLENECK, requires_grad=True)
    layer(x, detach_centroids=True).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0.0
    assert layer.weight_v.grad is None


def test_without_predictor_pred_rows_are_detached_projections() -> None:
    model = build_model(tiny_cfg(predictor=False)).eval()
    assert model.predictor is None
    g, loc = images(4, 16), images(2, 8, seed=1)
    with torch.no_grad():
        proj_z, pred_z = model.forward_student(g, loc)
    assert pred_z.shape == (6, K)
    torch.testing.assert_close(pred_z[:4], proj_z)
    assert set(GROUP_NAMES) == set(model.param_groups())


@pytest.mark.parametrize("backbone,mlp_bn", [("resnet18", True), ("vit_tiny", False)])
def test_param_groups_partition(backbone: str, mlp_bn: bool) -> None:
    model = build_model(tiny_cfg(backbone, mlp_bn=mlp_bn, activation="gelu"))
    groups = model.param_groups()
    assert tuple(groups) == GROUP_NAMES
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert groups["centroids"] == [model.centroids.weight_v]
    names = {id(p): n for n, p in model.named_parameters()}
    for group in ("backbone_noreg", "projector_noreg"):
        assert all(p.ndim == 1 for p in groups[group])
    for group in ("backbone", "projector"):
        assert all(p.ndim > 1 for p in groups[group])
    assert all(names[id(p)].startswith("backbone.") for p in groups["backbone"] + groups["backbone_noreg"])
    head = groups["projector"] + groups["projector_noreg"]
    assert all(names[id(p)].startswith(("projector.", "predictor.")) for p in head)
    assert any(names[id(p)] == "predictor.pre_norm.weight" for p in groups["projector_noreg"])
    if backbone == "vit_tiny":
        bb = {names[id(p)] for p in groups["backbone"]}
        assert {"backbone.pos_embed", "backbone.cls_token"} <= bb


def test_zero_init_residual_and_kaiming() -> None:
    model = build_model(tiny_cfg("resnet50"))
    blocks = [m for m in model.backbone.modules() if isinstance(m, (Bottleneck, BasicBlock))]
    assert len(blocks) == 16
    for blk in blocks:
        last_bn = blk.bn3 if isinstance(blk, Bottleneck) else blk.bn2
        assert float(last_bn.weight.detach().abs().sum()) == 0.0
        assert float(blk.bn1.weight.detach().sum()) == blk.bn1.weight.numel()
    r18 = build_model(tiny_cfg("resnet18")).backbone
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0.0 for b in r18.modules() if isinstance(b, BasicBlock))
    assert not hasattr(r18, "fc")


def test_resnet50_width64_matches_torchvision() -> None:
    """Same parameters as torchvision resnet50 minus fc; its weights load strictly and give equal features."""
    ours = build_model(tiny_cfg("resnet50", 32, 16, width=64, small_images=False)).backbone
    tv = tv_resnet50()
    fc = sum(p.numel() for p in tv.fc.parameters())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in tv.parameters()) - fc == 23_508_032
    state = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    ours.load_state_dict(state, strict=True)
    tv.fc = nn.Identity()
    x = images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), tv.eval()(x))


def test_channels_last_input_matches() -> None:
    model = build_model(tiny_cfg("resnet18")).eval()
    x = images(2, 16)
    with torch.no_grad():
        ref = model.cluster_similarities(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl.cluster_similarities(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backbone", ["resnet18", "vit_tiny"])
def test_export_wrapper_matches_model(backbone: str) -> None:
    teacher = build_model(tiny_cfg(backbone), teacher=True)
    teacher.centroids.set_centroids(torch.randn(K, BOTTLENECK) * 3.0)
    x = images(3, 16)
    teacher.train()
    teacher.forward_teacher(images(8, 16, seed=2))  # move BN running stats away from their init
    wrapper = ExportWrapper(teacher)
    assert teacher.training  # wrapping does not change the training model's mode
    assert not wrapper.training
    assert all(not p.requires_grad for p in wrapper.parameters())
    teacher.eval()
    with torch.no_grad():
        emb, z = wrapper(x)
        torch.testing.assert_close(emb, teacher.features(x))
        torch.testing.assert_close(z, teacher.cluster_similarities(x))
    assert emb.shape == (3, teacher.embed_dim) and z.shape == (3, K) and z.dtype == torch.float32


@pytest.mark.parametrize("backbone", ["resnet18", "vit_tiny"])
def test_multiscale_embedding_is_the_normalised_last_stages_and_exports(backbone: str) -> None:
    """embedding=multiscale: served/evaluated features change; the training path (projector input) does not."""
    final = build_model(tiny_cfg(backbone), teacher=True).eval()
    multi = build_model(tiny_cfg(backbone, embedding="multiscale"), teacher=True).eval()
    multi.load_state_dict(final.state_dict())
    x = images(3, 16)
    with torch.no_grad():
        stages = multi.backbone.stage_features(x)
        torch.testing.assert_close(stages[-1], final.features(x))  # the last stage is the backbone's feature
        emb = multi.features(x)
        assert emb.shape == (3, sum(multi.backbone.stage_dims[-3:])) and multi.embed_dim == emb.shape[1]
        parts = emb.split(multi.backbone.stage_dims[-3:], dim=1)
        for part, stage in zip(parts, stages[-3:]):
            torch.testing.assert_close(part, F.normalize(stage, dim=1))
        torch.testing.assert_close(multi.cluster_similarities(x), final.cluster_similarities(x))
        w_emb, w_z = ExportWrapper(multi)(x)
        torch.testing.assert_close(w_emb, emb)
        torch.testing.assert_close(w_z, final.cluster_similarities(x))
