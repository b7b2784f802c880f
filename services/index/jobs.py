"""Index builds run by workers: after every successful job (its training images), and on request
(``POST /v1/models/{id}/index`` -> Celery task ``excb.build_index``).

A build runs ``excb index build`` as a child process, like export: the worker holds no ONNX session or images
between tasks, and a build that hangs is stopped at ``EXCB_INDEX__TIMEOUT_SECONDS``. Its state goes to the
index's ``status.json`` (queued -> running -> succeeded / failed), which ``GET /v1/models/{id}/index`` shows.
An index failure never changes the job's outcome: the job is already SUCCEEDED when its index is built.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import yaml
from celery import Celery

from excb.config import RUN_CONFIG
from services.common.errors import ApiError
from services.index.store import index_root, read_status, write_status
from services.settings import Settings

log = logging.getLogger("excb.index")

TASK_BUILD_INDEX = "excb.build_index"


def build_command(models_dir: Path, model_id: str, source: str, *, name: str, sample: int, seed: int,
                  split: str = "all", limit: int | None = None, origin: str = "folder") -> list[str]:
    argv = [sys.executable, "-m", "excb.cli", "index", "build", source, "--model", model_id, "--name", name,
            "--sample", str(sample), "--seed", str(seed), "--split", split, "--origin", origin,
            "--models-dir", str(models_dir)]
    if limit is not None:
        argv += ["--limit", str(limit)]
    return argv


def run_build(settings: Settings, argv: list[str], root: Path, source: str, log_to: IO[bytes] | None) -> bool:
    """Run one build child; True when it succeeded. Timeouts and crashes are recorded, never raised."""
    try:
        proc = subprocess.run(argv, stdout=log_to, stderr=subprocess.STDOUT if log_to else None,
                              timeout=settings.index.timeout_seconds, check=False, preexec_fn=_background)
    except subprocess.TimeoutExpired:
        write_status(root, "failed", source=source, error=f"timed out after {settings.index.timeout_seconds:.0f} s")
        return False
    except OSError as exc:
        write_status(root, "failed", source=source, error=f"could not start the build: {exc}")
        return False
    if proc.returncode != 0:
        status = read_status(root) or {}
        if status.get("state") != "failed":  # the child died before it could say why
            write_status(root, "failed", source=source, error=f"excb index build exited with {proc.returncode}")
        return False
    return True


def _background() -> None:
    """A build is background work: on a shared CPU (`excb up`) it yields to serving and training."""
    os.nice(10)


def _job_data(run_dir: Path) -> dict[str, Any]:
    """The ``data`` section of the run's resolved config (``config.yaml``; a job body may use short keys such as
    ``data: digits``, this file never does)."""
    config = yaml.safe_load((run_dir / RUN_CONFIG).read_text()) or {}
    data = config.get("data") if isinstance(config, dict) else None
    return data if isinstance(data, dict) else {}


def index_after_job(settings: Settings, model_id: str, run_dir: Path) -> bool:
    """Index (a sample of) the job's training images with its new model; appends to the job's log."""
    if not settings.index.after_job:
        return False
    data = _job_data(run_dir)
    source = str(data.get("source") or "")
    if not source or source.startswith("shards:"):
        return False  # shard streams have no random access; index them with `excb index build` from a folder
    root = index_root(settings.resolved_models_dir, model_id)
    write_status(root, "queued", source=source, origin="job")
    argv = build_command(settings.resolved_models_dir, model_id, source, name="default",
                         sample=settings.index.sample, seed=settings.index.seed,
                         split=str(data.get("split") or "train"), limit=data.get("limit"), origin="job")
    with (run_dir / "job.log").open("ab") as logf:
        logf.write(f"--- index of {model_id} (up to {settings.index.sample} images of {source})\n".encode())
        logf.flush()
        ok = run_build(settings, argv, root, source, logf)
    log.info("index of %s after its job: %s", model_id, "built" if ok else "failed")
    return ok


def queue_build(celery: Celery, settings: Settings, model_id: str, source: str, *, asked: str, name: str,
                sample: int, seed: int) -> None:
    """Queue the build ``POST /v1/models/{id}/index`` asks for (``source`` resolved and checked by the caller,
    ``asked`` as the client wrote it, for ``status.json``); 409 while one is queued or running and younger than
    the build timeout. A worker runs it through :func:`build_requested`."""
    root = index_root(settings.resolved_models_dir, model_id, name)
    current = read_status(root) or {}
    age = time.time() - float(current.get("updated_at") or 0)
    if current.get("state") in ("queued", "running") and age < settings.index.timeout_seconds:
        raise ApiError(409, "conflict", f"an index build of {model_id}/{name} is already {current['state']}")
    write_status(root, "queued", source=asked, sample=sample, seed=seed)
    celery.send_task(TASK_BUILD_INDEX, args=[model_id, source, name, sample, seed], queue=settings.celery_queue)


def build_requested(settings: Settings, model_id: str, source: str, name: str, sample: int, seed: int) -> str:
    """The build ``POST /v1/models/{id}/index`` queued (the worker's Celery task ``excb.build_index`` runs it):
    ``"succeeded"`` or ``"failed"``, with the reason in the index's ``status.json``."""
    root = index_root(settings.resolved_models_dir, model_id, name)
    argv = build_command(settings.resolved_models_dir, model_id, source, name=name, sample=sample, seed=seed)
    return "succeeded" if run_build(settings, argv, root, source, None) else "failed"
