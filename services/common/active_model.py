"""The hand-off of "which bundle is active": ``<models_dir>/active.json`` (``{"model_id", "bundle_dir", "sha256"}``).

Writers (the worker after a verified export, the API's activate route) replace it atomically; readers (every embed
replica, the API's model sync) follow it. One module owns the file's name, format and both directions, so the
worker, the API and the embed service agree without importing each other.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from excb.fileio import atomic_write

ACTIVE_FILE = "active.json"

log = logging.getLogger("excb.models")


def active_path(models_dir: Path) -> Path:
    return Path(models_dir) / ACTIVE_FILE


def write_active(models_dir: Path, model_id: str, bundle_dir: Path, sha256: str) -> None:
    """Atomically point every reader at ``bundle_dir`` (temp file, fsync, rename); world-readable like the
    bundles, since embed replicas may run as another user on the shared volume."""
    atomic_write(active_path(models_dir), json.dumps({"model_id": model_id, "bundle_dir": str(bundle_dir),
                                                      "sha256": sha256}), mode=0o644)


def read_active_id(models_dir: Path) -> str | None:
    """The active model's id, or None when there is no (readable) pointer."""
    pointer = active_path(models_dir)
    if not pointer.is_file():
        return None
    try:
        model_id = json.loads(pointer.read_text()).get("model_id")
    except (OSError, ValueError, AttributeError):
        log.warning("ignoring unreadable %s", pointer)
        return None
    return model_id if isinstance(model_id, str) else None


def pointer_signature(path: Path) -> tuple[int, int, int] | None:
    """Identity of the pointer file: it is replaced by rename, so a new inode (or mtime) means a new model."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
