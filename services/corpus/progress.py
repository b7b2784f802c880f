"""One line of a corpus job's progress for a person (``excb corpus status``, ``excb jobs status``)."""

from __future__ import annotations

from typing import Any


def progress_line(progress: dict[str, Any], status: str) -> str:
    """``chunks 12/40, images 12000/40000 (30.0%), 3 undecodable, 850 images/s, eta 33 s``."""
    if progress.get("chunks_total") is None:
        return "not started" if status in ("QUEUED", "STARTING") else "not planned yet"
    parts = [f"chunks {progress.get('chunks_done') or 0}/{progress['chunks_total']}"]
    images, total = progress.get("images") or 0, progress.get("images_total")
    pct = progress.get("percent")
    parts.append(f"images {images}/{total}" + (f" ({pct:.1f}%)" if pct is not None else ""))
    if progress.get("errors"):
        parts.append(f"{progress['errors']} undecodable")
    if progress.get("images_per_second") and status == "RUNNING":
        parts.append(f"{progress['images_per_second']:.0f} images/s")
    if progress.get("eta_seconds") is not None and status == "RUNNING":
        parts.append(f"eta {duration(float(progress['eta_seconds']))}")
    return ", ".join(parts)


def duration(seconds: float) -> str:
    """Seconds as a person reads an ETA: 42 s, 3 min 5 s, 2 h 10 min (the job CLIs share it)."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"
