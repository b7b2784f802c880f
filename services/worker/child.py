"""Start and stop the trainer child process (``python -m excb.cli train``, or torchrun for several GPUs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from services.common.process import die_with_parent


def trainer_command(config: dict[str, Any], gpus: int) -> list[str]:
    """The argv of the trainer: one process, or torchrun with one process per GPU. ``config`` is the job's stored,
    validated config, handed over as it is (``excb train --resolved-config``): no file, no second resolve."""
    train = ["-m", "excb.cli", "train", "--resolved-config", json.dumps(config, separators=(",", ":"))]
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *train]
    return [sys.executable, *train]


def start(argv: list[str], log: IO[bytes], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Spawn in its own session (signals go to the whole trainer group), output appended to the job log."""
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, preexec_fn=die_with_parent, close_fds=True)


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the trainer and everything it started (torchrun ranks, data loader workers)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop(proc: subprocess.Popen[bytes], grace: float) -> int:
    """SIGTERM (the trainer checkpoints and exits 143), SIGKILL after ``grace`` seconds; returns the exit code."""
    signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is None:
        signal_group(proc, signal.SIGKILL)
    rc = proc.wait()
    signal_group(proc, signal.SIGKILL)  # stragglers in the group (data loader workers)
    return rc


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants in MiB (Linux /proc)."""
    total = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total / 1024.0


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out
