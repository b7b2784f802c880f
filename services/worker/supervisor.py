"""`excb up`'s worker supervisor: restart the Celery workers it started, take back a dead worker's job at once.

Nothing else restarts a worker on a laptop (no Docker restart policy, no kubelet), and the OOM killer is a fact
of life there. The supervisor polls its child processes; when one exits it (1) marks the worker dead in the
``workers`` table, (2) kills what is left of its trainer and requeues its job through the reaper's
compare-and-set (``store.reap``: the failure counts against ``max_attempts``, the next attempt resumes from the
last checkpoint) and republishes it, and (3) restarts the worker after an exponential back-off. Deaths that
keep coming are a crash loop: logged at ERROR and shown by /v1/workers and /readyz, never hidden; the
supervisor keeps restarting at the capped back-off (as Kubernetes' CrashLoopBackOff does).

Every event is one log line with ``event``, ``worker``, ``pid``, ``exit_code``, ``restart_in_s``, ``deaths``
and ``crash_loop`` fields (JSON with ``EXCB_LOG_JSON=true``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from celery import Celery

from services.db import jobs as store
from services.db import workers as worker_store
from services.db.session import Database
from services.queue.publish import publish
from services.settings import Settings
from services.worker.retry import exit_text

log = logging.getLogger("excb.supervisor")

POLL_SECONDS = 0.2


@dataclass
class RestartPolicy:
    """Back-off and crash-loop bookkeeping for one worker slot (pure: the clock is passed in).

    The delay doubles with each death in a row (``base``, 2x, 4x ... up to ``cap``); a worker that stayed up
    ``stable`` seconds starts the series again. ``loop_deaths`` deaths within ``window`` seconds is a crash loop.
    """

    base: float
    cap: float
    stable: float
    loop_deaths: int
    window: float
    in_a_row: int = 0
    deaths: list[float] = field(default_factory=list)

    @classmethod
    def from_settings(cls, s: Settings) -> "RestartPolicy":
        return cls(base=s.worker_restart_backoff_seconds, cap=s.worker_restart_backoff_max_seconds,
                   stable=s.worker_stable_seconds, loop_deaths=s.worker_crash_loop_restarts,
                   window=s.worker_crash_loop_window_seconds)

    def on_death(self, started_at: float, now: float) -> float:
        """Record a death of a worker started at ``started_at``; returns the seconds to wait before restarting."""
        if now - started_at >= self.stable:
            self.in_a_row = 0
        self.in_a_row += 1
        self.deaths = [t for t in self.deaths if now - t < self.window] + [now]
        return min(self.cap, self.base * 2 ** (self.in_a_row - 1))

    def recent_deaths(self, now: float) -> int:
        return sum(1 for t in self.deaths if now - t < self.window)

    def crash_loop(self, now: float, up_since: float | None) -> bool:
        """Too many deaths lately, and the current process (if any) has not yet proved itself stable."""
        if up_since is not None and now - up_since >= self.stable:
            return False
        return self.recent_deaths(now) >= self.loop_deaths


@dataclass
class Slot:
    """One supervised worker: the process now running (or None while backing off) and its history."""

    index: int
    node: str
    policy: RestartPolicy
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    last_exit: int | None = None
    restarts: int = 0
    crash_loop: bool = False

    @property
    def name(self) -> str:
        """The worker's name in the job store (``host:pid``, as in ``lease_owner``)."""
        return f"{socket.gethostname()}:{self.proc.pid}" if self.proc else ""


