"""The trainer tests' tiny digits run (seconds on one core), shared with the CUDA, rerun and failure-mode tests so
every suite trains the same net."""

from __future__ import annotations

import json
from pathlib import Path

from excb.config import TrainConfig, resolve

TINY = [
    "data=digits", "batch_size=32", "model.width=8", "model.num_clusters=32",
    "model.projector_hidden_dim=32", "model.bottleneck_dim=16", "model.predictor_hidden_dim=32",
    "augment.global_size=16", "augment.local_size=8", "augment.num_local_crops=2",
    "kmeans.samples=256", "kmeans.iterations=5", "progress=false", "data.num_workers=0",
    "histogram_every_steps=2", "checkpoint_every_steps=100",
]


def tiny(tmp: Path, *extra: str) -> TrainConfig:
    return resolve(preset_name="cpu-small", overrides=[*TINY, f"out={tmp}", *extra])


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def image_folder(root: Path, n: int, side: int = 32) -> Path:
    """``n`` small colour PNGs (smooth gradients with a per-image hue) directly in ``root``: an unlabelled folder
    of the kind a user points ``excb train data=FOLDER`` at."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.0, 1.0, side)
    for i in range(n):
        colour = rng.random(3)
        arr = np.outer(ramp, ramp[::-1])[..., None] * colour + rng.random((side, side, 3)) * 0.3
        Image.fromarray((arr.clip(0, 1) * 255).astype(np.uint8)).save(root / f"img_{i:04d}.png")
    return root
