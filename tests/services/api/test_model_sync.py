"""services.api.model_sync.ModelSync: `excb up` follows active.json on its change (no timer), and a failed sync
is retried after a pause or on the next change, never by every request."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from services.api import model_sync
from services.db import models as model_store
from services.db.session import Database
from services.db.tables import ModelRow
from support import HANG_GUARD_S


class FlakyRegistry:
    """Records registrations; refuses the first one (like a bundle the registry will not serve)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.latest_id: str | None = None

    def models(self) -> list[Any]:
        return []

    def register(self, bundle_dir: str, model_id: str, activate: bool, record: Any) -> None:
        self.calls.append(model_id)
        if len(self.calls) == 1:
            raise RuntimeError("refused")
        self.latest_id = model_id


def _point(models: Path, model_id: str) -> None:
    tmp = models / ".active.tmp"
    tmp.write_text(json.dumps({"model_id": model_id}))
    tmp.replace(models / "active.json")


def test_sync_follows_the_pointer_and_backs_off_after_a_failure(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(model_sync, "RETRY_FAILED_S", 0.3)
    db = Database(f"sqlite:///{tmp_path / 'sync.sqlite'}")
    models = tmp_path / "models"
    models.mkdir()
    registry = FlakyRegistry()
    sync = model_sync.ModelSync(db, registry, models)
    model_store.add_model(db, ModelRow(id="m-a", status="READY", bundle_dir=str(models / "m-a"), sha256="0" * 64,
                                       model_json={}))
    _point(models, "m-a")
    assert sync.stale()
    sync.sync_if_changed()  # refused
    assert registry.calls == ["m-a"] and not sync.stale()  # not retried by the next requests
    sync.sync_if_changed()
    assert registry.calls == ["m-a"]
    time.sleep(0.35)
    assert sync.stale()
    sync.sync_if_changed()
    assert registry.calls == ["m-a", "m-a"] and registry.latest_id == "m-a" and not sync.stale()
    model_store.add_model(db, ModelRow(id="m-b", status="READY", bundle_dir=str(models / "m-b"), sha256="0" * 64,
                                       model_json={}))
    assert not sync.stale()  # the DB alone is not the event: the worker replaces active.json last
    _point(models, "m-b")
    assert sync.stale()
    sync.sync_if_changed()
    assert registry.latest_id == "m-b"
    db.dispose()


def test_the_watcher_activates_on_the_file_event(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'watch.sqlite'}")
    models = tmp_path / "models"
    models.mkdir()
    registry = FlakyRegistry()
    registry.calls.append("warm")  # no refusal in this test
    sync = model_sync.ModelSync(db, registry, models)
    sync.start()
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not sync._tried and time.monotonic() < deadline:  # noqa: SLF001 - imports, first sync, then watches
            time.sleep(0.05)
        time.sleep(0.3)
        model_store.add_model(db, ModelRow(id="m-c", status="READY", bundle_dir=str(models / "m-c"), sha256="0" * 64,
                                           model_json={}))
        t0 = time.monotonic()
        _point(models, "m-c")
        while registry.latest_id != "m-c" and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        assert registry.latest_id == "m-c", registry.calls
        print(f"active.json replaced -> registered by the watcher: {time.monotonic() - t0:.3f} s")
    finally:
        sync.stop()
        sync.join(10)
    db.dispose()


def test_migration_drops_the_active_copy_and_keeps_the_models(tmp_path: Path) -> None:
    """0004: a database that still has ``models.active`` upgrades with every model row intact; which model is
    active is the pointer's to say from then on."""
    from sqlalchemy import inspect, text

    from support.services import database_at_revision

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    database_at_revision(url, "0003")
    db = Database(url, run_migrations=False)
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO models (id, status, active, bundle_dir, model_json, created_at) VALUES "
                          "('m-old', 'READY', 1, '/m/m-old', '{}', '2026-01-01 00:00:00')"))
    db.dispose()
    db = Database(url)
    try:
        assert "active" not in {c["name"] for c in inspect(db.engine).get_columns("models")}
        row = model_store.get_model(db, "m-old")
        assert row is not None and row.bundle_dir == "/m/m-old" and row.status == "READY"
    finally:
        db.dispose()
