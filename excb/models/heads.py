"""Heads: projector MLP, predictor and the cosine centroid layer (method.md §1.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"model.activation: unknown activation {name!r}; choose relu or gelu")
    return _ACTIVATIONS[name]()


def init_linear(module: nn.Module) -> None:
    """Truncated-normal(0.02) Linear weights and zero biases, as in the reference heads."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MLP(nn.Sequential):
    """``hidden_layers`` x (Linear -> [BN] -> act), then a Linear to ``out_dim``.

    Plain ``nn.BatchNorm1d`` so the trainer can convert it to SyncBatchNorm.
    """

    def __init__(self, in_dim: int, hidden_dim: int, hidden_layers: int, out_dim: int,
                 bn: bool, activation: str) -> None:
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(hidden_layers):
            layers.append(nn.Linear(dim, hidden_dim))
            if bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(_activation(activation))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        super().__init__(*layers)
        init_linear(self)


class Predictor(nn.Module):
    """BatchNorm1d pre-norm on the projector output, then a one-hidden-layer MLP back to the bottleneck."""

    def __init__(self, bottleneck_dim: int, hidden_dim: int, bn: bool, activation: str) -> None:
        super().__init__()
        self.pre_norm = nn.BatchNorm1d(bottleneck_dim)
        self.mlp = MLP(bottleneck_dim, hidden_dim, 1, bottleneck_dim, bn, activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.pre_norm(x))


class CentroidLayer(nn.Module):
    """Cosine similarity to K unit-norm centroids: ``z = <x/|x|, v_k/|v_k|>`` in [-1, 1].

    Equivalent to the reference ``weight_norm`` linear with ``weight_g`` frozen at 1, so only ``weight_v``
    exists. Always computed in fp32 (the half-precision cosines of the reference quantise the balancer,
    method.md §10.10).
    """

    def __init__(self, in_dim: int, num_clusters: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.num_clusters = num_clusters
        self.weight_v = nn.Parameter(torch.empty(num_clusters, in_dim))
        nn.init.normal_(self.weight_v)  # direction only matters; k-means replaces it before training

    def forward(self, x: Tensor, detach_centroids: bool = False) -> Tensor:
        """``detach_centroids`` stops the gradient to the centroids only; ``x`` keeps its gradient."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            weight = self.weight_v.detach() if detach_centroids else self.weight_v
            centroids = F.normalize(weight.float(), dim=-1)
            return F.normalize(x.float(), dim=-1) @ centroids.t()

    @torch.no_grad()
    def set_centroids(self, v: Tensor) -> None:
        """Replace the centroids (e.g. with k-means output); norms do not matter."""
        if tuple(v.shape) != tuple(self.weight_v.shape):
            raise ValueError(f"centroids: expected shape {tuple(self.weight_v.shape)}, got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise ValueError("centroids: contain NaN or Inf")
        self.weight_v.copy_(v.to(self.weight_v.device, self.weight_v.dtype))

    def normalized(self) -> Tensor:
        """Unit-norm centroids [K, D] in fp32, without gradient (for export and inference)."""
        return F.normalize(self.weight_v.detach().float(), dim=-1)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_clusters={self.num_clusters}"


__all__ = ["MLP", "Predictor", "CentroidLayer", "init_linear"]
