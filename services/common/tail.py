"""Following a file that another process appends to: the worker reads the trainer's ``metrics.jsonl`` and the
API streams ``job.log`` / ``train.log`` to clients, both through :class:`FileTail`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class FileTail:
    """Complete new lines of a growing file, each with the byte offset just after it.

    ``offset`` always sits after the last complete line returned, so a partial last line is read again next
    time (or returned by ``final=True`` once the writer is done). A file that shrank was rewritten from scratch
    (a resumed run rewinds ``metrics.jsonl``) and is read again from the start. Blank lines are skipped.
    """

    def __init__(self, path: Path, offset: int = 0, chunk: int | None = None) -> None:
        self.path, self.offset, self.chunk = Path(path), offset, chunk  # chunk: most bytes read per call

    def lines(self, final: bool = False) -> list[tuple[bytes, int]]:
        try:
            size = self.path.stat().st_size
            if size < self.offset:
                self.offset = 0
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read(-1 if self.chunk is None else self.chunk)
        except FileNotFoundError:
            return []
        out: list[tuple[bytes, int]] = []
        pos = 0
        while (nl := data.find(b"\n", pos)) >= 0:
            if data[pos:nl].strip():
                out.append((data[pos:nl], self.offset + nl + 1))
            pos = nl + 1
        if final and data[pos:].strip():
            out.append((data[pos:], self.offset + len(data)))
            pos = len(data)
        self.offset += pos
        return out

    def text_lines(self, final: bool = False) -> list[tuple[str, int]]:
        """:meth:`lines` decoded as UTF-8 (undecodable bytes replaced: a log is shown, not parsed)."""
        return [(line.decode("utf-8", errors="replace"), end) for line, end in self.lines(final)]

    def json_rows(self) -> list[dict[str, Any]]:
        """The new complete lines that are JSON objects (a torn or foreign line is skipped)."""
        rows: list[dict[str, Any]] = []
        for line, _ in self.lines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows
