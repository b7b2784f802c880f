"""Frozen-feature metrics: kNN (DINO protocol + plain majority vote) and a linear probe (method.md §8).

Feature tensors in, accuracies out; no model, config or data source here (excb.evaluation.runs has those).
Deliberate departures from the reference (method.md §10.3-4): the probe trains ONE head with its own
parameters (no shared-storage lr sweep), and a requested weight decay is actually applied. Features are
standardised with train statistics before the probe so that one default learning rate fits any backbone.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from excb.data.loader import collate_skipping

logger = logging.getLogger("excb.evaluation")  # the name train.log and excb eval have always shown

WEIGHTINGS = ("exp", "majority")
DINO_KS = (10, 20, 100, 200)


# ---------------------------------------------------------------------------------------------------------
# features


@torch.inference_mode()
def extract_features(encode: Callable[[Tensor], Tensor], dataset: Dataset, batch_size: int = 256,
                     device: str | torch.device = "cpu", num_workers: int = 0,
                     progress: bool = False) -> tuple[Tensor, Tensor]:
    """Run ``encode`` over a data set in order -> (features [N, D] float32 CPU, labels [N] long).

    An unlabelled set (items are images, not ``(image, label)``) gives an empty label tensor.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skipping, pin_memory=torch.device(device).type == "cuda")
    batches: Iterable[Any] = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc="features", unit="batch")
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    skipped = 0
    for batch, missing in batches:
        skipped += missing
        if batch is None:
            continue
        x, y = batch if isinstance(batch, (list, tuple)) else (batch, None)
        out = encode(x.to(device, non_blocking=True))
        feats.append(out.float().flatten(1).cpu())
        if y is not None:
            labels.append(torch.as_tensor(y, dtype=torch.long).reshape(-1))
    if skipped:
        logger.warning("feature extraction skipped %d undecodable samples", skipped)
    if not feats:
        raise ValueError("dataset: no samples to extract features from")
    return torch.cat(feats), (torch.cat(labels) if labels else torch.empty(0, dtype=torch.long))