def _trainer_alive_as_ours(pid: int) -> bool:
    """Only signal a pid that is still one of our trainers (pids get reused)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"excb" in cmd


def take_back_jobs(db: Database, celery: Celery, settings: Settings, worker_name: str, reason: str) -> list[str]:
    """Requeue (or fail, when the budget is spent) the jobs ``worker_name`` held; returns ``job:outcome`` items.

    Its trainer gets SIGKILL first (it should already have died with the worker, by PDEATHSIG), so two copies
    of one run never write the same checkpoint directory.
    """
    done: list[str] = []
    for job, pid in worker_store.leased_jobs(db, worker_name):
        if pid and _trainer_alive_as_ours(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        outcome = store.reap(db, job, reason)
        if outcome == "QUEUED":
            publish(celery, db, job.id, settings.celery_queue)
        done.append(f"{job.id}:{outcome}")
    return done


class WorkerSupervisor(threading.Thread):
    """Starts ``count`` workers with ``command(node)`` and keeps them running (see the module docstring)."""

    def __init__(self, db: Database, celery: Celery, settings: Settings, count: int,
                 command: Callable[[str], list[str]], spawn: Callable[[list[str]], subprocess.Popen[bytes]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name="excb-supervisor", daemon=True)
        self.db, self.celery, self.settings = db, celery, settings
        self.command, self.spawn, self.clock = command, spawn, clock
        self.slots = [Slot(i, f"excb-up-{i}@%h", RestartPolicy.from_settings(settings)) for i in range(count)]
        self._halt = threading.Event()
        self._grace = 0.0  # set by stop() before the thread is told to end
        self._lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------------------------
    def start_workers(self) -> None:
        """Spawn every worker once (before serving HTTP), then supervise them from the thread."""
        for slot in self.slots:
            self._spawn(slot)
        self.start()

    def run(self) -> None:
        while not self._halt.wait(POLL_SECONDS):
            for slot in self.slots:
                try:
                    self._check(slot)
                except Exception:  # the DB is busy or down: the next poll tries again
                    log.exception("supervisor pass failed for worker slot %d", slot.index)
        # Stopped from here, before this thread ends: a worker it restarted has PDEATHSIG bound to this *thread*
        # (prctl), so ending first SIGKILLed it mid-job (its job then sat RUNNING until the reaper counted it lost).
        self._stop_workers(self._grace)

    def stop(self, grace: float) -> None:
        """Stop supervising, then SIGTERM every worker (jobs checkpoint and go back to QUEUED), SIGKILL after
        ``grace`` seconds."""
        self._grace = grace
        self._halt.set()
        if self.is_alive():
            self.join(timeout=grace + 10)
        self._stop_workers(grace)  # the thread never ran (or is stuck): whatever still runs

    def _stop_workers(self, grace: float) -> None:
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()

    # --- one slot --------------------------------------------------------------------------------------
    def _spawn(self, slot: Slot) -> None:
        proc = self.spawn(self.command(slot.node))
        with self._lock:
            slot.proc, slot.started_at, slot.restart_at = proc, self.clock(), None

    def _check(self, slot: Slot) -> None:
        now = self.clock()
        if slot.proc is None:
            if slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(slot)
                slot.restarts += 1
                self._event(logging.WARNING, "worker_restarted", slot, f"worker slot {slot.index} restarted "
                            f"as pid {slot.proc.pid if slot.proc else '?'} (restart #{slot.restarts})")
            return
        rc = slot.proc.poll()
        if rc is None:
            if slot.crash_loop and not slot.policy.crash_loop(now, slot.started_at):
                slot.crash_loop = False
                self._event(logging.INFO, "worker_recovered", slot,
                            f"worker slot {slot.index} up for {now - slot.started_at:.0f}s: crash loop over")
            return
        self._on_exit(slot, rc, now)

    def _on_exit(self, slot: Slot, rc: int, now: float) -> None:
        name, pid = slot.name, slot.proc.pid if slot.proc else None
        reason = f"worker {name} {exit_text(rc)}"
        worker_store.mark(self.db, name, "dead", reason)
        taken = take_back_jobs(self.db, self.celery, self.settings, name, reason)
        delay = slot.policy.on_death(slot.started_at, now)
        with self._lock:  # the back-off counts from now, after the DB work above
            slot.proc, slot.last_exit, slot.restart_at = None, rc, self.clock() + delay
            slot.crash_loop = slot.policy.crash_loop(now, None)
        self._event(logging.ERROR if slot.crash_loop else logging.WARNING, "worker_exited", slot,
                    f"{reason}; restarting in {delay:.1f}s" + (f"; jobs taken back: {', '.join(taken)}" if taken
                                                                else ""), name=name, pid=pid, jobs=",".join(taken),
                    restart_in_s=round(delay, 2))
        if slot.crash_loop:
            self._event(logging.ERROR, "worker_crash_loop", slot,
                        f"worker slot {slot.index} is crash-looping: {slot.policy.recent_deaths(now)} deaths in "
                        f"{slot.policy.window:.0f}s (last: {exit_text(rc)}); still restarting, every "
                        f"{delay:.0f}s at most", name=name, pid=pid)

    def _event(self, level: int, event: str, slot: Slot, message: str, **extra: Any) -> None:
        now = self.clock()
        fields = {"event": event, "slot": slot.index, "worker": extra.pop("name", slot.name),
                  "pid": extra.pop("pid", slot.proc.pid if slot.proc else None), "exit_code": slot.last_exit,
                  "restart_in_s": extra.pop("restart_in_s", None),
                  "restarts": slot.restarts, "deaths": slot.policy.recent_deaths(now), "crash_loop": slot.crash_loop}
        log.log(level, message, extra={**fields, **extra})

    # --- what the API shows ------------------------------------------------------------------------------
    def snapshot(self) -> list[dict[str, Any]]:
        """Per slot: running or backing off, pid, restarts, recent deaths, crash loop (for /v1/workers, /readyz)."""
        now = self.clock()
        out = []
        with self._lock:
            for slot in self.slots:
                running = slot.proc is not None and slot.proc.poll() is None
                out.append({
                    "slot": slot.index, "state": "running" if running else "restarting",
                    "worker": slot.name if running else None, "pid": slot.proc.pid if running and slot.proc else None,
                    "up_seconds": round(now - slot.started_at, 1) if running else None,
                    "restart_in_seconds": None if running or slot.restart_at is None
                    else round(max(0.0, slot.restart_at - now), 1),
                    "last_exit": None if slot.last_exit is None else exit_text(slot.last_exit),
                    "restarts": slot.restarts, "recent_deaths": slot.policy.recent_deaths(now),
                    "crash_loop": slot.crash_loop,
                })
        return out


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
