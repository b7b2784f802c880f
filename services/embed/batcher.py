"""Micro-batching with a bounded queue, in front of one ONNX Runtime session.

Why a thread and not an asyncio task: the batcher must outlive any particular event loop (the service may
be mounted in another app, models are registered from worker threads, tests run several loops), and the
consumer spends its life inside ``session.run`` anyway. Requests wait on a ``concurrent.futures.Future``
(``await asyncio.wrap_future(fut)`` in async code).

Rules (reliability.md rows 9 and 29): the queue is counted in *images*, not requests, and is bounded -
beyond ``queue_size`` a submit fails at once with :class:`QueueFull` (the service answers 503 +
Retry-After). A request larger than ``max_batch`` is split into chunks, so no run exceeds ``max_batch``.
A failing run fails only the requests in that batch; the consumer keeps going. A batch is held open
for at most ``max_delay_ms`` and only while more requests are announced (being decoded), so a lone
request never waits for company that is not coming. How many images one run may merge is adaptive
(``services.embed.batch_policy``): the size that was cheapest per image in this process's own runs, within
a latency budget, so batching only merges where it pays (issue 19). Work that waited longer
than ``timeout_s`` is dropped with :class:`QueueTimeout` instead of being computed for nobody.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from services.embed.batch_policy import BatchPolicy

log = logging.getLogger("excb.embed.batcher")

RunFn = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]
BatchHook = Callable[[int, float], None]


class QueueFull(RuntimeError):
    """The bounded queue has no room for this request; retry after ``retry_after`` seconds."""

    def __init__(self, pending: int, capacity: int, retry_after: int) -> None:
        super().__init__(f"embedding queue is full ({pending}/{capacity} images pending)")
        self.retry_after = retry_after


class QueueTimeout(RuntimeError):
    """The request waited in the queue longer than the configured timeout."""


class BatcherClosed(RuntimeError):
    """The batcher was shut down before this request ran."""


@dataclass
class _Chunk:
    x: np.ndarray
    future: "Future[tuple[np.ndarray, np.ndarray]]"
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Collects queued images into runs of at most ``max_batch``, waiting at most ``max_delay_ms``.

    ``enabled=False`` keeps the queue bound and the single consumer but never merges requests: each
    request runs alone (the "batch-1" baseline the benchmark compares against).
    """

    def __init__(self, run_fn: RunFn, *, max_batch: int = 32, max_delay_ms: float = 5.0, queue_size: int = 256,
                 enabled: bool = True, timeout_s: float = 30.0, retry_after: int = 1, name: str = "model",
                 on_batch: BatchHook | None = None, latency_budget_ms: float | None = None) -> None:
        if max_batch < 1 or queue_size < 1:
            raise ValueError("max_batch and queue_size must be >= 1")
        self.run_fn = run_fn
        self.max_batch = max_batch
        self.max_delay = max(0.0, max_delay_ms) / 1000.0
        self.queue_size = queue_size
        self.enabled = enabled
        self.timeout_s = timeout_s
        self.retry_after = retry_after
        self.name = name
        self.on_batch = on_batch
        budget = float("inf") if latency_budget_ms is None else latency_budget_ms / 1000.0
        self.policy = BatchPolicy(max_batch, budget)
        self._queue: collections.deque[_Chunk] = collections.deque()
        self._cv = threading.Condition()
        self._pending = 0  # images queued or running
        self._arriving = 0  # requests announced (being decoded) but not submitted yet
        self._closed = False
        self.batches = 0
        self.images = 0
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # -- producer side ---------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return self._pending

    def announce(self) -> None:
        """A request is on its way (decoding). Only then is it worth holding a batch open for company:
        a lone request runs at once instead of paying ``max_delay``."""
        with self._cv:
            self._arriving += 1

    def withdraw(self) -> None:
        """The announced request was submitted or failed before reaching the queue."""
        with self._cv:
            self._arriving = max(0, self._arriving - 1)
            self._cv.notify()

    def submit(self, x: np.ndarray) -> "Future[tuple[np.ndarray, np.ndarray]]":
        """Queue a preprocessed batch [n, ...]; the future resolves to (embeddings, similarities) in order."""
        n = int(x.shape[0])
        if n < 1:
            raise ValueError("submit needs at least one image")
        chunks = [x[i:i + self.max_batch] for i in range(0, n, self.max_batch)]
        deadline = time.monotonic() + self.timeout_s
        parts: list[_Chunk] = [_Chunk(c, Future(), deadline) for c in chunks]
        with self._cv:
            if self._closed:
                raise BatcherClosed(f"model {self.name} is shutting down")
            if self._pending + n > self.queue_size:
                raise QueueFull(self._pending, self.queue_size, self.retry_after)
            self._pending += n
            self._queue.extend(parts)
            self._cv.notify()
        return parts[0].future if len(parts) == 1 else _combine([p.future for p in parts])

    async def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Async convenience: submit and await."""
        return await asyncio.wrap_future(self.submit(x))

    def close(self, drain: bool = True, timeout: float | None = 10.0) -> None:
        """Stop accepting work; finish what is queued (``drain``) or fail it, then stop the thread."""
        with self._cv:
            self._closed = True
            if not drain:
                while self._queue:
                    chunk = self._queue.popleft()
                    self._pending -= len(chunk.x)
                    _fail(chunk.future, BatcherClosed(f"model {self.name} was unloaded"))
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- consumer side ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        self._runqueue = RunQueueClock()  # of this (the consumer) thread
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                if batch:
                    self._execute(batch)
        finally:
            self._runqueue.close()

    def _next_batch(self) -> list[_Chunk] | None:
        """Block for the first chunk, then gather more until full or ``max_delay`` passed (None = stop)."""
        with self._cv:
            while not self._queue:
                if self._closed:
                    return None
                self._cv.wait()
            batch = [self._queue.popleft()]
            size = len(batch[0].x)
            if self.enabled:
                limit = self.policy.limit()
                until = time.monotonic() + self.max_delay
                while size < limit:
                    if self._queue:
                        if size + len(self._queue[0].x) > limit:
                            break
                        nxt = self._queue.popleft()
                        batch.append(nxt)
                        size += len(nxt.x)
                        continue
                    left = until - time.monotonic()
                    if left <= 0 or self._closed or self._arriving == 0:
                        break
                    self._cv.wait(left)
            return self._drop_expired(batch)

    def _drop_expired(self, batch: list[_Chunk]) -> list[_Chunk]:
        now = time.monotonic()
        live = []
        for chunk in batch:
            if chunk.deadline < now or chunk.future.done():
                self._pending -= len(chunk.x)
                _fail(chunk.future, QueueTimeout(f"waited {now - chunk.enqueued:.1f}s in the queue"))
            else:
                live.append(chunk)
        return live

    def _execute(self, batch: list[_Chunk]) -> None:
        n = sum(len(c.x) for c in batch)
        start = time.perf_counter()
        waited = self._runqueue()
        try:
            x = batch[0].x if len(batch) == 1 else np.concatenate([c.x for c in batch])
            emb, sims = self.run_fn(x)
            # the run's own time: wall time less the time this thread sat runnable while other threads (decode,
            # HTTP, other jobs) had the core, which grows with the run's length and would make merged runs look
            # dearer than they are (measured: the policy then never batched on a busy 1-core server)
            self.policy.observe(n, time.perf_counter() - start - (self._runqueue() - waited))
        except Exception as exc:  # isolate: this batch fails, the service keeps serving
            log.warning("batch of %d images failed on model %s: %s", n, self.name, exc)
            for chunk in batch:
                _fail(chunk.future, exc)
        else:
            offset = 0
            for chunk in batch:
                k = len(chunk.x)
                if not chunk.future.done():
                    chunk.future.set_result((emb[offset:offset + k], sims[offset:offset + k]))
                offset += k
        finally:
            with self._cv:
                self._pending -= n
            self.batches += 1
            self.images += n
        if self.on_batch is not None:
            try:
                self.on_batch(n, time.perf_counter() - start)
            except Exception:  # metrics must never break inference
                log.exception("on_batch hook failed")


class RunQueueClock:
    """Seconds the thread that made it has spent runnable but waiting for a CPU (Linux schedstat; 0 elsewhere).
    The file is opened once, in that thread, and re-read in place (~5 us instead of ~50 us per open)."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def __call__(self) -> float:
        if self._fd is None:
            return 0.0
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return 0.0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _fail(fut: Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _combine(futures: list[Future]) -> Future:
    """One future for a request split into chunks: concatenated results in order, or the first error."""
    out: Future = Future()
    remaining = [len(futures)]
    lock = threading.Lock()

    def done(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if not last or out.done():
            return
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            out.set_exception(errors[0])
            return
        results = [f.result() for f in futures]
        out.set_result((np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])))

    for f in futures:
        f.add_done_callback(done)
    return out
