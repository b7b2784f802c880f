"""services/worker/runner.py directly: one attempt of one job against a real SQLite job store and a real trainer
process; what it refuses before training, and the one config file a run has."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from excb.config import RUN_CONFIG, resolve, validate
from excb.training.checkpoint import load_checkpoint
from services.db import jobs as store
from services.db.session import Database
from services.settings import Settings
from services.worker.runner import JobRunner
from support.services import tiny_job


def _settings(tmp: Path) -> Settings:
    (tmp / "data").mkdir(exist_ok=True)
    return Settings(home=tmp, data_roots=[tmp / "data"], database_url=f"sqlite:///{tmp / 'jobs.sqlite'}")


def _create(db: Database, settings: Settings, job_id: str, body: dict) -> Path:
    """A job row as POST /v1/jobs stores it: the body resolved (preset applied, what was typed pinned)."""
    run_dir = Path(settings.runs_dir) / job_id
    config = resolve(body).model_dump(mode="json")
    store.create_job(db, job_id=job_id, owner=None, idempotency_key=None, name=None, config=config, request={},
                     run_dir=str(run_dir), max_attempts=2)
    return run_dir


def test_a_source_outside_the_data_roots_fails_the_job_before_any_file_is_written(tmp_path: Path) -> None:
    """The API checks sources on submit; a row that did not come through it (or a tree changed since) is
    refused again here, terminally (no retry), and no trainer starts."""
    settings = _settings(tmp_path)
    db = Database(settings.database_url)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run_dir = _create(db, settings, "j-outside", tiny_job(**{"data.source": str(outside)}))
    assert JobRunner(db, settings, "j-outside").run() == "failed"
    job = store.get_job(db, "j-outside")
    assert job.status == "FAILED" and job.error["type"] == "path_not_allowed"
    assert not (run_dir / RUN_CONFIG).exists() and not (run_dir / "job.log").exists()
    assert [a.outcome for a in store.attempts(db, "j-outside")] == ["path_not_allowed"]


@pytest.mark.slow
def test_the_run_has_one_config_file_which_the_trainer_completes(tmp_path: Path) -> None:
    """The worker hands the trainer the job's stored config (validated once, at submit) and writes no config file;
    the trainer writes RUN/config.yaml, which re-resolves to the config it ran (no second job file)."""
    settings = _settings(tmp_path)
    db = Database(settings.database_url)
    run_dir = _create(db, settings, "j-one", tiny_job(max_steps=2, **{"data.limit": 64}))
    assert JobRunner(db, settings, "j-one").run() == "succeeded"
    assert store.get_job(db, "j-one").status == "SUCCEEDED"
    assert not (run_dir / "job.yaml").exists()
    written = yaml.safe_load((run_dir / RUN_CONFIG).read_text())
    assert written["out"] == str(run_dir) and written["max_steps"] == 2 and written["data"]["limit"] == 64
    ran = load_checkpoint(run_dir / "checkpoints" / "last.pt")["config"]
    assert resolve(written).model_dump(mode="json") == validate(ran).model_dump(mode="json")


def test_a_folder_where_nothing_decodes_fails_the_job_with_one_clear_line(tmp_path: Path) -> None:
    """Issue 27 item 3: the trainer stops on its data check (exit 2); the job fails at once (no retry) and its error
    is that one line, not a log tail or a k-means traceback."""
    settings = _settings(tmp_path)
    db = Database(settings.database_url)
    bad = tmp_path / "data" / "bad"
    bad.mkdir()
    for i in range(50):
        (bad / f"{i:03d}.jpg").write_bytes(os.urandom(2000))
    body = tiny_job(**{"data.source": str(bad)})
    body.pop("preset", None)  # the default recipe, as a user submits it
    run_dir = _create(db, settings, "j-bad", body)
    assert JobRunner(db, settings, "j-bad").run() == "failed"
    assert not (run_dir / RUN_CONFIG).exists()  # the trainer, its one writer, stopped before fitting a recipe
    job = store.get_job(db, "j-bad")
    assert job.status == "FAILED" and job.attempt == 1 and job.error["type"] == "trainer_error"
    assert job.error["message"].startswith(f"data source '{bad}': 0 of 50 files decode as images (first error: ")
    assert "\n" not in job.error["message"]
    assert [a.outcome for a in store.attempts(db, "j-bad")] == ["trainer_error"]
