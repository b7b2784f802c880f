"""Who is embedding a chunk right now, and which chunks are finished: small files in the corpus dir, so every
worker that mounts the runs folder agrees without a new table or a broker feature.

A claim (``claims/NNNNN``) is created with ``O_EXCL``: one holder at a time. Its holder refreshes its mtime
between batches; a claim older than the stall window belongs to a dead worker and the job's coordinator takes it
over. Claims only avoid doing a chunk twice at once; correctness does not rest on them: a chunk done twice
writes the same part under the same name (``os.replace``), so the output holds every item exactly once anyway.

A finished chunk has a completion record ``done/NNNNN.json`` (``{"index", "items", "errors", ...}``), written
after its part was committed: a worker killed between the two leaves a chunk that is simply done again.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from services.corpus.parts import write_json

CLAIMS_DIR = "claims"
DONE_DIR = "done"


def _name(index: int) -> str:
    return f"{index:05d}"


class Claim:
    """A held claim: :meth:`touch` keeps it fresh, :meth:`release` gives it up."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def touch(self) -> None:
        try:
            os.utime(self.path, None)
        except FileNotFoundError:  # taken over as stale: finishing still writes the same part
            pass

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def try_claim(root: Path, index: int, owner: str, stale_after: float | None = None) -> Claim | None:
    """Claim chunk ``index`` for ``owner``; None when someone else holds it. ``stale_after`` (seconds): take
    over a claim not refreshed for that long (the coordinator does; helpers never do)."""
    path = root / CLAIMS_DIR / _name(index)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if stale_after is None or not _stale(path, stale_after):
                return None
            aside = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.stale")
            try:
                os.rename(path, aside)  # one taker wins the rename; the other finds nothing to move
            except FileNotFoundError:
                return None
            aside.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{owner} {time.time():.3f}\n")
        return Claim(path)
    return None


def _stale(path: Path, max_age: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > max_age
    except FileNotFoundError:
        return True


def mark_done(root: Path, index: int, record: dict[str, Any]) -> None:
    """Record chunk ``index`` as committed (after its part is in place)."""
    write_json(root / DONE_DIR / f"{_name(index)}.json", {"index": index, **record})


def done_records(root: Path) -> dict[int, dict[str, Any]]:
    """Every completion record, by chunk index."""
    out: dict[int, dict[str, Any]] = {}
    folder = root / DONE_DIR
    if not folder.is_dir():
        return out
    for entry in folder.iterdir():
        if entry.name.startswith(".") or entry.suffix != ".json":
            continue
        try:
            doc = json.loads(entry.read_text())
        except (OSError, ValueError):
            continue
        out[int(doc["index"])] = doc
    return out


def is_done(root: Path, index: int) -> bool:
    return (root / DONE_DIR / f"{_name(index)}.json").exists()
