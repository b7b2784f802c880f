"""services/common/periodic.py: the one periodic background loop (reaper, worker heartbeat, registry rescan)."""

from __future__ import annotations

import threading
import time

from services.common.periodic import Periodic


def test_calls_every_period_survives_failures_and_stops() -> None:
    calls: list[float] = []
    failed = threading.Event()

    def fn() -> None:
        calls.append(time.monotonic())
        if len(calls) == 2:
            failed.set()
            raise RuntimeError("the DB is down")

    loop = Periodic("test-loop", fn, 0.02, first_now=True)
    loop.start()
    deadline = time.monotonic() + 5
    while len(calls) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    loop.stop(join_timeout=2)
    assert failed.is_set() and len(calls) >= 5  # the failing pass did not end the loop
    assert not loop.is_alive() and loop.daemon
    settled = len(calls)
    time.sleep(0.1)
    assert len(calls) == settled  # stopped means no more calls


def test_first_call_waits_one_period_unless_first_now() -> None:
    calls: list[int] = []
    loop = Periodic("slow", lambda: calls.append(1), 30.0)
    loop.start()
    time.sleep(0.1)
    loop.stop(join_timeout=2)
    assert calls == [] and not loop.is_alive()
