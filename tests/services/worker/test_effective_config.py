"""The job's effective config (issue 27 item 1): a job submitted without a preset is fitted at train time
(excb/training/recipe.py) and sized by its budget; the worker reports what runs (the run's config.yaml after both)
and the recipe's reasons back to the job row as soon as the trainer writes them. Real SQLite job store, real trainer."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from excb.config import RUN_CONFIG, resolve
from services.db import jobs as store
from services.db.session import Database
from services.settings import Settings
from services.worker.runner import JobRunner
from support.training import image_folder


@pytest.mark.slow
def test_the_worker_reports_the_fitted_config_and_the_budgets_step_count(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, data_roots=[tmp_path / "data"], database_url=f"sqlite:///{tmp_path / 'j.db'}",
                        progress_interval_seconds=0.3, heartbeat_seconds=0.3)
    folder = image_folder(tmp_path / "data" / "photos", 300)
    db = Database(settings.database_url)
    run_dir = Path(settings.runs_dir) / "j-eff"
    requested = resolve({"data": {"source": str(folder), "num_workers": 0}, "budget": "15s"}).model_dump(mode="json")
    store.create_job(db, job_id="j-eff", owner=None, idempotency_key=None, name=None, config=requested,
                     request={}, run_dir=str(run_dir), max_attempts=1)
    assert requested["model"]["num_clusters"] == 65536 and requested["batch_size"] == 1024  # what was submitted
    assert store.get_job(db, "j-eff").effective_config is None

    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(JobRunner(db, settings, "j-eff").run()))
    worker.start()
    seen_while_running = None
    deadline = time.monotonic() + 300
    while worker.is_alive() and time.monotonic() < deadline:
        job = store.get_job(db, "j-eff")
        if job.effective_config is not None and job.status in ("STARTING", "RUNNING"):
            seen_while_running = job.effective_config
            break
        time.sleep(0.2)
    worker.join(timeout=600)
    assert outcome == ["succeeded"]
    assert seen_while_running is not None, "the fitted config must reach the job row while the job runs"
    assert seen_while_running["model"]["num_clusters"] == 64 and seen_while_running["batch_size"] == 32

    job = store.get_job(db, "j-eff")
    ran = yaml.safe_load((run_dir / RUN_CONFIG).read_text())
    plan = json.loads((run_dir / "recipe.json").read_text())
    eff = job.effective_config
    assert (eff["model"]["num_clusters"], eff["batch_size"], eff["augment"]["global_size"]) == (64, 32, 32)
    assert eff["max_steps"] == ran["max_steps"] == plan["length"]["max_steps"]  # the budget's count, final
    assert job.config == requested  # what was submitted stays as it was
    recipe = job.recipe
    assert recipe["fitted"] and recipe["reasons"] == plan["reasons"]
    assert any(r.startswith("model.num_clusters=64: ") for r in recipe["reasons"])
    assert recipe["data"].startswith("300 images, median 32x32 px")
    steps = recipe["steps"]
    assert steps["chosen_by"] == "budget" and steps["max_steps"] == eff["max_steps"] and steps["budget"] == "15s"
    assert steps["line"].startswith(f"max_steps={eff['max_steps']}: budget 15s at ")
