"""Backbones: width-configurable ResNets and DINO-style ViTs (method.md §1.1), or a torchvision / timm
architecture by name (excb.models.external).

Every backbone maps images to one feature vector per image and exposes ``embed_dim``; ``stage_features``
returns one pooled vector per stage (ViT: per block), the last being ``forward``'s, and ``stage_dims`` their
sizes. ResNets keep torchvision's module names, so a torchvision state dict (minus ``fc``) loads into
``width=64`` as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from excb.config import ConfigError, ModelConfig
from excb.models.base import Backbone
from excb.models.external import LibraryBackbone, check_multiscale, is_external

_Block = type[BasicBlock] | type[Bottleneck]

_RESNETS: dict[str, tuple[_Block, list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}

# name -> (embed_dim, depth, heads)
_VITS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
}


class ResNet(Backbone):
    """torchvision-compatible ResNet trunk without ``fc``; output = global-average-pooled features.

    ``small_images`` swaps the 7x7/2 stem + max-pool for a 3x3/1 stem so 28-64 px inputs keep spatial
    resolution (a 28 px image would otherwise be 1x1 after layer3); ``stem_stride=2`` halves it once,
    which on a CPU buys ~6x more images per second at 28 px for a 2x2 final map instead of 4x4.
    """

    def __init__(self, block: _Block, layers: list[int], width: int = 64,
                 small_images: bool = False, stem_stride: int = 1) -> None:
        super().__init__()
        self.inplanes = width
        if small_images:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=stem_stride, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.stage_dims = [width * m * block.expansion for m in (1, 2, 4, 8)]
        self.embed_dim = self.stage_dims[-1]
        self._init_weights()

    def _make_layer(self, block: _Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        expansion = block.expansion
        downsample = None
        if stride != 1 or self.inplanes != planes * expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * expansion),
            )
        mods = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * expansion
        mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        """Kaiming fan_out convs, BN (1, 0), and zero γ on each block's last BN (identity at start)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def stage_features(self, x: Tensor) -> list[Tensor]:
        """Global-average-pooled output of each of the four stages, in order (the last = ``forward(x)``)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: list[Tensor] = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(torch.flatten(self.avgpool(x), 1))
        return out


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the survivors."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head self-attention on fused SDPA kernels (flash / memory-efficient where available)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block (no LayerScale, as in DINO ViT-S)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(Backbone):
    """DINO-style ViT; feature = CLS token after the final LayerNorm.

    The position embedding is learnt for ``img_size`` and bicubically resized for other inputs (local
    crops). Nothing here is named ``eval`` (reference quirk §10.16 shadowed ``nn.Module.eval``).
    """

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.stage_dims = [embed_dim] * depth
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def pos_embed_for(self, h: int, w: int) -> Tensor:
        """Position embedding for an ``h x w`` patch grid (bicubic resize of the learnt grid)."""
        if h == self.grid and w == self.grid:
            return self.pos_embed
        d = self.embed_dim
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = patch_pos.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, h * w, d)], dim=1)

    def tokens(self, x: Tensor) -> Tensor:
        """Patch tokens with CLS prepended and position embedding added: [N, 1 + h*w, D]."""
        x = self.patch_embed(x)
        h, w = x.shape[-2], x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + self.pos_embed_for(h, w).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = self.tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]

    def stage_features(self, x: Tensor) -> list[Tensor]:
        """Each block's CLS token through the final norm, in order (the last = ``forward(x)``)."""
        x = self.tokens(x)
        outs: list[Tensor] = []
        for blk in self.blocks:
            x = blk(x)
            outs.append(self.norm(x[:, 0]))
        return outs

    def features_last4(self, x: Tensor) -> Tensor:
        """Concat of the last 4 blocks' CLS, each through the final norm: [N, 4*D] (linear-probe parity)."""
        return torch.cat(self.stage_features(x)[-4:], dim=-1)


def resolve_small_images(cfg: ModelConfig, global_size: int) -> bool:
    """``small_images=None`` means: use the small stem for images of at most 64 px."""
    return global_size <= 64 if cfg.small_images is None else bool(cfg.small_images)


def build_backbone(cfg: ModelConfig, global_size: int, drop_path_rate: float,
                   local_size: int | None = None) -> Backbone:
    """Build the backbone named by ``cfg.backbone`` for ``global_size`` px global crops (and ``local_size`` px
    local ones, the student's): one of ours, or a torchvision / timm architecture (``torchvision:NAME``,
    ``timm:NAME``; excb.models.external)."""
    name = cfg.backbone
    if is_external(name):
        backbone = LibraryBackbone(name, global_size, drop_path_rate)
        check_multiscale(backbone, cfg.embedding)
        if local_size is not None and local_size != global_size:
            backbone.check_size(local_size, "augment.local_size")
        return backbone
    if name in _RESNETS:
        block, layers = _RESNETS[name]
        return ResNet(block, layers, width=cfg.width, small_images=resolve_small_images(cfg, global_size),
                      stem_stride=cfg.stem_stride)
    if name in _VITS:
        if global_size % cfg.patch_size:
            raise ConfigError("model.patch_size",
                              f"augment.global_size {global_size} is not a multiple of patch_size {cfg.patch_size}")
        dim, depth, heads = _VITS[name]
        return VisionTransformer(global_size, cfg.patch_size, dim, depth, heads, 4.0, drop_path_rate)
    raise ConfigError("model.backbone", f"unknown backbone {name!r}")


def num_params(module: nn.Module) -> int:
    """Parameter count (for logs and model cards)."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["ResNet", "VisionTransformer", "Block", "Attention", "DropPath", "drop_path", "build_backbone",
           "resolve_small_images", "num_params"]
