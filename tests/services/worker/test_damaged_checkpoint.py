"""A run whose last.pt is damaged and has no previous.pt (issue 33's soak: garbage over its middle third) starts
over instead of failing its job; its old files are kept under RUN/replaced/. A real trainer and export through
services/worker/runner.py on a SQLite job store; the checkpoint is a real torch.save archive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from excb.config import resolve
from excb.training.checkpoint import damage
from services.db import jobs as store
from services.db.session import Database
from services.settings import Settings
from services.worker.runner import JobRunner
from support.services import tiny_job


def _corrupt_middle_third(path: Path) -> None:
    """As the soak's fault does: garbage over the middle third of the file."""
    data = bytearray(path.read_bytes())
    third = len(data) // 3
    data[third:2 * third] = bytes((i * 131 + 7) % 251 for i in range(third))
    path.write_bytes(bytes(data))


def _checkpoint_like() -> dict:
    """Many small tensors, as a model's state dict has: garbage over a third of the file hits archive headers."""
    return {"step": 5, "student": {f"block{i}.weight": torch.randn(16) for i in range(300)}}


def test_damage_finds_a_corrupted_or_truncated_checkpoint_without_loading_it(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    torch.save(_checkpoint_like(), path)
    assert damage(path) is None
    whole = path.read_bytes()
    _corrupt_middle_third(path)
    assert damage(path) is not None
    with pytest.raises(RuntimeError):  # what the trainer's resume raised in the soak ("archive is corrupted")
        torch.load(path, weights_only=True)
    path.write_bytes(whole[: len(whole) // 2])
    assert damage(path) is not None
    # garbage inside one tensor's bytes only: torch.load reads it as weights; the CRC check does not
    torch.save({"step": 3, "w": torch.randn(128, 128)}, path)
    _corrupt_middle_third(path)
    torch.load(path, weights_only=True)
    assert "fails its CRC check" in (damage(path) or "")


@pytest.mark.slow
def test_a_run_whose_only_checkpoint_is_damaged_starts_over_and_keeps_its_files(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    settings = Settings(home=tmp_path, data_roots=[tmp_path / "data"], export_parity_images=16,
                        database_url=f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    db = Database(settings.database_url)
    run_dir = Path(settings.runs_dir) / "j-dmg"
    store.create_job(db, job_id="j-dmg", owner=None, idempotency_key=None, name=None,
                     config=resolve(tiny_job(max_steps=2, **{"data.limit": 64})).model_dump(mode="json"),
                     request={}, run_dir=str(run_dir), max_attempts=2)
    (run_dir / "checkpoints").mkdir(parents=True)
    last = run_dir / "checkpoints" / "last.pt"
    torch.save(_checkpoint_like(), last)
    _corrupt_middle_third(last)
    old_row = {"type": "train", "step": 5, "loss": 1.0}
    (run_dir / "metrics.jsonl").write_text(json.dumps(old_row) + "\n")
    assert JobRunner(db, settings, "j-dmg").run() == "succeeded"  # was: FAILED with torch's "corrupted" error
    job = store.get_job(db, "j-dmg")
    assert job.status == "SUCCEEDED" and job.attempt == 1 and job.failures == 0
    assert job.progress["step"] == 2  # trained from step 0, not from the damaged step 5
    aside = list((run_dir / "replaced").iterdir())
    assert len(aside) == 1  # nothing lost: the damaged checkpoint and the old metrics are kept there
    assert damage(aside[0] / "checkpoints" / "last.pt") is not None  # the damaged file itself, as it was
    assert json.loads((aside[0] / "metrics.jsonl").read_text()) == old_row
    assert damage(last) is None  # the new run's own checkpoint
    log = (run_dir / "job.log").read_text()
    assert "checkpoint damaged (last.pt: " in log and "the run starts over from step 0" in log, log[-2000:]


def test_resume_skips_a_last_pt_whose_tensor_bytes_are_garbage(tmp_path: Path) -> None:
    """Garbage inside one tensor's bytes still loads with torch.load (as wrong weights); the resume checks the
    archive's CRCs first and takes previous.pt instead of training on from garbage."""
    from excb.training.checkpoint import LAST, PREVIOUS, checkpoint_dir, load_resumable, save_checkpoint

    last = checkpoint_dir(tmp_path) / LAST
    save_checkpoint(last, {"step": 10, "w": torch.ones(128, 128)})
    save_checkpoint(last, {"step": 20, "w": torch.ones(128, 128) * 2}, keep_previous=True)
    assert (last.parent / PREVIOUS).is_file()
    _corrupt_middle_third(last)
    assert int(torch.load(last, weights_only=True)["step"]) == 20  # torch alone would resume from it
    found = load_resumable(tmp_path)
    assert found is not None
    state, path = found
    assert path.name == PREVIOUS and state["step"] == 10
