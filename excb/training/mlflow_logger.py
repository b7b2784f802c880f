"""``logger=mlflow``: the run's metric rows as MLflow metrics, beside metrics.jsonl (as excb/training/tb_logger.py does
for TensorBoard, with the same rows: :func:`excb.training.tb_logger.scalars`).

Where: ``mlflow.tracking_uri``, else ``EXCB_MLFLOW_TRACKING_URI``, else a local store in ``out/mlruns/``. That
local store is a SQLite file (``out/mlruns/mlflow.db``, artifacts beside it in ``out/mlruns/artifacts``) rather
than MLflow's plain file store: MLflow 3 refuses the file store ("maintenance mode") unless
``MLFLOW_ALLOW_FILE_STORE=true``. Read it with ``mlflow ui --backend-store-uri sqlite:///out/mlruns/mlflow.db``
or ``MlflowClient("sqlite:///...")``.

One MLflow run per training run: its id is kept in ``out/mlflow.json``, so a resume logs into the same run (steps
logged after the checkpoint it resumes from appear twice: MLflow cannot delete metric values). The resolved config
goes in as params on the first start, config.yaml and summary.json as artifacts at the end.
Needs ``pip install 'excb[mlflow]'`` (mlflow-skinny, plus SQLAlchemy and Alembic for the SQLite store).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from excb.config import ConfigError, TrainConfig
from excb.fileio import atomic_write
from excb.training.tb_logger import scalars

ENV_TRACKING_URI = "EXCB_MLFLOW_TRACKING_URI"
STORE_DIR = "mlruns"
RUN_FILE = "mlflow.json"  # {tracking_uri, experiment_id, run_id}: a resume logs into the same MLflow run
FLUSH_METRICS = 500  # buffered metric values before a write (one log_batch call; MLflow takes up to 1000)
FLUSH_SECONDS = 10.0
_STATUS = {"completed": "FINISHED", "interrupted": "KILLED", "superseded": "KILLED", "failed": "FAILED"}


def tracking_uri(cfg: TrainConfig, run_dir: Path) -> str:
    """The config's URI, else the environment's, else the SQLite store in ``out/mlruns``."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get(ENV_TRACKING_URI):
        return os.environ[ENV_TRACKING_URI]
    store = (run_dir / STORE_DIR).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _flat_params(cfg: TrainConfig) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, JSON values (MLflow caps a value at 6000 characters)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = json.dumps(node)[:6000]

    walk(json.loads(cfg.model_dump_json()), "")
    return out


class MlflowLogger:
    """A trainer sink: numeric fields of metric rows as MLflow metrics at their step, written in batches."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, resumed_at: int | None = None) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError("logger", "mlflow needs the mlflow package: pip install 'excb[mlflow]'") from exc
        for name in ("mlflow", "alembic"):  # the store's set-up chatter (table creation) at WARNING, as elsewhere
            logging.getLogger(name).setLevel(max(logging.getLogger(name).level, logging.WARNING))
        self.run_dir = run_dir
        self.uri = tracking_uri(cfg, run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.pending: list[Any] = []
        self.last_write = time.monotonic()
        continued = self._continued_run() if resumed_at is not None else None
        self.run_id: str = continued if continued is not None else self._new_run(cfg)

    def _continued_run(self) -> str | None:
        """The MLflow run of the training run being resumed (same store), set back to RUNNING."""
        path = self.run_dir / RUN_FILE
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        if saved.get("tracking_uri") != self.uri:
            return None
        self.client.update_run(saved["run_id"], status="RUNNING")
        return str(saved["run_id"])

    def _new_run(self, cfg: TrainConfig) -> str:
        from mlflow.entities import Param

        name = cfg.mlflow.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # a SQLite store keeps artifacts beside it (MLflow's default: ./mlruns of the working directory)
            local = self.uri.startswith("sqlite:///")
            location = (Path(self.uri[len("sqlite:///"):]).parent / "artifacts").as_uri() if local else None
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        run = self.client.create_run(experiment_id, run_name=cfg.mlflow.run_name or self.run_dir.resolve().name,
                                     tags={"excb.out": str(self.run_dir.resolve())})
        params = [Param(k, v) for k, v in _flat_params(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        atomic_write(self.run_dir / RUN_FILE, json.dumps({"tracking_uri": self.uri, "experiment_id": experiment_id,
                                                          "run_id": run.info.run_id}))
        return str(run.info.run_id)

    def __call__(self, event: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if event.get("type") == "done":
            self._finish()
            return
        step, stamp = int(event.get("step", 0)), int(float(event.get("time", time.time())) * 1000)
        self.pending += [Metric(tag, value, stamp, step) for tag, value in scalars(event)]
        if len(self.pending) >= FLUSH_METRICS or time.monotonic() - self.last_write >= FLUSH_SECONDS:
            self._write()

    def _write(self) -> None:
        for i in range(0, len(self.pending), 1000):
            self.client.log_batch(self.run_id, metrics=self.pending[i:i + 1000])
        self.pending = []
        self.last_write = time.monotonic()

    def flush(self, status: str = "completed") -> None:
        """Called when the loop ends, however it ends: pending values written; a run that stops before "done"
        (interrupted, superseded, failed) is marked KILLED or FAILED in MLflow."""
        self._write()
        if status != "completed":
            self.client.set_terminated(self.run_id, status=_STATUS.get(status, "FAILED"))

    def _finish(self) -> None:
        self._write()
        for name in ("config.yaml", "summary.json"):
            if (self.run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id, status="FINISHED")


__all__ = ["MlflowLogger", "tracking_uri", "ENV_TRACKING_URI", "RUN_FILE"]
