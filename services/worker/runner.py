"""Run one job under a lease: trainer child process, heartbeats, progress, cancel, then the export pipeline.

Exit-code policy (Kubeflow's, reliability.md §9): 0 -> export; 143 after our SIGTERM -> retryable preemption
(not counted); killed by a signal or 128-255 -> retryable failure (counted against ``max_attempts``);
1-127 -> permanent failure (a bug or bad data does not get better by retrying).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery
from celery.worker import state as celery_state

from excb.cli import EXIT_CONFIG
from excb.training.checkpoint import FENCE_ENV, write_fence
from services.common.paths import BUILTIN_SOURCES, PathNotAllowed, check_source_contained
from services.common.tail import FileTail
from services.db import jobs as store
from services.db.jobs import Lease
from services.db.session import Database
from services.db.tables import utcnow
from services.index.jobs import index_after_job
from services.queue.broker import make_celery
from services.queue.publish import publish
from services.settings import Settings
from services.worker import child, pipeline, recover, retry
from services.worker.plan import RunPlan
from services.worker.progress import ProgressTracker

log = logging.getLogger("excb.worker")

# Set by the Celery worker_shutting_down signal (and checked via celery.worker.state as a fallback).
SHUTDOWN = threading.Event()
EXIT_SIGTERM = 128 + signal.SIGTERM


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def celery_stopping() -> bool:
    """True once this worker is shutting down (our SIGTERM handler or Celery's warm/cold shutdown): the trainer
    and the corpus chunks check it between steps and batches to hand their job back."""
    if SHUTDOWN.is_set():
        return True
    return bool(celery_state.should_stop or celery_state.should_terminate)


@dataclass
class Outcome:
    """Why the trainer stopped: ``rc`` plus which of our own actions (if any) caused it."""

    rc: int
    cancelled: bool = False
    preempted: bool = False
    lease_lost: bool = False
    oom: bool = False
    stage: str = "train"
    model_id: str | None = None


class JobRunner:
    """Everything one attempt of one job does, from lease to final commit. ``celery``: the app a job released for
    retry is published on again (the worker's own; by default a publisher on the settings' broker, as the API's)."""

    def __init__(self, db: Database, settings: Settings, job_id: str, celery: Celery | None = None) -> None:
        self.db = db
        self.settings = settings
        self.job_id = job_id
        self.celery = celery
        self.worker = worker_name()
        self.plan: RunPlan | None = None  # what the trainer runs (its config.yaml + recipe.json), set per attempt

    def run(self) -> str:
        """Run the job if it is ours to run; returns what happened (for the task log)."""
        lease = store.acquire(self.db, self.job_id, self.worker)
        if lease is None:
            store.settle_unrunnable(self.db, self.job_id)
            job = store.get_job(self.db, self.job_id)
            log.info("job %s not acquired (status %s): duplicate or stale delivery", self.job_id,
                     job.status if job else "deleted")
            return "skipped"
        log.info("job %s attempt %d leased with token %d", self.job_id, lease.attempt, lease.token)
        try:
            return self._run_leased(lease)
        except Exception as exc:  # a bug in the worker itself: never leave the job RUNNING forever
            if isinstance(exc, OSError) and retry.is_disk_full(exc):  # not a bug: counted, retried after a back-off
                log.warning("job %s: disk full in its run directory: %s", self.job_id, exc)
                where = f" ({Path(exc.filename).name})" if exc.filename else ""
                what = f"the worker's write to the run directory{where} failed: {exc.strerror or exc}"
                return self._commit_failure(lease, "disk_full", retry.disk_full_message(what), count=True)
            log.exception("worker error on job %s", self.job_id)
            self._commit_failure(lease, "worker_error", f"{type(exc).__name__}: {exc}", count=True)
            return "error"

    # --- one attempt -----------------------------------------------------------------------------------
    def _run_leased(self, lease: Lease) -> str:
        job = store.get_job(self.db, self.job_id)
        assert job is not None
        run_dir = Path(job.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # Validated once, where it entered (POST /v1/jobs: services/api/submit.py), and stored so: trusted here and
        # by the trainer (`excb train --resolved-config`), which alone writes RUN/config.yaml. Only what can change
        # since the submit is checked again: the data's containment in the data roots.
        config = {**job.config, "out": str(run_dir)}
        refused = self._outside_roots(str(config["data"]["source"]))
        if refused:
            return self._commit_failure(lease, "path_not_allowed", refused, count=False)
        aside = recover.set_aside_if_unreadable(run_dir, config)  # damaged checkpoints: start over, keep the files
        if aside is not None:
            log.warning("job %s: %s", self.job_id, aside.message(run_dir, config),
                        extra={"event": "checkpoint_set_aside", "job": self.job_id, "set_aside": str(aside.dest)})
        self.plan = RunPlan(run_dir)  # before this attempt's trainer starts: only what it writes counts
        request = job.request or {}
        argv = child.trainer_command(config, int(request.get("gpus") or 0))
        tracker = ProgressTracker(total_steps=config.get("max_steps"), epochs=config.get("epochs"))
        tail = FileTail(run_dir / "metrics.jsonl")  # read as JSON rows by _sync_progress
        with (run_dir / "job.log").open("ab") as logf:
            logf.write(f"--- attempt {lease.attempt} on {self.worker} (token {lease.token})\n".encode())
            if aside is not None:
                logf.write(f"excb-worker: {aside.message(run_dir, config)}\n".encode())
            logf.flush()
            write_fence(run_dir, lease.token)  # this attempt's checkpoints win; a stale trainer's are refused
            proc = child.start(argv, logf, env=_child_env(lease.token))
        store.set_attempt_pid(self.db, lease, proc.pid)
        if not store.fenced_update(self.db, lease, status="RUNNING", heartbeat_at=utcnow()):
            child.stop(proc, 0.5)
            store.end_attempt(self.db, lease, "lease_lost", pid=proc.pid)
            return "lease_lost"
        outcome = self._supervise(lease, proc, tail, tracker, request)
        self._sync_progress(lease, tail, tracker)
        return self._settle(lease, outcome, run_dir, tracker, tail)  # runs the export stage after a clean exit

    def _outside_roots(self, source: str) -> str | None:
        """Defence in depth (issue 13 item 4): the API checked the data on submit, but the tree may have
        changed since (a symlink added) or the row may not have come through the API; check again here."""
        if source in BUILTIN_SOURCES:
            return None
        try:
            check_source_contained(source, self.settings.data_roots)
        except PathNotAllowed as exc:
            log.warning("job %s refused: %s", self.job_id, exc)
            return str(exc)
        return None

    def _supervise(self, lease: Lease, proc: subprocess.Popen[bytes], tail: FileTail,
                   tracker: ProgressTracker, request: dict[str, Any]) -> Outcome:
        """Poll the child; heartbeat + progress every interval; react to cancel, shutdown, lost lease, memory."""
        interval = min(self.settings.heartbeat_seconds, self.settings.progress_interval_seconds)
        limit_mb = float(request.get("memory_limit_mb") or 0)
        last_beat = 0.0
        last_ok = time.monotonic()
        while True:
            rc = proc.poll()
            if rc is not None:
                return Outcome(rc)
            if limit_mb and child.rss_mb(proc.pid) > limit_mb:
                log.warning("job %s exceeded its memory limit of %.0f MiB: killed", self.job_id, limit_mb)
                child.signal_group(proc, signal.SIGKILL)
                return Outcome(proc.wait(), oom=True)
            if celery_stopping():
                log.info("worker shutting down: checkpointing job %s", self.job_id)
                return Outcome(child.stop(proc, self.settings.cancel_grace_seconds), preempted=True)
            now = time.monotonic()
            if now - last_beat >= interval:
                last_beat = now
                try:
                    ours, cancel = self._sync_progress(lease, tail, tracker)
                    last_ok = now
                except Exception as exc:  # DB unreachable: keep training until the lease would be stale
                    log.warning("heartbeat failed for %s: %s", self.job_id, exc)
                    ours, cancel = True, False
                    if now - last_ok > self.settings.stall_seconds:
                        ours = False
                if not ours:
                    log.warning("lease on %s lost (token %d): stopping the trainer", self.job_id, lease.token)
                    child.signal_group(proc, signal.SIGKILL)
                    return Outcome(proc.wait(), lease_lost=True)
                if cancel:
                    log.info("cancel requested for %s: SIGTERM, then SIGKILL after %.0fs", self.job_id,
                             self.settings.cancel_grace_seconds)
                    return Outcome(child.stop(proc, self.settings.cancel_grace_seconds), cancelled=True)
            time.sleep(0.2)

    def _sync_progress(self, lease: Lease, tail: FileTail, tracker: ProgressTracker) -> tuple[bool, bool]:
        """Copy new metrics rows and the run's effective config into the DB (fenced) and heartbeat; returns
        ``(still_ours, cancel_requested)``."""
        tracker.feed(tail.json_rows())
        steps = tracker.take_steps()
        values: dict[str, Any] = {"progress": tracker.progress(), "latest_metrics": tracker.latest}
        if tracker.curve is not None:
            values["cluster_sizes"] = tracker.curve
            values["balance"] = tracker.balance
        if self.plan is not None:
            values.update(self.plan.pending())
            tracker.follow(values.get("effective_config"))
        ours, cancel = store.heartbeat(self.db, lease, **values)
        if ours and self.plan is not None:
            self.plan.confirm()
        if ours and steps:
            store.replace_metrics(self.db, self.job_id, steps)
        return ours, cancel

    # --- after the trainer ---------------------------------------------------------------------------------
    def _settle(self, lease: Lease, out: Outcome, run_dir: Path, tracker: ProgressTracker,
                tail: FileTail) -> str:
        ckpt = run_dir / "checkpoints" / "last.pt"
        if out.lease_lost:
            store.end_attempt(self.db, lease, "lease_lost", f"rc={out.rc}")
            return "lease_lost"
        if out.cancelled:
            try:  # the progress a cancelled job shows is where its checkpoint is
                self._sync_progress(lease, tail, tracker)
            except Exception as exc:  # the terminal commit below still tries, and says what it finds
                log.warning("last progress of cancelled %s not recorded: %s", self.job_id, exc)
            self._commit_terminal(lease, "CANCELLED", None, {"checkpoint": str(ckpt)} if ckpt.exists() else {})
            store.end_attempt(self.db, lease, "cancelled", f"rc={out.rc}")
            return "cancelled"
        if out.preempted and out.rc in (0, EXIT_SIGTERM, -signal.SIGTERM):
            status = store.release_for_retry(self.db, lease, count_failure=False, error=None)
            store.end_attempt(self.db, lease, "preempted", f"rc={out.rc}")
            self._republish(status)
            return "preempted"
        if out.rc == 0 and out.stage == "train":
            return self._export(lease, run_dir, tail, tracker)
        if out.rc == 0:
            return self._finish_success(lease, run_dir, out.model_id or "")
        detail = _log_tail(run_dir / "job.log")
        if out.oom:
            return self._commit_failure(lease, "out_of_memory", "trainer exceeded its memory limit and was killed",
                                        count=True)
        if retry.mentions_disk_full(detail):  # a transient fault, whatever the exit status says
            what = f"the {out.stage} process ended, {retry.exit_text(out.rc)}"
            return self._commit_failure(lease, "disk_full", retry.disk_full_message(what), count=True)
        if out.rc < 0 or out.rc >= 128 or out.preempted:
            return self._commit_failure(lease, "crashed", _crash_message(out.rc, out.stage, detail), count=True)
        message = _stated_error(out.rc, detail) or f"the {out.stage} process {retry.exit_text(out.rc)}: {detail}"
        return self._commit_failure(lease, "trainer_error", message, count=False)

    def _export(self, lease: Lease, run_dir: Path, tail: FileTail, tracker: ProgressTracker) -> str:
        """Export + parity check in a supervised child; then settle like the trainer."""
        model_id = pipeline.new_model_id()
        staging = pipeline.staging_dir(self.settings, model_id)
        staging.parent.mkdir(parents=True, exist_ok=True)
        pipeline.remove_stale_staging(staging.parent, self.settings.export_staging_stale_seconds)
        argv = pipeline.export_command(run_dir, staging, self.settings.export_parity_images)
        with (run_dir / "job.log").open("ab") as logf:
            logf.write(f"--- export to {model_id}\n".encode())
            logf.flush()
            proc = child.start(argv, logf, env=_child_env())
        out = self._supervise(lease, proc, tail, tracker, {})
        out.stage, out.model_id = "export", model_id
        if out.rc != 0 and not (out.cancelled or out.preempted or out.lease_lost):
            return self._finish_success(lease, run_dir, model_id, export_rc=out.rc)
        if out.rc != 0:  # cancelled, preempted or lease lost while exporting: no half bundle stays behind
            shutil.rmtree(staging, ignore_errors=True)
        return self._settle(lease, out, run_dir, tracker, tail)

    def _finish_success(self, lease: Lease, run_dir: Path, model_id: str, export_rc: int = 0) -> str:
        try:
            model_id, artifacts = pipeline.register_bundle(self.db, self.settings, self.job_id, run_dir, model_id,
                                                           export_rc)
        except pipeline.PipelineError as exc:
            self._commit_terminal(lease, "FAILED", {"type": exc.type, "message": exc.message}, {})
            store.end_attempt(self.db, lease, "failed", exc.message)
            return "failed"
        done = self._commit_terminal(lease, "SUCCEEDED", None, artifacts, model_id=model_id)
        store.end_attempt(self.db, lease, "succeeded" if done else "lease_lost")
        if done:  # the job has its outcome; its image index follows (services/index/jobs.py)
            self._index_training_images(run_dir, model_id)
        return "succeeded" if done else "lease_lost"

    def _index_training_images(self, run_dir: Path, model_id: str) -> None:
        try:
            index_after_job(self.settings, model_id, run_dir)
        except Exception:  # an index is a convenience: it must never turn a finished job into a worker error
            log.exception("index of %s after job %s failed", model_id, self.job_id)

    def _commit_terminal(self, lease: Lease, status: str, error: dict[str, Any] | None, artifacts: dict[str, Any],
                         model_id: str | None = None) -> bool:
        values: dict[str, Any] = {"status": status, "error": error, "finished_at": utcnow(), "lease_owner": None}
        if artifacts:
            values["artifacts"] = artifacts
        if model_id:
            values["model_id"] = model_id
        ok = store.fenced_update(self.db, lease, **values)
        if not ok:
            log.warning("final commit of %s rejected: lease %d is stale", self.job_id, lease.token)
        return ok

    def _commit_failure(self, lease: Lease, kind: str, message: str, count: bool) -> str:
        if count:
            failures, max_attempts = self._failures_after_this()
            message += retry.budget_note(failures, max_attempts)
            delay = retry.retry_delay(failures, self.settings.retry_backoff_seconds,
                                      self.settings.retry_backoff_max_seconds)
            error = {"type": kind, "message": message[-2000:]}
            status = store.release_for_retry(self.db, lease, count_failure=True, error=error, due_in=delay)
            if status == "QUEUED":
                log.warning("job %s: %s (%s); attempt again in %.1fs", self.job_id, kind, message[:200], delay)
            self._republish(status, delay)
        else:
            error = {"type": kind, "message": message[-2000:]}
            status = "FAILED" if self._commit_terminal(lease, "FAILED", error, {}) else "LOST"
        store.end_attempt(self.db, lease, kind, message[-2000:])
        return status.lower()

    def _failures_after_this(self) -> tuple[int, int]:
        """(counted failures including the one being committed, the job's attempt budget)."""
        job = store.get_job(self.db, self.job_id)
        if job is None:
            return 1, self.settings.max_attempts
        return job.failures + 1, job.max_attempts

    def _republish(self, status: str, delay: float = 0.0) -> None:
        if status != "QUEUED":
            return
        publish(self.celery or make_celery(self.settings), self.db, self.job_id, self.settings.celery_queue,
                countdown=delay)


def _child_env(fence_token: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if fence_token is not None:
        env[FENCE_ENV] = str(fence_token)
    return env


def _stated_error(rc: int, tail: str) -> str | None:
    """Exit status 2 is the CLI's "a mistake you can fix" (bad data, config): its last ``excb: ...`` line says it
    all, e.g. "data source '...': 0 of 50 files decode as images (first error: ...)"; None for any other exit."""
    if rc != EXIT_CONFIG:
        return None
    stated = [line for line in tail.splitlines() if line.startswith("excb: ")]
    return stated[-1].removeprefix("excb: ") if stated else None


def _crash_message(rc: int, stage: str, log_tail: str) -> str:
    """A crash in words: how the trainer ended, in which stage, and its last log lines when they say more than
    the attempt's own header (a SIGKILL leaves no traceback)."""
    said = "\n".join(line for line in log_tail.splitlines() if not line.startswith("--- "))
    return f"the {stage} process ended, {retry.exit_text(rc)}" + (f": {said}" if said.strip() else "")


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(text[-lines:])
