"""services/common/tail.py: the one follower of growing files (worker metrics ingestion, API log streams)."""

from __future__ import annotations

from pathlib import Path

from services.common.tail import FileTail


def test_complete_lines_with_offsets_partial_last_line_waits(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    tail = FileTail(log)
    assert tail.lines() == []  # not there yet
    log.write_bytes(b"one\n\ntwo\nthr")
    assert tail.text_lines() == [("one", 4), ("two", 9)] and tail.offset == 9
    with log.open("ab") as fh:
        fh.write(b"ee\n\xff\n")
    assert tail.text_lines() == [("three", 15), ("\ufffd", 17)]
    with log.open("ab") as fh:
        fh.write(b"last, no newline")
    assert tail.lines() == [] and tail.lines(final=True) == [(b"last, no newline", 33)]
    assert FileTail(log, offset=9).text_lines()[0] == ("three", 15)  # a reconnect resumes at an event's offset


def test_chunked_reads_and_a_rewritten_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a\nbb\nccc\n")
    tail = FileTail(path, chunk=4)
    assert tail.lines() == [(b"a", 2)] and tail.lines() == [(b"bb", 5)] and tail.lines() == [(b"ccc", 9)]
    path.write_bytes(b"x\n")  # shorter than the offset: rewritten from scratch
    assert tail.lines() == [(b"x", 2)]


def test_metrics_rows_skip_torn_and_foreign_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "step", "step": 1}\n[1, 2]\nnot json\n{"type": "step", "st')
    tail = FileTail(path)
    assert tail.json_rows() == [{"type": "step", "step": 1}]
    with path.open("a") as fh:
        fh.write('ep": 2}\n')
    assert tail.json_rows() == [{"type": "step", "step": 2}]
