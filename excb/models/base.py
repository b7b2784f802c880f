"""The backbone's interface, apart from the backbones so that both ours and the library adapters
(excb.models.external) can subclass it without importing each other."""

from __future__ import annotations

from torch import Tensor, nn


class Backbone(nn.Module):
    """Images -> one feature vector per image [N, embed_dim] (``forward``).

    ``stage_features`` returns one pooled vector per stage (ViT: per block), the last being ``forward``'s, and
    ``stage_dims`` their sizes: what a multiscale embedding (excb.models.model.multiscale) concatenates.
    Declared here so callers (the model, the export, fine-tuning loaders) are typed against it, not against
    ``nn.Module``'s untyped attribute lookup.
    """

    embed_dim: int
    stage_dims: list[int]

    def stage_features(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError
