"""One periodic background thread: call a function every N seconds until stopped, surviving its failures.

The reaper, the worker's heartbeat and the embed registry's rescan each had their own loop around an
``Event.wait``; this is that loop, once.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger("excb.periodic")


class Periodic(threading.Thread):
    """A daemon thread calling ``fn`` every ``interval`` seconds (first at once when ``first_now``).

    An exception from ``fn`` is logged and the next period tries again: what these loops wait on (the DB,
    the broker, a folder) comes back by itself.
    """

    def __init__(self, name: str, fn: Callable[[], object], interval: float, first_now: bool = False) -> None:
        super().__init__(name=name, daemon=True)
        self.fn, self.interval, self.first_now = fn, float(interval), first_now
        self._halt = threading.Event()  # not ``_stop``: that is Thread's own method (called after fork)

    def tick(self) -> None:
        try:
            self.fn()
        except Exception:
            log.exception("%s: pass failed; next try in %.1f s", self.name, self.interval)

    def run(self) -> None:
        if self.first_now:
            self.tick()
        while not self._halt.wait(self.interval):
            self.tick()

    def stop(self, join_timeout: float | None = None) -> None:
        """Ask the loop to end; with ``join_timeout``, wait that long for a pass in progress."""
        self._halt.set()
        if join_timeout is not None and self.is_alive() and threading.current_thread() is not self:
            self.join(join_timeout)
