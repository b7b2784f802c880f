"""Live event streams per key (issue 13 item 10): a cap on concurrent SSE streams and on their lifetime.

Each stream takes a slot when its route is called and frees it when its generator ends. A slot also expires
on its own shortly after the stream's deadline, so a response that never started (client gone before the
first byte, generator never run) cannot leak a slot for good. Counts are per API process.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from typing import AsyncIterator, TypeVar

from services.common.errors import ApiError

T = TypeVar("T")
_GRACE_S = 60.0  # a slot outlives its stream's deadline by this much at most


class StreamSlots:
    """Concurrent live streams per principal; ``acquire`` raises 429 with ``Retry-After`` beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots: dict[str, dict[str, float]] = {}  # key -> slot id -> expiry (monotonic)
        self._lock = threading.Lock()

    def acquire(self, key: str | None, lifetime_s: float) -> str:
        now = time.monotonic()
        owner = key or "anonymous"
        with self._lock:
            live = {sid: exp for sid, exp in self._slots.get(owner, {}).items() if exp > now}
            if len(live) >= self.limit:
                retry = max(1, int(min(live.values()) - now) if live else 1)
                raise ApiError(429, "too_many_streams", f"{len(live)} live streams are open for this key; the "
                                                        f"limit is {self.limit}", None,
                               {"Retry-After": str(min(retry, 60))})
            slot = uuid.uuid4().hex
            live[slot] = now + lifetime_s + _GRACE_S
            self._slots[owner] = live
            return slot

    def release(self, key: str | None, slot: str) -> None:
        with self._lock:
            self._slots.get(key or "anonymous", {}).pop(slot, None)

    def active(self, key: str | None) -> int:
        now = time.monotonic()
        with self._lock:
            return sum(1 for exp in self._slots.get(key or "anonymous", {}).values() if exp > now)


async def held(slots: StreamSlots, key: str | None, slot: str, body: AsyncIterator[T]) -> AsyncIterator[T]:
    """``body`` that frees its slot when it ends, fails or is cancelled (client disconnect)."""
    try:
        async for chunk in body:
            yield chunk
    finally:
        with contextlib.suppress(Exception):
            slots.release(key, slot)
