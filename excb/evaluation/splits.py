"""The labelled data every evaluation uses: the (train, test) pair of a source and the run's eval transform.

The trainer's online kNN, ``excb eval``, the reference probe, the whitening fit and the benchmarks build them
here, the same way, so their figures are comparable.
"""

from __future__ import annotations

import logging
from typing import Any

from torch.utils.data import Dataset

from excb.data.augment import eval_transform
from excb.data.datasets import apply_limit, build_dataset, holdout_split, same_files

logger = logging.getLogger("excb.evaluation")

HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0


def labelled_splits(data: str, transform: Any, train_limit: int | None = None,
                    test_limit: int | None = None) -> tuple[Dataset, Dataset]:
    """The labelled (train, test) pair every kNN/linear evaluation uses: the trainer's online kNN, ``excb
    eval`` and the benchmarks must build it the same way for their figures to be comparable.

    A source whose two splits are the same files (a labelled folder without ``train/``/``test/``) would score
    each image against itself; it is split instead, ``HOLDOUT_FRACTION`` of each class held out with a fixed
    seed, and both parts carry ``holdout`` (see :func:`holdout_note`) so callers can say so."""
    train_ds = build_dataset(data, split="train", transform=transform, labelled=True)
    test_ds = build_dataset(data, split="test", transform=transform, labelled=True)
    if same_files(train_ds, test_ds):
        total = len(train_ds)
        # why the ignore below: same_files() is True only for two ImageFileDatasets, which mypy cannot see
        train_ds, test_ds = holdout_split(train_ds, test_ds, HOLDOUT_FRACTION, HOLDOUT_SEED)  # type: ignore[arg-type]
        note = {"of": total, "fraction": HOLDOUT_FRACTION, "seed": HOLDOUT_SEED, "test": len(test_ds)}
        train_ds.holdout = test_ds.holdout = note
        logger.warning("%s has no train/test split: holding out %d of %d images (%.0f%% per class, seed %d) "
                       "as the test split", data, note["test"], total, 100 * HOLDOUT_FRACTION, HOLDOUT_SEED)
    apply_limit(train_ds, train_limit)
    apply_limit(test_ds, test_limit)
    return train_ds, test_ds


def holdout_note(ds: Dataset) -> dict[str, Any] | None:
    """The held-out split ``labelled_splits`` made for ``ds`` (None when the source has its own test split)."""
    return getattr(ds, "holdout", None)


def model_transform(cfg: Any) -> Any:
    """The deterministic eval transform at the run's global crop size and normalisation."""
    a = cfg.augment
    return eval_transform(a.global_size, tuple(a.mean), tuple(a.std))
