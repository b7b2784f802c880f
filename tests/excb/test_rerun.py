"""Re-running a command never mixes two runs (issue 15 §4): resume, refuse, overwrite, warm start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from excb.config import ConfigError, dump_yaml, load_file, resolve
from excb.training.checkpoint import load_checkpoint
from excb.training.rerun import RunConfigMismatch, config_differences, may_change, warm_start, without_keys
from excb.training.trainer import Run, TrainingInterrupted, train
from support.training import TINY, tiny

torch.set_num_threads(1)

def stop_after(n: int):
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    return should_stop


def step_rows(out: Path) -> list[int]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["step"] for r in rows if r["type"] == "step"]


def test_rules_are_listed_in_one_place() -> None:
    for key in ("epochs", "max_steps", "budget", "progress", "resume", "log_every_steps", "histogram_every_steps",
                "checkpoint_every_steps", "data.num_workers", "eval.knn_k", "compile", "out"):
        assert may_change(key), key
    for key in ("optim.lr", "model.num_clusters", "seed", "data.source", "checkpoint", "eval"):
        assert not may_change(key), key
    diffs = config_differences({"optim": {"lr": 0.1}, "epochs": 1, "gone": 1}, {"optim": {"lr": 0.2}, "epochs": 2})
    assert diffs == {"optim.lr": (0.1, 0.2)}
    assert without_keys({"optim": {"lr": 1, "name": "x"}, "model": {"a": 1}}, ["optim.lr", "model"]) == \
        {"optim": {"name": "x"}}


def test_fitted_recipe_same_command_resumes_and_other_lr_is_refused(tmp_path: Path) -> None:
    """recipe=auto: a re-run compares the config after the stored recipe is applied; the user's pinned keys
    are what they typed. The worker's retry (its job.yaml, a full dump) resumes too."""
    out = tmp_path / "fit"
    over = ["data=digits", f"out={out}", "max_steps=4", "model.width=8", "augment.num_local_crops=2",
            "model.projector_hidden_dim=32", "model.predictor_hidden_dim=32", "kmeans.samples=256",
            "progress=false", "data.num_workers=0"]
    with pytest.raises(TrainingInterrupted):
        train(resolve(overrides=over), should_stop=stop_after(2))
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(RunConfigMismatch) as err:  # the fitted lr was 2e-3-ish; this one is typed
        train(resolve(overrides=[*over, "optim.lr=0.1"]))
    assert isinstance(err.value, ConfigError) and "optim.lr" in str(err.value) and "overwrite=true" in str(err.value)
    assert (out / "config.yaml").read_text() == config_before, "a refused re-run must not rewrite config.yaml"
    job_yaml = tmp_path / "job.yaml"  # what services/worker writes and retries with
    job_yaml.write_text(yaml.safe_dump(resolve(overrides=over).model_dump(mode="json"), sort_keys=False))
    with pytest.raises(TrainingInterrupted):
        train(resolve(load_file(job_yaml)), should_stop=stop_after(1))
    result = train(resolve(overrides=[*over, "budget=5m", "epochs=3"]))  # length fields may change
    assert result.steps == 4 and step_rows(out) == [1, 2, 3, 4]


