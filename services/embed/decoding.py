"""Decode + preprocess on a bounded pool of threads sized to the cores (issue 19).

Why a pool of its own: on anyio's default pool (40 threads) every concurrent request decoded at once, so on
a 2-core box 32 requests shared the cores and all finished decoding late together (processor sharing), and
the decode threads fought the ONNX Runtime thread for the GIL-free cores. With as many workers as cores,
decodes run first come, first served: early requests reach the micro-batcher early, later ones wait in a
queue that costs no CPU. Pillow and the resize kernel release the GIL, so the workers do run in parallel.

Each image is decoded by the defensive decoder (``excb.data.decode``), inside the process-wide pixel budget,
and preprocessed by ``OrtEmbedder.preprocess`` straight into its slot of the request's batch array.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from excb.data.decode import ImageDecodeError, decode_image, header_pixels
from excb.onnx_runtime import default_intra_op_threads
from services.common.errors import ApiError
from services.embed.decode_budget import BudgetExhausted, PixelBudget
from services.embed.metrics import EmbedMetrics
from services.embed.registry import LoadedModel
from services.settings import EmbedSettings


class ImageDecoder:
    """``decode_all(items, model) -> float32 [N, 3, S, S]``; every bad image is an :class:`ApiError` (4xx/503)."""

    def __init__(self, settings: EmbedSettings, metrics: EmbedMetrics, budget: PixelBudget) -> None:
        self.settings = settings
        self.metrics = metrics
        self.budget = budget
        self.workers = settings.decode_workers or default_intra_op_threads()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:  # made on first use: apps built in tests and never served start no threads
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="embed-decode")
        return self._pool

    async def decode(self, items: list[tuple[str, bytes]], model: LoadedModel) -> np.ndarray:
        """:meth:`decode_all` on the pool; the time spent waiting for a worker is the ``decode_wait`` stage."""
        queued = time.perf_counter()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._timed, items, model, queued)

    def _timed(self, items: list[tuple[str, bytes]], model: LoadedModel, queued: float) -> np.ndarray:
        self.metrics.stage("decode_wait", time.perf_counter() - queued)
        return self.decode_all(items, model)

    def decode_all(self, items: list[tuple[str, bytes]], model: LoadedModel) -> np.ndarray:
        """Decode + preprocess every image (in the calling thread); the first bad image fails the request."""
        e = self.settings
        size = model.bundle.input_size
        out = np.empty((len(items), 3, size, size), dtype=np.float32)
        min_side = self.min_side(model)
        decode_s = prep_s = 0.0
        for i, (field, data) in enumerate(items):
            try:
                with self.budget.hold(self.cost(data, min_side)):  # bounded decode memory across requests
                    t0 = time.perf_counter()
                    image = decode_image(data, max_bytes=e.max_image_bytes, max_pixels=e.max_pixels,
                                         allowed_formats=e.allowed_formats, min_side=min_side)
                    t1 = time.perf_counter()
                    model.embedder.preprocess(image, out=out[i])
                    prep_s += time.perf_counter() - t1
                    decode_s += t1 - t0
                    del image  # freed before the budget is: the next decode may need the room
            except BudgetExhausted as exc:
                self.metrics.rejected.labels("decode_budget").inc()
                raise ApiError(503, "overloaded", str(exc), None,
                               {"Retry-After": str(e.retry_after_seconds)}) from exc
            except ImageDecodeError as exc:
                self.metrics.rejected.labels(exc.code).inc()
                raise ApiError(exc.http_status, exc.code, exc.message, field) from exc
            except (ValueError, OSError, MemoryError, TypeError) as exc:  # a decoder bug class, still bad input
                self.metrics.rejected.labels("corrupt").inc()
                raise ApiError(422, "corrupt", f"the image could not be decoded: {exc}", field) from exc
        self.metrics.stage("decode", decode_s)
        self.metrics.stage("preprocess", prep_s)
        return out

    def min_side(self, model: LoadedModel) -> int:
        """How small a JPEG may be decoded for ``model`` (0: whole; ``jpeg_draft`` off)."""
        return model.embedder.decode_min_side if self.settings.jpeg_draft else 0

    def cost(self, data: bytes, min_side: int = 0) -> int:
        """Pixels to reserve for one image: the size it decodes to, from its header (capped at max_pixels, which
        decode enforces; a JPEG drafted to ``min_side`` reserves its drafted size); unreadable input reserves 1
        and decode_image reports it with its own error."""
        e = self.settings
        if not 0 < len(data) <= e.max_image_bytes:
            return 1
        try:
            return min(header_pixels(data, e.allowed_formats, min_side), e.max_pixels)
        except (ImageDecodeError, ValueError, OSError, TypeError):
            return 1

    def close(self) -> None:
        """Stop the workers; an app that is started again (tests, mounted apps) gets a new pool on first use."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["ImageDecoder"]
