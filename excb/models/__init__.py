"""Backbones, heads and the ExCB model (contract: docs/internals.md, "ExCBModel")."""

from excb.models.backbones import ResNet, VisionTransformer, build_backbone, num_params
from excb.models.heads import MLP, CentroidLayer, Predictor
from excb.models.model import GROUP_NAMES, ExCBModel, ExportWrapper, ServedEmbedding, build_model
from excb.models.weights import load_backbone, save_backbone

__all__ = [
    "ResNet", "VisionTransformer", "build_backbone", "num_params",
    "MLP", "CentroidLayer", "Predictor",
    "GROUP_NAMES", "ExCBModel", "ExportWrapper", "ServedEmbedding", "build_model",
    "load_backbone", "save_backbone",
]
