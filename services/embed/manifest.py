"""The control plane's record of servable models: ``<models_dir>/manifest.json`` (issue 13 items 5 and 6).

``{"format": "excb-models/1", "models": {"<id>": {"sha256", "owner", "shared", "activated_at"}}}``, written
only by the control plane (the worker when it registers a bundle, ``POST /v1/models/{id}/activate``), under
an exclusive lock and replaced atomically. The embed service serves a bundle from ``models_dir`` only when
this record names it and the bytes of its ``model.onnx`` hash to the recorded sha256: a file swapped in
(with a matching hash edited into ``model.json``) or a folder copied in without going through the control
plane is refused with a logged reason. ``owner`` and ``shared`` decide which API keys see the model.
"""

from __future__ import annotations

import fcntl
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from excb.fileio import atomic_write

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "excb-models/1"
_LOCK_FILE = ".manifest.lock"


@dataclass(frozen=True)
class ModelRecord:
    """What the control plane recorded for one model; ``owner`` None = trained without API keys (shared)."""

    sha256: str
    owner: str | None = None
    shared: bool = False
    activated_at: float = 0.0

    def visible_to(self, caller: str | None) -> bool:
        """``caller`` None = auth off: everything is visible; otherwise own, shared or ownerless models."""
        return caller is None or self.owner is None or self.shared or self.owner == caller


def read_manifest(models_dir: Path) -> dict[str, ModelRecord] | None:
    """The records by model id; None when there is no manifest (no control plane wrote to this dir)."""
    path = Path(models_dir) / MANIFEST_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: trust nothing rather than everything
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, dict):
        return {}
    out: dict[str, ModelRecord] = {}
    for model_id, entry in models.items():
        if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
            out[str(model_id)] = ModelRecord(entry["sha256"], entry.get("owner"), bool(entry.get("shared")),
                                             float(entry.get("activated_at") or 0.0))
    return out


def update_manifest(models_dir: Path, model_id: str, **changes: Any) -> ModelRecord:
    """Create or change one record (``sha256``, ``owner``, ``shared``, ``activated_at``) under an exclusive
    lock, so two workers registering at once do not lose each other's entry; returns the new record."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / _LOCK_FILE, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        records = read_manifest(models_dir) or {}
        old = records.get(model_id)
        base = asdict(old) if old is not None else {"sha256": "", "owner": None, "shared": False, "activated_at": 0.0}
        base.update(changes)
        records[model_id] = ModelRecord(**base)
        _write(models_dir, records)
        return records[model_id]


def record_model(models_dir: Path, model_id: str, sha256: str, owner: str | None, activate: bool = True) -> ModelRecord:
    """The worker's call after a bundle is in place: its hash and owner become the trusted record."""
    changes: dict[str, Any] = {"sha256": sha256, "owner": owner}
    if activate:
        changes["activated_at"] = time.time()
    return update_manifest(models_dir, model_id, **changes)


def _write(models_dir: Path, records: dict[str, ModelRecord]) -> None:
    atomic_write(models_dir / MANIFEST_FILE, json.dumps(
        {"format": MANIFEST_FORMAT, "models": {k: asdict(v) for k, v in sorted(records.items())}}, indent=1),
        mode=0o644)  # read by every embed replica, which may run as another user
