"""After training: ONNX export + parity check -> bundle in the models dir -> model row -> embed service told.

The bundle lands in ``Settings.resolved_models_dir / <model_id>/`` (model.onnx + model.json). The embed
service learns about it through the file ``<models_dir>/active.json`` (``{"model_id", "bundle_dir", "sha256"}``,
replaced atomically), which works across processes and machines sharing the volume; see docs/internals.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from excb.fileio import sha256_file
from services.common.active_model import write_active
from services.db import jobs as store
from services.db import models as model_store
from services.db.session import Database
from services.db.tables import ModelRow
from services.embed.manifest import record_model
from services.settings import Settings

log = logging.getLogger("excb.worker")

class PipelineError(Exception):
    """Export or parity failed: the job ends FAILED with this type and message (not retried)."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(message)
        self.type = type
        self.message = message


def new_model_id() -> str:
    return f"m-{uuid.uuid4().hex[:12]}"


def staging_dir(settings: Settings, model_id: str) -> Path:
    """Where the export child writes; hidden (leading dot) so the embed registry's rescan ignores it."""
    return settings.resolved_models_dir / f".{model_id}.tmp"


def remove_stale_staging(models_dir: Path, older_than_s: float) -> list[str]:
    """Remove export staging dirs (``.m-<id>.tmp``) nothing has written to for ``older_than_s``: what an export
    killed with its worker (kill -9, OOM, node loss) left behind; the registry skips them, so nothing else would.
    Age is the newest mtime inside, so a running export (writing its files) is never taken."""
    removed = []
    now = time.time()
    for staging in models_dir.glob(".m-*.tmp"):
        try:
            newest = max([staging.lstat().st_mtime] + [p.lstat().st_mtime for p in staging.rglob("*")])
        except OSError:  # removed meanwhile (its export finished or another worker cleaned it)
            continue
        if now - newest > older_than_s:
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging.name)
    if removed:
        log.warning("removed %d stale export staging dir(s) older than %.0fs: %s", len(removed), older_than_s,
                    ", ".join(sorted(removed)))
    return removed


def export_command(run_dir: Path, staging: Path, parity_images: int) -> list[str]:
    """Export runs in a child process too: it is supervised (heartbeats, cancel) like the trainer, and the
    worker never holds torch/ONNX memory between jobs."""
    return [sys.executable, "-m", "excb.cli", "export", str(run_dir), "--out", str(staging),
            "--parity-images", str(parity_images)]


def register_bundle(db: Database, settings: Settings, job_id: str, run_dir: Path, model_id: str,
                    export_rc: int) -> tuple[str, dict[str, Any]]:
    """Check the export child's result, move the bundle into place, add (and activate) the model row."""
    staging = staging_dir(settings, model_id)
    meta = _read_meta(staging)
    parity = (meta or {}).get("parity") or {}
    if export_rc != 0 or meta is None or not parity.get("passed", False):
        shutil.rmtree(staging, ignore_errors=True)
        if meta is not None and parity and not parity.get("passed", False):
            raise PipelineError("parity_failed", f"ONNX parity check failed: {parity}")
        raise PipelineError("export_failed", f"excb export exited with {export_rc}")
    final = staging.parent / model_id
    digest = sha256_file(staging / "model.onnx")
    if meta.get("sha256") and meta["sha256"] != digest:
        shutil.rmtree(staging, ignore_errors=True)
        raise PipelineError("export_failed", "model.onnx does not match the sha256 in model.json")
    job = store.get_job(db, job_id)
    # The trusted record first, then the bundle appears: the embed service serves only recorded hashes.
    record_model(final.parent, model_id, digest, job.owner if job else None)
    os.replace(staging, final)
    model_store.add_model(db, ModelRow(id=model_id, job_id=job_id, owner=job.owner if job else None, status="READY",
                                       bundle_dir=str(final), sha256=digest, model_json=meta))
    write_active(final.parent, model_id, final, digest)
    artifacts = {"run_dir": str(run_dir), "checkpoint": str(run_dir / "checkpoints" / "last.pt"),
                 "metrics": str(run_dir / "metrics.jsonl"), "bundle_dir": str(final),
                 "onnx": str(final / "model.onnx"), "onnx_sha256": digest, "parity": parity}
    return model_id, artifacts


def _read_meta(staging: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((staging / "model.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None