@pytest.mark.slow
def test_cli_rerun_with_other_lr_is_one_clean_line(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    base = [sys.executable, "-m", "excb.cli", "train", "--preset", "cpu-small", *TINY, f"out={out}", "max_steps=1"]
    subprocess.run(base, check=True, capture_output=True, env={"OMP_NUM_THREADS": "1", **_env()})
    r = subprocess.run([*base, "optim.lr=0.1"], capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", **_env()})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("excb:")]
    assert len(line) == 1 and "optim.lr" in line[0] and "overwrite=true" in line[0] and "out=" in line[0]


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_other_num_clusters_is_the_same_clean_error(tmp_path: Path) -> None:
    out = tmp_path / "k"
    train(tiny(out, "max_steps=1"))
    with pytest.raises(RunConfigMismatch, match="model.num_clusters: 32 -> 64"):
        train(tiny(out, "max_steps=2", "model.num_clusters=64"))
    with pytest.raises(ConfigError, match="resume=never"):
        train(tiny(out, "max_steps=2", "resume=never"))


def test_overwrite_starts_over_and_keeps_the_old_run_aside(tmp_path: Path) -> None:
    out = tmp_path / "o"
    train(tiny(out, "max_steps=2"))
    result = train(tiny(out, "max_steps=3", "optim.lr=1e-3", "overwrite=true"))
    assert result.steps == 3 and step_rows(out) == [1, 2, 3]
    aside = list((out / "replaced").iterdir())
    assert len(aside) == 1 and load_checkpoint(aside[0] / "checkpoints" / "last.pt")["step"] == 2
    assert load_file(out / "config.yaml")["optim"]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="choose one"):
        tiny(out, "overwrite=true", "resume=must")


def test_checkpoint_warm_start(tmp_path: Path) -> None:
    """checkpoint=PATH: the source's weights (the teacher exactly), its size estimate when K matches, step 0."""
    src = tmp_path / "src"
    train(tiny(src, "max_steps=3"))
    source = load_checkpoint(src / "checkpoints" / "last.pt")
    from excb.distributed import setup

    run = Run(tiny(tmp_path / "w", "max_steps=2"), setup("cpu"))
    info = warm_start(run.learner, str(src))
    assert info["centroids_loaded"] and info["sizes_loaded"] and info["source_step"] == 3
    for key, value in run.learner.teacher.state_dict().items():
        assert torch.equal(value, source["teacher"][key]), key
    assert torch.equal(run.learner.balancer.sizes, source["balancer"]["sizes"])
    assert run.step == 0 and not run.learner.optimizer.state

    other_k = Run(tiny(tmp_path / "k", "max_steps=2", "model.num_clusters=16"), setup("cpu"))
    info = warm_start(other_k.learner, str(src / "checkpoints" / "last.pt"))
    assert not info["centroids_loaded"] and not info["sizes_loaded"]
    key = "backbone.conv1.weight" if "backbone.conv1.weight" in source["teacher"] else next(iter(source["teacher"]))
    assert torch.equal(other_k.learner.teacher.state_dict()[key], source["teacher"][key])
    with pytest.raises(ConfigError, match="does not fit"):
        warm_start(Run(tiny(tmp_path / "x", "model.width=16"), setup("cpu")).learner, str(src))

    result = train(tiny(tmp_path / "warm", "max_steps=2", f"checkpoint={src}"))
    rows = [json.loads(x) for x in (tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and step_rows(tmp_path / "warm") == [1, 2]
    assert any(r["type"] == "warm_start" for r in rows) and not any(r["type"] == "kmeans" for r in rows)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(tiny(tmp_path / "none", "max_steps=1", f"checkpoint={tmp_path / 'missing'}"))


def test_dump_round_trip_carries_the_new_fields() -> None:
    cfg = resolve(overrides=["overwrite=true", "checkpoint=runs/a"])
    again = resolve(yaml.safe_load(dump_yaml(cfg)))
    assert again.overwrite is True and again.checkpoint == "runs/a"


def test_api_warm_start_path_stays_inside_runs_and_data_roots(tmp_path: Path, make_stack) -> None:
    """checkpoint= over the job API: another job's run directory is fine, any other file on the server is not."""
    data = tmp_path / "data"
    data.mkdir()
    stack = make_stack(f"sqlite:///{tmp_path / 'jobs.sqlite'}", None)
    stack.env["EXCB_DATA_ROOTS"] = f'["{data}"]'
    client = stack.start_api()
    earlier = stack.settings().runs_dir / "earlier-job"
    (earlier / "checkpoints").mkdir(parents=True)
    body = {"preset": "cpu-small", "max_steps": 5, "data": "digits"}
    ok = client.post("/v1/jobs", json={**body, "checkpoint": "earlier-job"})
    assert ok.status_code == 201, ok.text
    assert Path(ok.json()["config"]["checkpoint"]).name == "earlier-job" or "earlier-job" in ok.text
    for bad in ["/etc/passwd", "../../secret.pt"]:
        r = client.post("/v1/jobs", json={**body, "checkpoint": bad})
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["type"] == "path_not_allowed" and r.json()["error"]["field"] == "checkpoint"
