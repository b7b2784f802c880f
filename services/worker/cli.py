"""`excb worker-health`: the worker container's health check (exit 1 when its Celery consumer is gone)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``worker-health`` verb."""
    p = subparsers.add_parser(
        "worker-health", help="exit 0 while this container's worker consumer heartbeats, 1 otherwise",
        description="Reads the heartbeat file the worker's consumer touches (EXCB_WORKER_HEALTH_FILE). It goes "
                    "stale when the consumer stops or the process is wedged or gone; no broker or DB call.")
    p.add_argument("--file", type=Path, help="heartbeat file (default EXCB_WORKER_HEALTH_FILE)")
    p.add_argument("--max-age", type=float, help="seconds (default EXCB_STALL_SECONDS)")
    p.set_defaults(func=_cmd_health)


def _cmd_health(args: argparse.Namespace) -> int:
    from services.settings import get_settings
    from services.worker.liveness import check_health

    settings = get_settings()
    ok, reason = check_health(args.file or settings.worker_health_file, args.max_age or settings.stall_seconds)
    print(f"{'healthy' if ok else 'unhealthy'}: {reason}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
