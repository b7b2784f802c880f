"""One log line per event: JSON objects for machines (containers, files, pipes), plain text on a terminal.

Every process of the stack (API, embed service, Celery workers) installs the same single root handler, so a
line is printed once, in one format. JSON is the default when stderr is not a TTY (``EXCB_LOG_JSON`` forces
either way); colour codes that libraries put into their records (uvicorn's ``color_message``) never reach a
JSON line, and chatty third-party INFO (migrations, ONNX export passes) is kept at WARNING.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# INFO from these is set-up chatter (one line per migration plugin, per export pass, per HTTP request).
QUIET_LOGGERS = ("alembic", "onnxscript", "onnx_ir", "httpx", "httpcore", "multipart", "PIL", "matplotlib")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra}``; extras given via ``logger.info(..., extra={...})``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": strip_ansi(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value if isinstance(value, (int, float, bool, type(None))) else strip_ansi(
                    value if isinstance(value, str) else repr(value))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def wants_json(json_lines: bool | None, stream: TextIO | None = None) -> bool:
    """``None`` (the default) means: JSON unless a person is watching the stream."""
    if json_lines is not None:
        return json_lines
    stream = stream or sys.stderr
    return not (hasattr(stream, "isatty") and stream.isatty())


def _replaceable(handler: logging.Handler) -> bool:
    """Ours, or a plain console handler (``basicConfig``'s); a test runner's capture handlers stay."""
    if getattr(handler, "_excb", False):
        return True
    return type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.stdout)


def configure_if_unset(level: str = "INFO", json_lines: bool | None = None) -> None:
    """Configure a process nobody configured yet (a Celery worker importing its app: early warnings too)."""
    if not logging.getLogger().handlers:
        configure_logging(level, json_lines)


def configure_logging(level: str = "INFO", json_lines: bool | None = None) -> None:
    """Replace every root handler (``basicConfig``'s included) with one stderr handler; idempotent."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if _replaceable(handler):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._excb = True  # type: ignore[attr-defined]  # our marker, so a second install replaces only ours
    handler.setFormatter(JsonFormatter() if wants_json(json_lines) else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.warn(...) becomes a line in the same format, not raw stderr
    quiet = max(logging.WARNING, root.level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
