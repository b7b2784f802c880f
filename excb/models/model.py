"""The ExCB model: backbone -> projector -> centroids, plus the student's predictor (method.md §1.3)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from excb.config import TrainConfig
from excb.models.backbones import build_backbone
from excb.models.base import Backbone
from excb.models.heads import MLP, CentroidLayer, Predictor
from excb.models.whitening import Whitening

GROUP_NAMES: tuple[str, ...] = ("backbone", "backbone_noreg", "projector", "projector_noreg", "centroids")
MULTISCALE_STAGES = 3  # stages (ViT: blocks) whose pooled features make a multiscale embedding


def embedding_dim(backbone: Backbone, kind: str) -> int:
    """Size of the embedding ``kind`` ('final' or 'multiscale') of ``backbone``."""
    dims = backbone.stage_dims
    return sum(dims[-MULTISCALE_STAGES:]) if kind == "multiscale" else dims[-1]


def multiscale(stages: list[Tensor]) -> Tensor:
    """The last stages' pooled features, each L2-normalised (so each counts equally in a cosine), concatenated.

    Why: after a short run the last stage alone is not the best feature; on the quality suite the
    concatenation ranked neighbours better (benchmarks/RESULTS.md, "the recipe fits its augmentations and its
    embedding to the data").
    """
    return torch.cat([F.normalize(s.float(), dim=-1) for s in stages[-MULTISCALE_STAGES:]], dim=-1)


def feature_and_embedding(backbone: Backbone, kind: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """One backbone pass -> (the projector's input: the pooled last stage, the embedding ``kind`` serves)."""
    if kind == "multiscale":
        stages = backbone.stage_features(x)
        return stages[-1], multiscale(stages)
    feat = backbone(x)
    return feat, feat


class ExCBModel(nn.Module):
    """Student or teacher network. Teacher and student share one architecture so state dicts match.

    ``forward`` dispatches to :meth:`forward_student` (or :meth:`forward_teacher` for a teacher) so the
    model can be wrapped in DDP.
    """

    # submodules declared so that attribute access is typed (nn.Module.__getattr__ returns Tensor | Module)
    backbone: Backbone
    projector: nn.Module
    predictor: nn.Module | None
    centroids: CentroidLayer
    whiten: Whitening | None

    def __init__(self, backbone: Backbone, projector: nn.Module, predictor: nn.Module | None,
                 centroids: CentroidLayer, is_teacher: bool = False, embedding: str = "final",
                 whitening: str = "off") -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        self.centroids = centroids
        self.is_teacher = is_teacher
        self.embedding = embedding
        self.embed_dim: int = embedding_dim(backbone, embedding)
        # the identity until the trainer fits it at the end of the run (excb.models.whitening)
        self.whiten = Whitening(self.embed_dim) if whitening == "pca" else None

    @property
    def num_clusters(self) -> int:
        return self.centroids.num_clusters

    def unwhitened_features(self, x: Tensor) -> Tensor:
        """The embedding before whitening: the backbone's feature, or its multiscale concatenation."""
        return feature_and_embedding(self.backbone, self.embedding, x)[1]

    def features(self, x: Tensor) -> Tensor:
        """The embedding [N, embed_dim] that is served and evaluated (whitened when the model has a fit)."""
        emb = self.unwhitened_features(x)
        return self.whiten(emb) if self.whiten is not None else emb

    def project(self, x: Tensor) -> Tensor:
        """L2-normalised projector output [N, bottleneck] (the k-means feature space)."""
        return nn.functional.normalize(self.projector(self.backbone(x)).float(), dim=-1)

    def cluster_similarities(self, x: Tensor) -> Tensor:
        """Cosines to the centroids [N, K], fp32 (inference path: no predictor)."""
        return self.centroids(self.projector(self.backbone(x)))

    def forward_teacher(self, globals_: Tensor) -> Tensor:
        """Teacher similarities for the stacked global crops: [2B, C, H, W] -> [2B, K] fp32."""
        return self.cluster_similarities(globals_)

    def forward_student(self, globals_: Tensor, locals_: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Student outputs ``(proj_z [2B, K], pred_z [(2+L)B, K])``, rows ordered globals then locals.

        The backbone runs once per resolution and the projector once over all rows (its BN statistics
        mix global and local crops, as in the reference). Only global projection rows reach the centroid
        layer with gradient; local projection rows never enter the loss, so they are not computed.
        Predictor rows use detached centroids: the centroids learn only from the cross-view term.
        """
        n_global = globals_.shape[0]
        feats = self.backbone(globals_)
        if locals_ is not None and locals_.shape[0] > 0:
            feats = torch.cat([feats, self.backbone(locals_).to(feats.dtype)], dim=0)
        proj = self.projector(feats)
        proj_z = self.centroids(proj[:n_global])
        pred = self.predictor(proj) if self.predictor is not None else proj
        pred_z = self.centroids(pred, detach_centroids=True)
        return proj_z, pred_z

    def forward(self, globals_: Tensor, locals_: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if self.is_teacher:
            return self.forward_teacher(globals_)
        return self.forward_student(globals_, locals_)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The five optimizer groups of method.md §4.3; each trainable parameter lands in exactly one."""
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            groups[_group_of(name, p)].append(p)
        return groups


def _group_of(name: str, p: nn.Parameter) -> str:
    """Group name for one parameter: biases and 1-D tensors get no weight decay."""
    noreg = p.ndim <= 1 or name.endswith(".bias")
    if name.startswith("centroids."):
        return "centroids"
    if name.startswith("backbone."):
        return "backbone_noreg" if noreg else "backbone"
    if name.startswith(("projector.", "predictor.")):
        return "projector_noreg" if noreg else "projector"
    raise ValueError(f"parameter {name!r} belongs to no optimizer group")


def build_model(cfg: TrainConfig, teacher: bool = False) -> ExCBModel:
    """Build the student (drop_path from the config) or the teacher (drop_path 0, same modules)."""
    m = cfg.model
    drop_path = 0.0 if teacher else m.drop_path_rate
    local = cfg.augment.local_size if cfg.augment.num_local_crops and not teacher else None
    backbone = build_backbone(m, cfg.augment.global_size, drop_path, local)
    projector = MLP(backbone.embed_dim, m.projector_hidden_dim, m.projector_hidden_layers,
                    m.bottleneck_dim, m.mlp_bn, m.activation)
    predictor = Predictor(m.bottleneck_dim, m.predictor_hidden_dim, m.mlp_bn, m.activation) if m.predictor else None
    centroids = CentroidLayer(m.bottleneck_dim, m.num_clusters)
    return ExCBModel(backbone, projector, predictor, centroids, is_teacher=teacher, embedding=m.embedding,
                     whitening=m.whitening)


class ServedEmbedding(nn.Module):
    """``x -> embedding``: what the ONNX bundle's ``embedding`` output serves, as a torch module.

    The backbone, the embedding ``kind`` ('final' or 'multiscale') and the whitening (None: off) are the
    teacher's, so fine-tuning code that loads the weights (excb.models.weights) starts from the embedding the
    service returns, not only from the backbone's last stage.
    """

    backbone: Backbone
    whiten: Whitening | None

    def __init__(self, backbone: Backbone, kind: str = "final", whiten: Whitening | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.embedding = kind
        self.whiten = whiten
        self.embed_dim: int = embedding_dim(backbone, kind)

    def forward(self, x: Tensor) -> Tensor:
        emb = feature_and_embedding(self.backbone, self.embedding, x)[1]
        return self.whiten(emb) if self.whiten is not None else emb


class ExportWrapper(nn.Module):
    """ONNX-friendly inference graph: ``x -> (embedding [N, embed_dim], cosines [N, K])``.

    Works on a frozen eval-mode copy of the given (teacher) model, so wrapping never changes the training
    model's mode. The normalised centroids are a constant buffer, and the graph is plain tensor ops with
    no data-dependent control flow. Spatial size is fixed at export time (ViT position embedding).
    """

    backbone: Backbone
    projector: nn.Module
    centroids: Tensor  # a buffer (register_buffer), not the trainable CentroidLayer
    whiten: Whitening | None

    def __init__(self, model: ExCBModel) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(model.backbone)
        self.projector = copy.deepcopy(model.projector)
        self.register_buffer("centroids", model.centroids.normalized().clone())
        self.whiten = copy.deepcopy(model.whiten)
        self.embedding = model.embedding
        self.embed_dim = model.embed_dim
        self.num_clusters = model.num_clusters
        self.requires_grad_(False)
        self.train(False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feat, emb = feature_and_embedding(self.backbone, self.embedding, x)
        if self.whiten is not None:
            emb = self.whiten(emb)
        h = self.projector(feat).float()
        h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return emb, h @ self.centroids.t()


__all__ = ["ExCBModel", "ExportWrapper", "ServedEmbedding", "build_model", "embedding_dim", "feature_and_embedding",
           "multiscale", "GROUP_NAMES"]
