"""Logs a person and a log shipper can read: one line per event, JSON off a terminal, no colour codes, no
third-party set-up chatter (issue 15 §7)."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.logging import JsonFormatter, configure_logging, wants_json
from support import HANG_GUARD_S
from support import REPO_ROOT as REPO
from support.services import free_port


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_only_off_a_terminal_unless_asked() -> None:
    assert wants_json(None, io.StringIO()) is True
    assert wants_json(None, _Tty()) is False
    assert wants_json(False, io.StringIO()) is False and wants_json(True, _Tty()) is True


def test_configure_replaces_basic_config_and_keeps_one_handler() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        logging.basicConfig(level=logging.INFO, force=False)
        console = logging.StreamHandler(sys.stderr)
        root.addHandler(console)
        configure_logging("INFO", True)
        configure_logging("INFO", True)
        ours = [h for h in root.handlers if getattr(h, "_excb", False)]
        assert len(ours) == 1 and console not in root.handlers
        assert isinstance(ours[0].formatter, JsonFormatter)
        assert logging.getLogger("alembic").getEffectiveLevel() == logging.WARNING
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)


def test_json_lines_carry_no_colour_codes() -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Started \x1b[36m%d\x1b[0m", (42,), None)
    record.color_message = "Started server process [\x1b[36m%d\x1b[0m]"
    record.event = "x\x1b[1my"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "Started 42" and "color_message" not in line and line["event"] == "xy"


@pytest.mark.integration
@pytest.mark.slow
def test_excb_up_prints_each_line_once_as_json(tmp_path: Path) -> None:
    """`excb up` with stderr on a pipe: API, supervisor and worker lines are all JSON, none printed twice,
    no ANSI codes, no alembic INFO, no Celery banner on stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCB_")}
    env.update(EXCB_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "excb.cli", "up", "--port", str(free_port())], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    deadline = time.time() + 120
    try:
        assert proc.stderr is not None
        while time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if " ready." in line:
                break
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=HANG_GUARD_S)
    lines += [x for x in err.splitlines()]
    lines = [x for x in lines if x.strip()]
    assert any(" ready." in x for x in lines), "\n".join(lines[-20:])
    parsed = [json.loads(x) for x in lines]  # every line is one JSON object
    assert "[queues]" not in out and "[config]" not in out, out[:500]  # no Celery banner (only its
    # shutdown notice, which Celery prints itself, reaches stdout)
    assert "\x1b[" not in "\n".join(lines)
    messages = [(p["logger"], p["msg"]) for p in parsed]
    assert len(messages) == len(set(messages)), "a line was printed twice"
    assert {"excb.up", "celery.apps.worker"} <= {p["logger"] for p in parsed}
    assert not [p for p in parsed if p["logger"].startswith("alembic") and p["level"] == "INFO"]
