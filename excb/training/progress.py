"""A run's progress display: a tqdm bar on a terminal, plain log lines (:class:`LogProgress`) in a job's log."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("excb.trainer")  # progress lines have always come from the trainer's logger

PROGRESS_LOG_SECONDS = 30.0  # without a terminal: one progress line this often (and one at the end)


class LogProgress:
    """tqdm's interface (``update``, ``set_postfix``, ``total``, ``close``) as plain log lines, for a log file.

    A tqdm bar redrawn with carriage returns is one line of thousands of characters in a job's log; this writes
    ``progress: step 120/2000 (6%), 3.1 steps/s, eta 10m05s, loss 4.123`` every ``interval`` seconds instead.
    """

    def __init__(self, total: int, initial: int = 0, interval: float = PROGRESS_LOG_SECONDS) -> None:
        self.total, self.n, self.interval = total, initial, interval
        self.postfix: dict[str, Any] = {}
        self.started = self.last = time.monotonic()
        self.first, self.logged = initial, initial

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval or self.n >= self.total:
            self._log(now)

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if self.n != self.logged:
            self._log(time.monotonic())

    def _log(self, now: float) -> None:
        rate = (self.n - self.first) / max(now - self.started, 1e-9)
        left = max(self.total - self.n, 0) / rate if rate > 0 else None
        eta = f", eta {int(left // 60)}m{int(left % 60):02d}s" if left is not None else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        percent = 100 * self.n / max(self.total, 1)
        log.info("progress: step %d/%d (%.0f%%), %.2f steps/s%s%s", self.n, self.total, percent, rate, eta, extra)
        self.last, self.logged = now, self.n


def progress_bar(total: int, initial: int) -> Any:
    """A tqdm bar on a terminal; plain log lines (:class:`LogProgress`) when stderr is a file or a pipe (a job)."""
    if not sys.stderr.isatty():
        return LogProgress(total, initial)
    return tqdm(total=total, initial=initial, desc="excb train", unit="step", dynamic_ncols=True)
