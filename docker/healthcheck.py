#!/usr/bin/env python3
"""Container healthcheck: exit 0 when URL answers 2xx within the timeout, 1 otherwise.

Why a script and not curl: the slim images carry no curl, and a health probe must not pull in a package
(or a shell) the service does not need. Standard library only, so it runs under any Python in the image.
Usage: excb-healthcheck URL [TIMEOUT_SECONDS]
"""

from __future__ import annotations

import sys
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


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        sys.stderr.write("usage: excb-healthcheck URL [TIMEOUT_SECONDS]\n")
        return 2
    return probe(argv[1], float(argv[2]) if len(argv) == 3 else 3.0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
