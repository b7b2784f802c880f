"""When a counted retry runs again, which failures are a full disk, and how a failure reads.

A failure that is counted against ``max_attempts`` is often transient (a full run directory, a node under
pressure). Republished at once, every attempt fails the same way within milliseconds and the budget is gone
before anyone can free space (issue 33's soak: attempt 0 -> FAILED attempt 3 in 34 ms). So a counted retry waits
``retry_backoff_seconds``, doubled per failure and capped, before its message is due.
"""

from __future__ import annotations

import errno
import signal

# What a trainer's traceback says when its own write (checkpoint, metrics) hit a full disk or a quota.
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def retry_delay(failures: int, base: float, cap: float) -> float:
    """Seconds before retry number ``failures`` (1 = after the first counted failure): base x 2^(failures-1),
    at most ``cap``; 0 with a base of 0 (back-off off)."""
    if base <= 0 or failures <= 0:
        return 0.0
    return float(min(cap, base * 2 ** min(failures - 1, 30)))


def is_disk_full(exc: BaseException) -> bool:
    """The worker's own write failed for lack of space (ENOSPC) or quota (EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS


def mentions_disk_full(log_tail: str) -> bool:
    """A trainer that died on a full disk says so in the last lines of its log (its traceback)."""
    return any(text in log_tail for text in _DISK_FULL_TEXT)


def disk_full_message(what: str) -> str:
    """The job's error: what failed, and that it is the disk (not the job) and will be retried."""
    return (f"disk full: {what}: no space left on the run directory's filesystem; the job is retried after a "
            "back-off, free space to let it continue")


def exit_text(rc: int) -> str:
    """``-9`` -> ``killed by SIGKILL``: what a person reading the log wants to know."""
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with {rc}"


def budget_note(failures: int, max_attempts: int) -> str:
    """What a counted failure adds to the job's error: the retry to come, or that none is left and how to ask for
    one (``failures`` counts this failure)."""
    if failures >= max_attempts:
        return (f" (attempt {failures} of {max_attempts}: no attempts left; `excb jobs retry` runs it again from "
                "its last checkpoint)")
    return f" (attempt {failures} of {max_attempts}: retried from its last checkpoint)"