def _to_array(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x.float().flatten()
    return torch.from_numpy(np.asarray(x, dtype=np.float32).ravel().copy())


def raw_pixel_features(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """Flattened pixels as features: the baseline a learned representation must beat (data.md).

    Accepts whatever the data set yields (tensor, PIL image or array); all samples must have one shape.
    """
    feats: list[Tensor] = []
    labels: list[int] = []
    for i in range(len(dataset)):  # type: ignore[arg-type]  # torch's Dataset declares no __len__; the sets here are map-style
        item = dataset[i]
        if item is None:  # undecodable file, already logged by the data set
            continue
        x, y = item
        feats.append(_to_array(x))
        labels.append(int(y))
    if not feats:
        raise ValueError("dataset: no samples")
    shapes = {f.numel() for f in feats}
    if len(shapes) != 1:
        raise ValueError(f"dataset: raw-pixel features need images of one size, got {sorted(shapes)[:5]} values")
    return torch.stack(feats), torch.tensor(labels, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------
# kNN


def _check_pair(feats: Tensor, labels: Tensor, name: str) -> None:
    if feats.dim() != 2:
        raise ValueError(f"{name}_feats: expected [N, D], got shape {tuple(feats.shape)}")
    if labels.dim() != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(f"{name}_labels: expected [{feats.shape[0]}] labels, got shape {tuple(labels.shape)}")
    if feats.shape[0] == 0:
        raise ValueError(f"{name}_feats: empty")


def _num_classes(num_classes: int | None, *labels: Tensor) -> int:
    needed = int(max(int(lab.max()) for lab in labels)) + 1
    if int(min(int(lab.min()) for lab in labels)) < 0:
        raise ValueError("labels: must be >= 0")
    if num_classes is None:
        return needed
    if num_classes < needed:
        raise ValueError(f"num_classes: {num_classes} is smaller than the largest label + 1 ({needed})")
    return num_classes


def _neighbours(train: Tensor, test: Tensor, k: int, chunk_size: int) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(chunk start, cosine similarities [B, k] descending, train indices [B, k]) per test chunk."""
    train_t = F.normalize(train.float(), dim=1).t().contiguous()
    for start in range(0, test.shape[0], chunk_size):
        q = F.normalize(test[start:start + chunk_size].float().to(train_t.device), dim=1)
        sims, idx = (q @ train_t).topk(k, dim=1, largest=True, sorted=True)
        yield start, sims, idx


def _vote(sims: Tensor, neighbour_labels: Tensor, num_classes: int, temperature: float,
          weighting: str) -> Tensor:
    """Predicted class per row. ``majority`` ties go to the class of the most similar neighbour among them."""
    b, k = neighbour_labels.shape
    if weighting == "exp":
        scores = torch.zeros(b, num_classes, dtype=torch.float64, device=sims.device)
        scores.scatter_add_(1, neighbour_labels, (sims.double() / temperature).exp())
        return scores.argmax(dim=1)
    counts = torch.zeros(b, num_classes, dtype=torch.long, device=sims.device)
    counts.scatter_add_(1, neighbour_labels, torch.ones_like(neighbour_labels))
    ranks = torch.arange(k, device=sims.device).expand(b, k)
    first = torch.full((b, num_classes), k, dtype=torch.long, device=sims.device)
    first.scatter_reduce_(1, neighbour_labels, ranks, reduce="amin")
    return (counts * (k + 1) + (k - first)).argmax(dim=1)


def knn_accuracies(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                   ks: Sequence[int] = DINO_KS, temperature: float = 0.07,
                   weightings: Sequence[str] = WEIGHTINGS, num_classes: int | None = None,
                   chunk_size: int = 1024) -> dict[str, float]:
    """Top-1 kNN accuracy for several k and weightings from one neighbour search: ``{"exp_k20": acc, ...}``.

    Cosine similarity on L2-normalised features; ``exp`` weights each of the top-k neighbours by
    exp(sim / temperature) (DINO's eval_knn.py), ``majority`` counts plain votes.
    """
    _check_pair(train_feats, train_labels, "train")
    _check_pair(test_feats, test_labels, "test")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"test_feats: dimension {test_feats.shape[1]} != train dimension {train_feats.shape[1]}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"k: must be >= 1, got {ks}")
    if ks[-1] > train_feats.shape[0]:
        raise ValueError(f"k: {ks[-1]} exceeds the number of training samples ({train_feats.shape[0]})")
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    bad = [w for w in weightings if w not in WEIGHTINGS]
    if bad or not weightings:
        raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {list(weightings)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    classes = _num_classes(num_classes, train_labels, test_labels)
    train_labels_dev = train_labels.to(train_feats.device)
    correct = {(w, k): 0 for w in weightings for k in ks}
    for start, sims, idx in _neighbours(train_feats, test_feats, ks[-1], chunk_size):
        truth = test_labels[start:start + sims.shape[0]].to(sims.device)
        labels = train_labels_dev[idx]
        for w in weightings:
            for k in ks:
                pred = _vote(sims[:, :k], labels[:, :k], classes, temperature, w)
                correct[(w, k)] += int((pred == truth).sum())
    n = test_feats.shape[0]
    return {f"{w}_k{k}": correct[(w, k)] / n for (w, k) in correct}


def knn_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 k: int = 20, temperature: float = 0.07, weighting: str = "exp", num_classes: int | None = None,
                 chunk_size: int = 1024) -> float:
    """Top-1 kNN accuracy with one k and one weighting (DINO protocol by default: k=20, T=0.07)."""
    accs = knn_accuracies(train_feats, train_labels, test_feats, test_labels, ks=(k,), temperature=temperature,
                          weightings=(weighting,), num_classes=num_classes, chunk_size=chunk_size)
    return accs[f"{weighting}_k{k}"]


# ---------------------------------------------------------------------------------------------------------
# linear probe


def _standardise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Zero mean, unit variance per dimension from train statistics (constant dimensions are only centred)."""
    mean = train.mean(0)
    std = train.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std


class LinearHead:
    """Softmax regression trained with hand-written SGD + momentum (same update rule as torch.optim.SGD).

    The closed-form gradient avoids autograd's per-step overhead: a 100-epoch probe on 60k x 512 features
    takes seconds on one CPU core instead of minutes.
    """

    def __init__(self, dim: int, classes: int, generator: torch.Generator, device: torch.device) -> None:
        self.weight = (torch.randn(classes, dim, generator=generator) * 0.01).to(device)
        self.bias = torch.zeros(classes, device=device)
        self._buf_w = torch.zeros_like(self.weight)
        self._buf_b = torch.zeros_like(self.bias)

    def logits(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.weight.t())

    def step(self, x: Tensor, y: Tensor, lr: float, momentum: float, weight_decay: float) -> Tensor:
        """One SGD step on the mean cross-entropy of the batch; returns the summed loss (a tensor)."""
        p = self.logits(x).softmax(dim=1)
        rows = torch.arange(x.shape[0], device=x.device)
        loss = -p[rows, y].clamp_min(1e-30).log().sum()
        p[rows, y] -= 1.0
        p /= x.shape[0]
        grad_w = p.t() @ x
        if weight_decay:
            grad_w.add_(self.weight, alpha=weight_decay)
        self._buf_w.mul_(momentum).add_(grad_w)
        self._buf_b.mul_(momentum).add_(p.sum(dim=0))
        self.weight.add_(self._buf_w, alpha=-lr)
        self.bias.add_(self._buf_b, alpha=-lr)
        return loss

    def accuracy(self, feats: Tensor, labels: Tensor, chunk: int = 8192) -> float:
        hits = 0
        for s in range(0, feats.shape[0], chunk):
            hits += int((self.logits(feats[s:s + chunk]).argmax(1) == labels[s:s + chunk]).sum())
        return hits / feats.shape[0]


@torch.no_grad()
def linear_probe(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 epochs: int = 100, lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0,
                 seed: int = 0, momentum: float = 0.9, num_classes: int | None = None) -> dict[str, Any]:
    """Train one linear head on frozen, standardised features; report final-epoch test accuracy.

    SGD with momentum, learning rate cosine-annealed per epoch to 0 without warm-up (reference schedule),
    head initialised N(0, 0.01) with zero bias; ``weight_decay`` is applied to the weight matrix (not the
    bias). Deterministic given ``seed``.
    """
    _check_pair(train_feats, train_labels, "train")
    _check_pair(test_feats, test_labels, "test")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    if lr <= 0:
        raise ValueError(f"lr: must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum: must be in [0, 1), got {momentum}")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"test_feats: dimension {test_feats.shape[1]} != train dimension {train_feats.shape[1]}")
    classes = _num_classes(num_classes, train_labels, test_labels)
    started = time.perf_counter()
    x_train, x_test = _standardise(train_feats.float(), test_feats.float())
    y_train, y_test = train_labels.to(x_train.device), test_labels.to(x_test.device)
    gen = torch.Generator().manual_seed(seed)
    head = LinearHead(x_train.shape[1], classes, gen, x_train.device)
    n = x_train.shape[0]
    epoch_loss = torch.zeros(())
    for epoch in range(epochs):
        epoch_lr = lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        perm = torch.randperm(n, generator=gen).to(x_train.device)
        xs, ys = x_train[perm], y_train[perm]  # one gather per epoch, then contiguous slices
        epoch_loss = torch.zeros((), device=x_train.device)
        for s in range(0, n, batch_size):
            epoch_loss += head.step(xs[s:s + batch_size], ys[s:s + batch_size], epoch_lr, momentum, weight_decay)
    return {
        "acc": head.accuracy(x_test, y_test),
        "train_acc": head.accuracy(x_train, y_train),
        "final_train_loss": float(epoch_loss) / n,
        "weight_norm": float(head.weight.norm()),
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay, "seed": seed,
        "momentum": momentum, "num_classes": classes, "seconds": time.perf_counter() - started,
        "protocol": "fast",
    }


# ---------------------------------------------------------------------------------------------------------
# everything together


def evaluate_features(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                      k: int = 20, temperature: float = 0.07, linear: bool = False,
                      linear_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """kNN (both weightings) and, optionally, the linear probe on already extracted features."""
    t0 = time.perf_counter()
    accs = knn_accuracies(train_feats, train_labels, test_feats, test_labels, ks=(k,), temperature=temperature)
    out: dict[str, Any] = {
        "knn_acc": accs[f"exp_k{k}"], "knn_majority_acc": accs[f"majority_k{k}"], "k": k,
        "temperature": temperature, "num_train": int(train_feats.shape[0]), "num_test": int(test_feats.shape[0]),
        "feature_dim": int(train_feats.shape[1]), "knn_seconds": time.perf_counter() - t0,
    }
    if linear:
        out["linear"] = linear_probe(train_feats, train_labels, test_feats, test_labels, **(linear_kwargs or {}))
    return out


def evaluate(encode: Callable[[Tensor], Tensor], train_ds: Dataset, test_ds: Dataset, k: int = 20,
             temperature: float = 0.07, linear: bool = False, batch_size: int = 256,
             device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = False,
             linear_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Extract features of both splits with ``encode`` and evaluate them (kNN, optional linear probe)."""
    t0 = time.perf_counter()
    train_feats, train_labels = extract_features(encode, train_ds, batch_size, device, num_workers, progress)
    test_feats, test_labels = extract_features(encode, test_ds, batch_size, device, num_workers, progress)
    extract_seconds = time.perf_counter() - t0
    out = evaluate_features(train_feats, train_labels, test_feats, test_labels, k, temperature, linear,
                            linear_kwargs)
    out["extract_seconds"] = extract_seconds
    return out
