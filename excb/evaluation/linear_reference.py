"""The reference linear-probe protocol (method.md §8.2), for figures comparable with the paper's.

``excb eval --linear`` by default trains one head on pre-extracted, standardised eval-transform features:
seconds on a CPU, right for small runs and the quality suite. The reference protocol instead feeds freshly
*augmented* training images (RandomResizedCrop scale 0.08-1, bilinear, + flip) through the frozen teacher
every epoch, trains on raw (unstandardised) features for 100 epochs with SGD momentum 0.9, weight decay 0
(the reference's optimizer drops its configured 1e-6) and a per-epoch cosine to 0, and evaluates on
Resize(size * 256/224) + CenterCrop(size). ResNets: lr 0.3 at batch 256. ViTs: the concatenated CLS tokens of
the last four blocks (``features_last4``), lr 0.004 at batch 1024 (the centre of the reference's sweep, whose
heads shared storage, method.md §10.3). Learning rates scale linearly with the batch.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from excb.data.loader import collate_skipping
from excb.evaluation.metrics import LinearHead, extract_features
from excb.evaluation.splits import labelled_splits

EPOCHS = 100
MOMENTUM = 0.9
RESNET_LR, RESNET_BATCH = 0.3, 256
VIT_LR, VIT_BATCH = 0.004, 1024


def _transforms(cfg: Any) -> tuple[Any, Any]:
    size = cfg.augment.global_size
    norm = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.augment.mean),
                                                                              list(cfg.augment.std))]
    rgb = v2.Lambda(lambda im: im.convert("RGB"))
    train = v2.Compose([rgb, v2.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=InterpolationMode.BILINEAR),
                        v2.RandomHorizontalFlip(), *norm])
    test = v2.Compose([rgb, v2.Resize(int(round(size * 256 / 224))), v2.CenterCrop(size), *norm])
    return train, test


def encoder(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """ViT: last-4 CLS concatenation (1536-d for ViT-S); ResNet: the pooled last stage, as the reference (whatever
    ``model.embedding`` serves)."""
    backbone: nn.Module = getattr(model, "backbone", model)
    last4: Callable[[Tensor], Tensor] | None = getattr(backbone, "features_last4", None)
    return last4 if last4 is not None else backbone


def default_lr(model: nn.Module, batch_size: int) -> float:
    vit = hasattr(getattr(model, "backbone", model), "features_last4")
    base, base_batch = (VIT_LR, VIT_BATCH) if vit else (RESNET_LR, RESNET_BATCH)
    return base * batch_size / base_batch


@torch.no_grad()
def reference_linear_probe(model: nn.Module, cfg: Any, data: str, device: torch.device, epochs: int = EPOCHS,
                           batch_size: int = RESNET_BATCH, lr: float | None = None, seed: int = 0,
                           train_limit: int | None = None, test_limit: int | None = None,
                           num_workers: int = 0) -> dict[str, Any]:
    """Train one head on augmented teacher features per the reference protocol; last-epoch test accuracy."""
    started = time.perf_counter()
    train_tf, test_tf = _transforms(cfg)
    train_ds, _ = labelled_splits(data, train_tf, train_limit, test_limit)
    _, test_ds = labelled_splits(data, test_tf, train_limit, test_limit)
    encode = encoder(model.eval())
    lr = lr if lr is not None else default_lr(model, batch_size)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head: LinearHead | None = None
    for epoch in range(epochs):
        epoch_lr = lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        for x, y in _batches(train_ds, batch_size, gen, num_workers):
            feats = encode(x.to(device)).float()
            if head is None:
                classes = len(getattr(train_ds, "classes", ())) or int(y.max()) + 1
                head = LinearHead(feats.shape[1], classes, gen, device)
            head.step(feats, y.to(device), epoch_lr, MOMENTUM, 0.0)
    assert head is not None
    test_feats, test_labels = extract_features(encode, test_ds, batch_size, device, num_workers)
    return {"acc": head.accuracy(test_feats.to(device), test_labels.to(device)), "protocol": "reference",
            "epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": 0.0, "momentum": MOMENTUM,
            "feature_dim": int(test_feats.shape[1]), "seconds": time.perf_counter() - started}


def _batches(ds: Dataset, batch_size: int, gen: torch.Generator, num_workers: int) -> Any:
    """A shuffled epoch of augmented (images, labels); undecodable files are skipped by the collate."""
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen, num_workers=num_workers,
                        collate_fn=collate_skipping, drop_last=False)
    for batch, _missing in loader:
        if batch is not None:
            yield batch
