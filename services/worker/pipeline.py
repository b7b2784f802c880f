"""After training: ONNX export + parity check -> bundle in the models dir -> model row -> embed service told.

The bundle lands in ``Settings.resolved_models_dir / <model_id>/`` (model.onnx + model.json). The embed
service learns about it through the file ``<models_dir>/active.json`` (``{"model_id", "bundle_dir", "sha256"}``,
replaced atomically), which works across processes and machines sharing the volume; see docs/internals.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from services.db import jobs as store
from services.db.models import ModelRow
from services.db.session import Database
from services.settings import Settings


class PipelineError(Exception):
    """Export or parity failed: the job ends FAILED with this type and message (not retried)."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(message)
        self.type = type
        self.message = message


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_and_register(db: Database, settings: Settings, job_id: str, run_dir: Path) -> tuple[str, dict[str, Any]]:
    """Export ``run_dir``, require a passed parity check, register and activate the model."""
    from excb.export import ParityError, export_bundle

    models_dir = Path(settings.resolved_models_dir).expanduser().resolve()
    model_id = f"m-{uuid.uuid4().hex[:12]}"
    staging = models_dir / f".{model_id}.tmp"
    final = models_dir / model_id
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        meta = export_bundle(str(run_dir), str(staging))
    except ParityError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise PipelineError("parity_failed", f"ONNX parity check failed: {exc}") from exc
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise PipelineError("export_failed", f"{type(exc).__name__}: {exc}") from exc
    parity = meta.get("parity") or {}
    if not parity.get("passed", False):
        shutil.rmtree(staging, ignore_errors=True)
        raise PipelineError("parity_failed", f"ONNX parity check did not pass: {parity}")
    os.replace(staging, final)
    digest = sha256_file(final / "model.onnx")
    job = store.get_job(db, job_id)
    store.add_model(db, ModelRow(id=model_id, job_id=job_id, owner=job.owner if job else None, status="READY",
                                 bundle_dir=str(final), sha256=digest, model_json=meta), activate=True)
    write_active_pointer(models_dir, model_id, final, digest)
    artifacts = {"run_dir": str(run_dir), "checkpoint": str(run_dir / "checkpoints" / "last.pt"),
                 "metrics": str(run_dir / "metrics.jsonl"), "bundle_dir": str(final),
                 "onnx": str(final / "model.onnx"), "onnx_sha256": digest, "parity": parity}
    return model_id, artifacts


def write_active_pointer(models_dir: Path, model_id: str, bundle_dir: Path, sha256: str) -> None:
    """Atomically point the embed service at ``bundle_dir`` (write temp, fsync, rename)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = models_dir / f".active.{os.getpid()}.json"
    with tmp.open("w") as fh:
        json.dump({"model_id": model_id, "bundle_dir": str(bundle_dir), "sha256": sha256}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, models_dir / "active.json")
