"""``logger=mlflow`` (issue 32, training): a tiny run's metrics, params and artifacts read back with MLflow's own
client; a resume logs into the same MLflow run; EXCB_MLFLOW_TRACKING_URI points the logger elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient  # the test extra installs excb[mlflow]'s package: no skip

from excb.training.trainer import TrainingInterrupted, train
from support.training import read_rows, tiny

torch.set_num_threads(1)


def _history(client: object, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))  # type: ignore[attr-defined]


def test_mlflow_metrics_params_and_artifacts(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(run, "max_steps=4", "logger=mlflow", "mlflow.experiment=tiny"))
    assert (run / "mlruns" / "mlflow.db").is_file()  # the default: a local store inside out/
    saved = json.loads((run / "mlflow.json").read_text())
    assert saved["tracking_uri"] == f"sqlite:///{(run / 'mlruns' / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    found = client.get_run(saved["run_id"])
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert client.get_experiment(found.info.experiment_id).name == "tiny"
    losses = [(r["step"], r["loss"]) for r in read_rows(run) if r["type"] == "step"]
    got = _history(client, saved["run_id"], "train/loss")
    assert [s for s, _ in got] == [s for s, _ in losses] == [1, 2, 3, 4]
    assert [v for _, v in got] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert {"train/lr", "train/s_effective_clusters", "kmeans/kmeans_effective_clusters"} <= set(found.data.metrics)
    assert found.data.params["model.backbone"] == '"resnet18"' and found.data.params["logger"] == '"mlflow"'
    assert {a.path for a in client.list_artifacts(saved["run_id"])} == {"config.yaml", "summary.json"}
    assert (run / "mlruns" / "artifacts").is_dir()  # artifacts beside the store, not in the working directory


def test_resume_continues_the_mlflow_run_and_env_points_elsewhere(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "elsewhere" / "store.db"
    store.parent.mkdir()
    monkeypatch.setenv("EXCB_MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.chdir(tmp_path / "elsewhere")
    run = tmp_path / "run"
    calls = {"n": 0}

    def stop_at_3() -> bool:
        calls["n"] += 1
        return calls["n"] == 3

    args = ("max_steps=6", "checkpoint_every_steps=2", "logger=mlflow")
    with pytest.raises(TrainingInterrupted):
        train(tiny(run, *args), should_stop=stop_at_3)
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    run_id = json.loads((run / "mlflow.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    assert not (run / "mlruns").exists()  # the environment's store, not the default one
    train(tiny(run, *args))
    assert json.loads((run / "mlflow.json").read_text())["run_id"] == run_id  # the same MLflow run
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted({s for s, _ in _history(client, run_id, "train/loss")}) == list(range(1, 7))
    assert (store.parent / "artifacts").is_dir() and not (store.parent / "mlruns").exists()  # not in the cwd
