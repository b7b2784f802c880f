"""Embedded mode: keep the in-process embed registry serving the model the job store marks active.

The worker (another process) registers each new model as active in the DB and writes its bundle into the
models dir; the embed registry loads new bundles by itself but keeps serving its current ``latest``. This
thread closes that gap: it points ``latest`` at the DB's active model (loading it if needed).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import select

from services.db.models import ModelRow
from services.db.session import Database
from services.embed.manifest import ModelRecord

log = logging.getLogger("excb.model_sync")


def sync_once(db: Database, registry: Any) -> str | None:
    """Activate the DB's active model in ``registry``; returns the id it activated (None if nothing to do)."""
    with db.session() as s:
        row = s.scalar(select(ModelRow).where(ModelRow.active.is_(True)).order_by(ModelRow.created_at.desc()))
    if row is None or registry.latest_id == row.id:
        return None
    if row.id in {m.id for m in registry.models()}:
        registry.activate(row.id)
    else:
        record = ModelRecord(sha256=row.sha256 or "", owner=row.owner)  # the DB's hash must match the bytes
        registry.register(row.bundle_dir, row.id, activate=True, record=record)
    log.info("embed service now serves %s", row.id)
    return row.id


class ModelSync(threading.Thread):
    def __init__(self, db: Database, registry: Any, every_s: float) -> None:
        super().__init__(name="excb-model-sync", daemon=True)
        self.db, self.registry, self.every_s = db, registry, every_s
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                sync_once(self.db, self.registry)
            except Exception:
                log.exception("model sync failed")

    def stop(self) -> None:
        self._stop.set()
