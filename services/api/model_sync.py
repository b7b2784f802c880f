"""Embedded mode: keep the in-process embed registry serving the model ``active.json`` names.

The worker (another process) moves each new bundle into the models dir, records its model row in the DB,
replaces ``<models_dir>/active.json`` and only then commits the job SUCCEEDED. Activation follows that file on
the event, never on a timer: a thread blocks on file-system notifications for ``active.json`` (watchfiles:
inotify on Linux), and the embed request path checks the pointer's identity (one ``stat``) before leasing a
model, so a request that arrives before the notification still sees the new model. The pointer says which model
is active; the DB row gives its bundle, hash and owner.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from services.common.active_model import active_path, pointer_signature, read_active_id
from services.common.auth import CURRENT_PRINCIPAL
from services.db.session import Database
from services.db.tables import ModelRow
from services.embed.manifest import ModelRecord

log = logging.getLogger("excb.model_sync")
logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every change at INFO

Signature = tuple[int, int, int] | None
RETRY_FAILED_S = 5.0


def sync_once(db: Database, registry: Any, models_dir: Path) -> str | None:
    """Activate the model ``active.json`` names in ``registry``, with the hash and owner its DB row records;
    returns the id it activated (None if nothing to do)."""
    active = read_active_id(models_dir)
    token = CURRENT_PRINCIPAL.set(None)  # compare with the global latest, not the requesting key's
    try:
        if active is None or registry.latest_id == active:
            return None
        with db.session() as s:
            row = s.get(ModelRow, active)
        if row is None:
            log.warning("active.json names %s, which is not a registered model: not served", active)
            return None
        if row.id in {m.id for m in registry.models()}:
            registry.activate(row.id)
        else:
            record = ModelRecord(sha256=row.sha256 or "", owner=row.owner)  # the DB's hash must match the bytes
            registry.register(row.bundle_dir, row.id, activate=True, record=record)
    finally:
        CURRENT_PRINCIPAL.reset(token)
    log.info("embed service now serves %s", row.id)
    return row.id


def _import_preprocessing() -> None:
    """Import the bundles' eval transform (torch, torchvision) now: a model's warm-up otherwise pays these
    imports (3.5 s measured on a busy 2-core box) between SUCCEEDED and its first answer."""
    try:
        import excb.data.augment  # noqa: F401
    except Exception:
        log.exception("preloading the eval transform failed; the first model load will import it")


class ModelSync(threading.Thread):
    """Follows ``active.json``: notified by the file system, and checked by each embed request."""

    def __init__(self, db: Database, registry: Any, models_dir: Path) -> None:
        super().__init__(name="excb-model-sync", daemon=True)
        self.db, self.registry, self.models_dir = db, registry, Path(models_dir)
        self.pointer = active_path(self.models_dir)
        self._seen: Signature = None
        self._tried = False
        self._failed_at: float | None = None
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def stale(self) -> bool:
        """Cheap enough for every request: one stat. A failed sync (a refused bundle, a locked SQLite file) is
        retried after RETRY_FAILED_S or on the next change, not by every request."""
        if not self._tried or pointer_signature(self.pointer) != self._seen:
            return True
        return self._failed_at is not None and time.monotonic() - self._failed_at > RETRY_FAILED_S

    def sync_if_changed(self) -> None:
        """Sync when stale (one caller at a time; the others find it done)."""
        with self._lock:
            if not self.stale():
                return
            sig = pointer_signature(self.pointer)  # read first: a change during the sync is seen next time
            try:
                sync_once(self.db, self.registry, self.models_dir)
                self._failed_at = None
            except Exception:
                log.exception("model sync failed; retrying in %.0f s or on the next change", RETRY_FAILED_S)
                self._failed_at = time.monotonic()
            self._seen, self._tried = sig, True

    def run(self) -> None:
        _import_preprocessing()
        self.sync_if_changed()  # what was active before this process started
        self.models_dir.mkdir(parents=True, exist_ok=True)
        name = self.pointer.name
        try:
            import watchfiles

            for _ in watchfiles.watch(self.models_dir, stop_event=self._halt, debounce=400, step=20,
                                      recursive=False, watch_filter=lambda _c, p: Path(p).name == name,
                                      raise_interrupt=False):
                self.sync_if_changed()
        except Exception:
            log.exception("watching %s failed; embed requests still pick up new models", self.models_dir)

    def stop(self) -> None:
        self._halt.set()
