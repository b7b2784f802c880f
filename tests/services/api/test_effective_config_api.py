"""The job API's requested and effective configs (issue 27 items 1 and 5): what was submitted, what runs (the
recipe fitted at train time, reported by the worker from the run directory), the recipe's reasons, and
`excb jobs status` reading them without printing a None. Real SQLite job store, real recipe fit, no training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from excb.config import RUN_CONFIG, dump_yaml, validate
from excb.fileio import atomic_write
from excb.training.plan import PLAN_FILE
from excb.training.recipe import fit_config
from services.api.cli import status_lines
from services.db import jobs as store
from services.db.session import Database
from services.worker.plan import RunPlan
from support.training import image_folder

KEY = {"Authorization": "Bearer alpha-secret"}


def _stack(make_stack: Any, tmp_path: Path) -> Any:
    (tmp_path / "keys").write_text("alpha-secret\n")
    stack = make_stack(f"sqlite:///{tmp_path / 'jobs.sqlite'}", None, api_keys_file=tmp_path / "keys")
    image_folder(stack.data_root / "photos", 300)
    stack.start_api()
    return stack


def _trainer_writes_its_plan(run_dir: Path, requested: dict[str, Any]) -> None:
    """What excb/training/plan.py's write_plan leaves in the run dir at the start of a budgeted recipe=auto run."""
    fitted, recipe = fit_config(validate({**requested, "out": str(run_dir)}), torch.device("cpu"))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / RUN_CONFIG, dump_yaml(fitted))
    atomic_write(run_dir / PLAN_FILE, json.dumps(recipe.to_json() if recipe else {}))


def test_the_job_shows_what_was_submitted_then_what_runs(make_stack: Any, tmp_path: Path) -> None:
    stack = _stack(make_stack, tmp_path)
    c, db = stack.client, stack.app.state.plane.db
    job = c.post("/v1/jobs", json={"data": "photos", "budget": "30s"}, headers=KEY).json()
    assert job["requested"] == job["config"] and job["requested"]["model"]["num_clusters"] == 65536
    assert job["effective"] is None and job["recipe"] is None  # not known before the trainer starts

    queued = "\n".join(status_lines(c.get(f"/v1/jobs/{job['id']}", headers=KEY).json()))
    assert "None" not in queued and "null" not in queued, queued
    assert "progress: not started" in queued
    assert "K=65536" not in queued  # a recipe=auto job's submitted K is not what will run
    assert "config:   fitted to the data when training starts (recipe=auto)" in queued

    server_id = job["config"]["out"].split("/", 1)[1]
    row = store.get_job(db, server_id)
    plan = RunPlan(Path(row.run_dir))  # the worker takes its signature before the trainer starts
    assert plan.pending() == {}
    _trainer_writes_its_plan(Path(row.run_dir), row.config)
    lease = store.acquire(db, server_id, "host:1")
    assert store.heartbeat(db, lease, **plan.pending())[0]
    plan.confirm()
    assert plan.pending() == {}  # sent once per new recipe.json

    job = c.get(f"/v1/jobs/{job['id']}", headers=KEY).json()
    eff = job["effective"]
    assert (eff["model"]["num_clusters"], eff["batch_size"], eff["augment"]["global_size"]) == (64, 32, 32)
    assert job["requested"]["model"]["num_clusters"] == job["config"]["model"]["num_clusters"] == 65536
    assert eff["out"] == job["config"]["out"] and eff["data"]["source"] == "photos"  # no server paths with keys
    assert str(tmp_path) not in json.dumps(job)
    recipe = job["recipe"]
    assert recipe["fitted"] and recipe["data"].startswith("300 images, median 32x32 px") and recipe["device"] == "cpu"
    assert any(r.startswith("model.num_clusters=64: ") for r in recipe["reasons"])
    assert recipe["kept"] == ["budget"]  # what the submit set, which the recipe left alone
    assert recipe["steps"]["chosen_by"] == "budget_pending" and recipe["steps"]["max_steps"] is None

    running = "\n".join(status_lines(job))
    assert "None" not in running and "null" not in running, running
    assert "K=64, batch 32, 32 px, resnet18 width 16 (as run; recipe fitted to 300 images" in running
    assert "steps:    budget 30s: max_steps is set at the start by timing real steps" in running
    assert f"recipe:   {recipe['reasons'][0]}" in running


def test_migration_adds_the_effective_columns_to_existing_jobs(tmp_path: Path, make_stack: Any) -> None:
    """0005 on a job store of 0004: old rows read back with ``effective`` and ``recipe`` null."""
    from sqlalchemy import text

    from support.services import database_at_revision

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    database_at_revision(url, "0004")
    old = Database(url, run_migrations=False)
    config = {"data": {"source": "digits"}, "max_steps": 5}
    with old.engine.begin() as conn:
        conn.execute(text("INSERT INTO jobs (id, client_ref, status, config, request, run_dir, attempt, failures, "
                          "max_attempts, lease_token, cancel_requested, publish_count, progress, latest_metrics, "
                          "balance, artifacts, created_at, updated_at) VALUES ('j-old', :ref, 'SUCCEEDED', :config, "
                          "'{}', '/runs/j-old', 1, 0, 3, 1, 0, 1, '{}', '{}', '{}', '{}', '2026-01-01 00:00:00', "
                          "'2026-01-01 00:00:00')"), {"ref": ":j-old", "config": json.dumps(config)})
    old.dispose()
    c = make_stack(url, None).start_api()
    job = c.get("/v1/jobs/j-old").json()
    assert job["requested"] == job["config"] == config and job["effective"] is None and job["recipe"] is None
    assert "None" not in "\n".join(status_lines(job))


def test_the_steps_line_names_every_budget_correction() -> None:
    """A budget re-times the loop up to three times: the job's steps line names each correction, not the last
    only; a plan written before corrections were listed still names its one step."""
    from excb.config import resolve
    from services.worker.plan import steps_summary

    cfg = resolve(overrides=["data=digits", "budget=10m", "max_steps=2819"])
    cal = {"seconds_per_step": 0.318, "seconds_before_training": 12.0}
    plan = {"calibration": cal, "corrected_at_step": 1396,
            "corrections": [{"step": 177, "steps": 1823}, {"step": 638, "steps": 2327}, {"step": 1396, "steps": 2819}]}
    out = steps_summary(plan, cfg)
    assert out["corrected_at_step"] == 1396
    assert out["line"].endswith("(corrected at steps 177, 638, 1396 from the loop's pace)"), out["line"]
    older = steps_summary({"calibration": cal, "corrected_at_step": 177}, cfg)
    assert older["line"].endswith("(corrected at step 177 from the loop's pace)"), older["line"]
