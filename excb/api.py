"""The Python API: ``excb.train(...)``, ``excb.export_onnx(...)``, ``excb.export_weights(...)``, ``excb.embed(...)``.

The same config as ``excb train key=value ...`` and a job body (excb.config.resolve), given as keyword arguments:
``excb.train(data="digits", out="runs/x", budget="2m", max_steps=100, **{"model.backbone": "timm:resnet18"})``.
Keys the caller sets are pinned, as on the command line: the fitted recipe (recipe=auto) keeps them.
(``excb.inference.export`` is the module behind ``excb export``, hence ``export_onnx`` / ``export_weights`` here.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

# The trainer, the exporters and the models are imported by the function that uses them: reaching
# ``excb.TrainedRun`` (excb/__init__.py re-exports this module lazily) loads no torchvision or ONNX.

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class TrainedRun:
    """What ``excb.train`` returns: where the run is, how far it got, its last metrics and its files."""

    out: Path
    status: str  # "completed" (an interrupted run raises excb.training.trainer.TrainingInterrupted)
    steps: int
    epochs: int
    metrics: dict[str, float]  # the last step row of metrics.jsonl: loss, lr, balance (s_*), img_per_s, ...
    summary: dict[str, Any] = field(repr=False)  # summary.json: totals, timing, final balance
    config: Path = field(repr=False)  # out/config.yaml: the resolved (and fitted) config
    checkpoint: Path = field(repr=False)  # out/checkpoints/last.pt (resume, excb export, excb eval)
    weights: Path = field(repr=False)  # out/backbone.safetensors (+ backbone.json): excb.models.load_backbone
    metrics_file: Path = field(repr=False)  # out/metrics.jsonl: every row of the run

    def export_onnx(self, out: PathLike, **options: Any) -> dict[str, Any]:
        """This run's ONNX bundle (parity checked); see :func:`export_onnx`."""
        return export_onnx(self.out, out, **options)

    def load_backbone(self, features: str = "embedding", device: str = "cpu") -> nn.Module:
        """The teacher as a torch module: the served embedding, or ``features="backbone"`` to fine-tune."""
        from excb.models.weights import load_backbone

        return load_backbone(self.out, device, features)


def _last_step_metrics(metrics_file: Path) -> dict[str, float]:
    last: dict[str, Any] = {}
    if metrics_file.exists():
        for line in metrics_file.read_text().splitlines():
            if line.strip() and '"type": "step"' in line:
                last = json.loads(line)
    return {k: float(v) for k, v in last.items()
            if k not in ("type", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def train(data: str | None = None, out: PathLike | None = None, budget: str | None = None, *,
          preset: str | None = None, config: PathLike | None = None,
          should_stop: Callable[[], bool] | None = None, **overrides: Any) -> TrainedRun:
    """Train (or resume) a run; returns it. Settings, in increasing priority: ``preset``, ``config`` (a YAML/JSON
    file), then ``data``/``out``/``budget`` and ``overrides`` (dotted keys via ``**{"optim.lr": 0.1}``, sections as
    dicts: ``model={"backbone": "torchvision:resnet34"}``, short keys such as ``max_steps``, ``arch``).
    Config mistakes raise :class:`excb.config.ConfigError` naming the field."""
    from excb.config import deep_merge, dotted_to_tree, load_file, resolve
    from excb.training.checkpoint import CHECKPOINT_DIR, LAST
    from excb.training.trainer import train as run_training

    given = {"data": data, "out": None if out is None else str(out), "budget": budget}
    tree = dotted_to_tree([*((k, v) for k, v in given.items() if v is not None), *overrides.items()])
    raw = deep_merge(load_file(Path(config)), tree) if config is not None else tree
    result = run_training(resolve(raw, preset_name=preset), should_stop=should_stop)
    run_dir = Path(result.run_dir)
    return TrainedRun(out=run_dir, status=result.status, steps=result.steps, epochs=result.epochs_completed,
                      metrics=_last_step_metrics(run_dir / "metrics.jsonl"), summary=result.summary,
                      config=run_dir / "config.yaml", checkpoint=run_dir / CHECKPOINT_DIR / LAST,
                      weights=run_dir / "backbone.safetensors", metrics_file=run_dir / "metrics.jsonl")


def export_onnx(run: PathLike, out: PathLike, **options: Any) -> dict[str, Any]:
    """``excb export RUN --out DIR``: the servable ONNX bundle (raises excb.inference.export.ParityError when
    parity fails); returns model.json. Options: parity_images, parity_data, parity_count, opset."""
    from excb.inference.export import export_bundle

    return export_bundle(run, out, **options)


def export_weights(run: PathLike, out: PathLike) -> dict[str, Any]:
    """``excb export RUN --format torch --out DIR``: the teacher's weights for fine-tuning; returns backbone.json."""
    from excb.inference.weights_export import export_weights as export

    return export(run, out)


def embed(folder: PathLike, model: PathLike, out: PathLike, **options: Any) -> dict[str, Any]:
    """``excb embed FOLDER --model BUNDLE --out FILE`` (.npy or .parquet): every image's embedding and cluster."""
    from excb.inference.embed_folder import embed_folder

    return embed_folder(folder, model, out, **{"progress": False, **options})


API: Sequence[str] = ("train", "export_onnx", "export_weights", "embed", "TrainedRun")

__all__ = list(API)
