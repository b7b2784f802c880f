#!/usr/bin/env python3
"""Container healthcheck: exit 0 when URL answers 2xx within the timeout, 1 otherwise.

Why a script and not curl: the slim images carry no curl, and a health probe must not pull in a package
(or a shell) the service does not need. Standard library only, so it runs under any Python in the image.
Usage: excb-healthcheck URL [TIMEOUT_SECONDS]
       excb-healthcheck --worker   the Celery worker's heartbeat file ($EXCB_WORKER_HEALTH_FILE) is fresher than
                                   the stall threshold: the same rule as `excb worker-health`, which imports the
                                   whole service (17.8 s on a loaded 2-core machine, past a 10 s probe timeout:
                                   found by the first real compose run) where this takes milliseconds
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request


def probe(url: str, timeout: float) -> int:
    """0 for a 2xx answer, 1 for anything else (HTTP error, refused connection, timeout)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback URL from the image)
            return 0 if 200 <= resp.status < 300 else 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        sys.stderr.write(f"healthcheck {url}: {exc}\n")
        return 1


def worker_fresh() -> int:
    """0 when the heartbeat file is younger than EXCB_STALL_SECONDS (0 = EXCB_STALL_HEARTBEATS x
    EXCB_HEARTBEAT_SECONDS, 6 x 5 s by default: services/settings.py), 1 otherwise."""
    path = os.environ.get("EXCB_WORKER_HEALTH_FILE", "")
    stall = float(os.environ.get("EXCB_STALL_SECONDS", "0") or 0)
    if stall <= 0:
        stall = (float(os.environ.get("EXCB_STALL_HEARTBEATS", "6"))
                 * float(os.environ.get("EXCB_HEARTBEAT_SECONDS", "5")))
    try:
        age = time.time() - os.stat(path).st_mtime
    except OSError as exc:
        sys.stderr.write(f"healthcheck: no heartbeat file {path!r}: {exc}\n")
        return 1
    if age > stall:
        sys.stderr.write(f"healthcheck: consumer heartbeat {age:.1f}s old (stall threshold {stall:.0f}s)\n")
        return 1
    return 0


def main(argv: list[str]) -> int:
    if argv[1:] == ["--worker"]:
        return worker_fresh()
    if len(argv) not in (2, 3):
        sys.stderr.write("usage: excb-healthcheck URL [TIMEOUT_SECONDS]\n")
        return 2
    return probe(argv[1], float(argv[2]) if len(argv) == 3 else 3.0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
