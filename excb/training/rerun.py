"""What a re-run with an existing ``out`` does: resume the same run, start over, or refuse (issue 15 §4).

A run directory holds one run. Re-running a command resumes it only when the resolved config matches the one
in its checkpoint, apart from the fields in :data:`MAY_CHANGE_ON_RESUME` (length, logging, workers, eval,
compile...). Anything else would silently train one run with two configs, so it is refused with a one-line
error naming the fields and the ways out: ``overwrite=true`` (the old run is moved aside to
``out/replaced/STAMP/``) or a new ``out``. ``checkpoint=PATH`` starts a new run from another run's weights.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from excb.config import ConfigError, leaf_keys
from excb.training.checkpoint import latest_checkpoint, load_checkpoint

log = logging.getLogger("excb.rerun")

# Fields a resume may change: how long to train, how to log and checkpoint, how to load and evaluate, and the
# bookkeeping of the command itself. A prefix ending in "." covers a whole section.
MAY_CHANGE_ON_RESUME: tuple[str, ...] = (
    "epochs", "max_steps", "budget", "progress", "resume", "overwrite", "out", "preset", "recipe", "pinned",
    "log_every_steps", "histogram_every_steps", "checkpoint_every_steps", "keep_epoch_checkpoints", "compile", "logger",
    "data.num_workers", "data.cache_mb", "eval.", "mlflow.",
)
# What a run writes into its directory; ``overwrite=true`` moves these aside (job.log stays: the worker owns it;
# config.yaml goes with the old run, after this run has read it, and is written again with this run's recipe).
RUN_OUTPUTS: tuple[str, ...] = (
    "checkpoints", "metrics.jsonl", "summary.json", "config.yaml", "recipe.json", "train.log",
    "backbone.safetensors", "whitening.safetensors", "backbone.json", "tb", "mlflow.json",
)
REPLACED_DIR = "replaced"
_SHOWN_DIFFS = 4  # the error lists every field, the old -> new values of the first few


class RunConfigMismatch(ConfigError):
    """``out`` holds a run whose config differs from this one in fields that may not change on resume."""

    def __init__(self, out: str, diffs: dict[str, tuple[Any, Any]]) -> None:
        self.diffs = diffs
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(diffs.items())[:_SHOWN_DIFFS])
        more = f"; and {len(diffs) - _SHOWN_DIFFS} more" if len(diffs) > _SHOWN_DIFFS else ""
        super().__init__(", ".join(diffs), f"out={out} holds a run with a different config ({shown}{more}); "
                         "to start over add overwrite=true, or choose a new out=")

    def __str__(self) -> str:
        return self.message


def may_change(key: str) -> bool:
    """True for a dotted key listed in :data:`MAY_CHANGE_ON_RESUME` (or inside a listed section)."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in MAY_CHANGE_ON_RESUME)


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any],
                       also_free: set[str] | frozenset[str] = frozenset()) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (stored, current)}`` for keys that differ and may not change on resume. Keys only one
    side has (fields added or removed between versions) are not compared; ``also_free`` are keys the planner
    sets (a budget's length), not the user."""
    old, new = _leaves(stored), _leaves(current)
    return {k: (old[k], new[k]) for k in old
            if k in new and old[k] != new[k] and not may_change(k) and k not in also_free}


def check_resumable(stored: Mapping[str, Any], current: Mapping[str, Any], out: str,
                    planned: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`RunConfigMismatch` unless ``current`` may resume a checkpoint saved with ``stored``."""
    diffs = config_differences(stored, current, set(leaf_keys(planned or {})))
    if diffs:
        raise RunConfigMismatch(out, diffs)


def without_keys(tree: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
    """``tree`` less the dotted ``keys`` (and whatever lies under them): a stored recipe's choices without the
    keys the user now pins, so what they typed is what gets compared and trained."""
    out: dict[str, Any] = {}
    for name, value in tree.items():
        if name in keys:
            continue
        inner = [k[len(name) + 1:] for k in keys if k.startswith(name + ".")]
        out[name] = without_keys(value, inner) if isinstance(value, Mapping) and inner else value
    return out


def set_aside(run_dir: Path) -> Path | None:
    """``overwrite=true``: move the previous run's outputs to ``run_dir/replaced/STAMP/`` (nothing is deleted;
    remove that folder when it is no longer wanted). Returns it, or None when there was nothing to move."""
    present = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not present:
        return None
    dest = run_dir / REPLACED_DIR / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.split('-')[0]}-{n}")
    dest.mkdir(parents=True)
    for path in present:
        shutil.move(str(path), str(dest / path.name))
    log.warning("overwrite=true: the previous run in %s was moved to %s", run_dir, dest)
    return dest


def _fitting(source: Mapping[str, torch.Tensor],
             target: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The entries of ``source`` that fit ``target`` by name and shape, and the target keys left out."""
    taken = {k: v for k, v in source.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
    return taken, [k for k in target if k not in taken]


def warm_source(path: str) -> Path:
    """The checkpoint file ``checkpoint=PATH`` names (a run directory or a .pt file), or a ConfigError."""
    source = latest_checkpoint(path) if Path(path).exists() else None
    if source is None:
        raise ConfigError("checkpoint", f"{path}: no checkpoint there (a run directory or a .pt file)")
    return source


def warm_start(learner: Any, path: str) -> dict[str, Any]:
    """Load another run's student and teacher weights (and its cluster-size estimate when K matches) into a
    fresh run: the optimizer, schedules and counters start at step 0. Only the centroids may fail to fit (a
    different num_clusters; k-means then initialises them); any other mismatch is a config error."""
    source = warm_source(path)
    ckpt = load_checkpoint(source, map_location=learner.device)
    if "student" not in ckpt or "teacher" not in ckpt:
        raise ConfigError("checkpoint", f"{source}: not a training checkpoint (no student/teacher weights)")
    skipped: list[str] = []
    for name, module in (("student", learner.student_core), ("teacher", learner.teacher)):
        taken, left = _fitting(ckpt[name], module.state_dict())
        wrong = [k for k in left if not k.startswith("centroids.")]
        if wrong:
            raise ConfigError("checkpoint", f"{source}: its {name} does not fit this model ({len(wrong)} "
                              f"tensors differ, e.g. {wrong[0]}); use the same model.* settings")
        module.load_state_dict(taken, strict=False)
        skipped += [f"{name}.{k}" for k in left]
    sizes = ckpt.get("balancer", {}).get("sizes")
    same_k = not skipped and sizes is not None and sizes.shape == learner.balancer.sizes.shape
    if same_k:
        learner.balancer.sizes.copy_(sizes)
    log.info("warm start from %s (step %s): %s", source, ckpt.get("step"),
             "all weights and the size estimate" if same_k else f"all but {', '.join(skipped) or 'the size estimate'}")
    return {"source": str(source), "source_step": int(ckpt.get("step", 0)), "centroids_loaded": not skipped,
            "sizes_loaded": same_k}
