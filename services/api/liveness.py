"""Are any workers alive? One answer for /readyz, /v1/workers, /v1/info and the job views.

A worker is live when its row says ``alive`` and its heartbeat is younger than ``stall_seconds``. In `excb up`
the supervisor marks a dead worker's row at once and also says what it is doing about it (restarting in N s,
crash loop), so the reason a person reads names the cause, not only the symptom.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from services.api.state import ControlPlane
from services.db import workers as worker_store
from services.db.tables import WorkerRow, utcnow

# Rows older than this are not listed (each `excb up` restart leaves one behind).
LIST_HORIZON_SECONDS = 3600.0


@dataclass(frozen=True)
class WorkersView:
    """The workers as the control plane sees them now."""

    live: int
    items: list[dict[str, Any]]
    supervisor: list[dict[str, Any]] | None
    reason: str | None  # why no worker is live; None when one is

    def as_dict(self, stall_seconds: float) -> dict[str, Any]:
        return {"live": self.live, "stale_after_seconds": stall_seconds, "reason": self.reason,
                "items": self.items, "supervisor": self.supervisor}


def _row(row: WorkerRow, stall: float, now: dt.datetime) -> dict[str, Any]:
    return {"name": row.name, "node": row.node, "host": row.host, "pid": row.pid, "queue": row.queue,
            "state": row.state, "live": worker_store.is_live(row, stall, now), "job_id": row.job_id,
            "detail": row.detail, "started_at": row.started_at.isoformat(),
            "heartbeat_at": row.heartbeat_at.isoformat(),
            "heartbeat_age_seconds": round((now - row.heartbeat_at).total_seconds(), 1)}


def _reason(items: list[dict[str, Any]], supervisor: list[dict[str, Any]] | None) -> str:
    """A sentence: what the supervisor is doing (embedded mode), then the last worker heard from."""
    parts = []
    for slot in supervisor or []:
        if slot["crash_loop"]:
            parts.append(f"worker slot {slot['slot']} is crash-looping ({slot['recent_deaths']} deaths recently, "
                         f"last {slot['last_exit']})")
        elif slot["state"] == "restarting":
            parts.append(f"worker slot {slot['slot']} {slot['last_exit']}, restarting in "
                         f"{slot['restart_in_seconds']}s")
        else:
            parts.append(f"worker slot {slot['slot']} starting (pid {slot['pid']}, up {slot['up_seconds']}s)")
    if items:
        last = items[0]
        state = f"{last['state']}: {last['detail']}" if last["detail"] else last["state"]
        parts.append(f"last heartbeat {last['heartbeat_age_seconds']:.0f}s ago from {last['name']} ({state})")
    else:
        parts.append("no worker has reported in the last hour")
    return "no live worker: " + "; ".join(parts)


def workers_view(cp: ControlPlane) -> WorkersView:
    """Read the workers table (and the supervisor, in `excb up`)."""
    stall = cp.settings.stall_seconds
    now = utcnow()
    items = [_row(r, stall, now) for r in worker_store.recent(cp.db, max(LIST_HORIZON_SECONDS, 2 * stall))]
    live = sum(1 for i in items if i["live"])
    supervisor = cp.supervisor.snapshot() if cp.supervisor is not None else None
    return WorkersView(live, items, supervisor, None if live else _reason(items, supervisor))


def no_worker_reason(cp: ControlPlane) -> str | None:
    """Why queued jobs will not start now, or None when some worker is live (job views and /readyz)."""
    try:
        return workers_view(cp).reason
    except Exception:  # the DB is down: /readyz says so on its own; job views must not fail on it
        return None
