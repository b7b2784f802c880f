"""``logger=tensorboard``: the run's metrics as TensorBoard scalars, once per step across a resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from excb.training.trainer import TrainingInterrupted, train
from support.training import read_rows, tiny

torch.set_num_threads(1)
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(tb_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(run, "max_steps=4", "logger=tensorboard"))
    scalars = _scalars(run / "tb")
    losses = [(r["step"], r["loss"]) for r in read_rows(run) if r["type"] == "step"]
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in losses] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert {"train/lr", "train/s_effective_clusters", "kmeans/kmeans_effective_clusters"} <= set(scalars)
    assert not [t for t in scalars if t.endswith(("/step", "/time"))]  # counters are the x axis, not series
    train(tiny(tmp_path / "plain", "max_steps=1"))
    assert not (tmp_path / "plain" / "tb").exists()  # the default logger writes metrics.jsonl only


def test_resume_writes_each_step_once(tmp_path: Path) -> None:
    """Stopped at step 3, then last.pt damaged so the resume starts from step 2 (previous.pt): step 3 was
    already in TensorBoard and is purged, so every step of the finished run appears exactly once."""
    run = tmp_path / "run"
    calls = {"n": 0}

    def stop_at_3() -> bool:
        calls["n"] += 1
        return calls["n"] == 3

    args = ("max_steps=6", "checkpoint_every_steps=2", "logger=tensorboard")
    with pytest.raises(TrainingInterrupted):
        train(tiny(run, *args), should_stop=stop_at_3)
    assert [s for s, _ in _scalars(run / "tb")["train/loss"]] == [1, 2, 3]
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])  # unreadable: the resume falls back to previous.pt (step 2)
    train(tiny(run, *args))
    steps = [s for s, _ in _scalars(run / "tb")["train/loss"]]
    assert steps == list(range(1, 7)), steps
