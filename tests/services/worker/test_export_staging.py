"""An export killed with its worker leaves its staging dir (models/.m-<id>.tmp) behind (issue 33's soak); the
next export removes the ones unwritten for longer than export_staging_stale_seconds and keeps a running one's.
A real trainer and a real export child through services/worker/runner.py, on a SQLite job store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from excb.config import resolve
from services.db import jobs as store
from services.db.session import Database
from services.settings import Settings
from services.worker.runner import JobRunner
from support.services import tiny_job


def _left_behind(models: Path, name: str, age_s: float) -> Path:
    """What a killed export leaves: a hidden dir with a partial bundle, last written ``age_s`` ago."""
    staging = models / name
    staging.mkdir(parents=True)
    (staging / "model.onnx").write_bytes(b"\0" * 1024)
    then = time.time() - age_s
    for path in (staging / "model.onnx", staging):
        os.utime(path, (then, then))
    return staging


@pytest.mark.slow
def test_the_next_export_removes_stale_staging_dirs_and_succeeds(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    settings = Settings(home=tmp_path, data_roots=[tmp_path / "data"], export_parity_images=16,
                        database_url=f"sqlite:///{tmp_path / 'jobs.sqlite'}", export_staging_stale_seconds=600)
    db = Database(settings.database_url)
    models = settings.resolved_models_dir
    stale = _left_behind(models, ".m-0123456789ab.tmp", age_s=3600)
    recent = _left_behind(models, ".m-ba9876543210.tmp", age_s=60)  # as if another worker were exporting now
    run_dir = Path(settings.runs_dir) / "j-exp"
    store.create_job(db, job_id="j-exp", owner=None, idempotency_key=None, name=None,
                     config=resolve(tiny_job(max_steps=2, **{"data.limit": 64})).model_dump(mode="json"),
                     request={}, run_dir=str(run_dir), max_attempts=2)
    assert JobRunner(db, settings, "j-exp").run() == "succeeded"
    job = store.get_job(db, "j-exp")
    assert job.status == "SUCCEEDED" and (models / job.model_id / "model.onnx").is_file()
    assert not stale.exists() and recent.is_dir()
    assert sorted(p.name for p in models.glob(".m-*.tmp")) == [recent.name]  # its own staging dir became the bundle
