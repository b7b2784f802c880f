"""A process-wide budget of pixels being decoded at once (issue 13 item 7, reliability.md row 19).

The per-image cap (``max_pixels``) bounds one decode, not many: a 38 KB PNG of 6300x6300 costs ~370 MB
while decoded, and the thread pool may run dozens of them at once. Each decode reserves its header's pixel
count here first; when the budget is spent, a decode waits up to ``wait_s`` and then the request gets 503 +
Retry-After. An image larger than the whole budget still runs, but alone. A file a request names by path is
reserved before it is read, its encoded bytes counted as pixels too (:data:`BYTES_PER_PIXEL`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from typing import Iterator

BYTES_PER_PIXEL = 11  # what one pixel costs while it is decoded: the unit encoded bytes are counted in
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_buffers_to_the_os() -> bool:
    """Fix glibc's mmap threshold at 1 MiB so decoded images (Pillow allocates them in blocks of up to 16 MB)
    are mmapped and go back to the OS when freed. Without it, glibc raises the threshold after the first free
    and later blocks come from per-thread arenas that keep their pages: measured on a real server, six 6300 px
    decodes run one at a time still grew peak RSS by 717 MiB (34 MiB with this). Skipped when
    ``MALLOC_MMAP_THRESHOLD_`` is set or the C library is not glibc; returns whether it was applied."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


class BudgetExhausted(RuntimeError):
    """No room in the pixel budget within the wait limit."""


class PixelBudget:
    """Counting semaphore over pixels; ``peak`` records the most pixels ever held at once (for tests/metrics)."""

    def __init__(self, total: int, wait_s: float) -> None:
        self.total = int(total)
        self.wait_s = float(wait_s)
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Reserve ``pixels`` for the duration of the block (blocking, bounded by ``wait_s``)."""
        pixels = max(1, int(pixels))
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self.used and self.used + pixels > self.total:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BudgetExhausted(f"{self.used} of {self.total} pixels are being decoded; try again")
                self._cond.wait(left)
            self.used += pixels
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()
