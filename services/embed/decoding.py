"""Decode + preprocess on a bounded pool of threads sized to the cores (issue 19).

Why a pool of its own: on anyio's default pool (40 threads) every concurrent request decoded at once, so on
a 2-core box 32 requests shared the cores and all finished decoding late together (processor sharing), and
the decode threads fought the ONNX Runtime thread for the GIL-free cores. With as many workers as cores,
decodes run first come, first served: early requests reach the micro-batcher early, later ones wait in a
queue that costs no CPU. Pillow and the resize kernel release the GIL, so the workers do run in parallel.

Each image is decoded by the defensive decoder (``excb.data.decode``), inside the process-wide pixel budget,
and preprocessed by ``OrtEmbedder.preprocess`` straight into its slot of the request's batch array. Images a
request names by path are read here, one at a time, after their reservation (their bytes + header pixels) is
granted; URLs are fetched one at a time, each just before its decode (``services.embed.sources``).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable

import numpy as np

from excb.data.decode import ImageDecodeError, decode_image, header_pixels
from excb.inference.onnx_runtime import default_intra_op_threads
from services.common.errors import ApiError
from services.embed.decode_budget import BYTES_PER_PIXEL, BudgetExhausted, PixelBudget
from services.embed.metrics import EmbedMetrics
from services.embed.registry import LoadedModel
from services.embed.sources import FileImage, Item, UrlImage, read_file, read_prefix
from services.settings import EmbedSettings

HEADER_BYTES = 256 * 1024  # enough for every format's size fields, EXIF and ICC segments of camera JPEGs included
Fetch = Callable[[UrlImage, str], Awaitable[bytes]]


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

    async def decode(self, items: list[Item], model: LoadedModel, fetch: Fetch | None = None) -> np.ndarray:
        """:meth:`decode_all` on the pool; the time spent waiting for a worker is the ``decode_wait`` stage.

        A request naming URLs is decoded one image per pool task instead: each URL is fetched (``fetch``, on the
        fetch threads) just before its decode, so the request never holds more than one fetched body."""
        queued = time.perf_counter()
        loop = asyncio.get_running_loop()
        if not any(isinstance(src, UrlImage) for _, src in items):
            return await loop.run_in_executor(self.pool, self._timed, items, model, queued)
        if fetch is None:
            raise ApiError(422, "invalid_input", "this route does not fetch URLs", items[0][0])
        out = self._batch(len(items), model)
        min_side = self.min_side(model)
        spent = [0.0, 0.0]
        for i, (field, src) in enumerate(items):
            data = await fetch(src, field) if isinstance(src, UrlImage) else src
            t = await loop.run_in_executor(self.pool, self.decode_into, field, data, model, out[i], min_side)
            spent = [spent[0] + t[0], spent[1] + t[1]]
            del data
        self._stages(*spent)
        return out

    def _timed(self, items: list[Item], model: LoadedModel, queued: float) -> np.ndarray:
        self.metrics.stage("decode_wait", time.perf_counter() - queued)
        return self.decode_all(items, model)

    def decode_all(self, items: list[Item], model: LoadedModel) -> np.ndarray:
        """Decode + preprocess every image (in the calling thread); the first bad image fails the request. Files
        are read here, one at a time, each inside its budget reservation."""
        out = self._batch(len(items), model)
        min_side = self.min_side(model)
        decode_s = prep_s = 0.0
        for i, (field, src) in enumerate(items):
            if isinstance(src, UrlImage):  # callers on this path resolved no URLs; refuse rather than block here
                raise ApiError(422, "invalid_input", "this route does not fetch URLs", field)
            d, p = self.decode_into(field, src, model, out[i], min_side)
            decode_s, prep_s = decode_s + d, prep_s + p
        self._stages(decode_s, prep_s)
        return out

    def _batch(self, n: int, model: LoadedModel) -> np.ndarray:
        size = model.bundle.input_size
        return np.empty((n, 3, size, size), dtype=np.float32)

    def _stages(self, decode_s: float, prep_s: float) -> None:
        self.metrics.stage("decode", decode_s)
        self.metrics.stage("preprocess", prep_s)

    def decode_into(self, field: str, src: bytes | FileImage, model: LoadedModel, out: np.ndarray,
                    min_side: int) -> tuple[float, float]:
        """Decode one image into ``out`` (its row of the batch) inside the pixel budget; (decode s, preprocess s).
        A file is read only once its reservation (header pixels + its bytes) is granted."""
        e = self.settings
        try:
            if isinstance(src, FileImage):
                with self.budget.hold(self.file_cost(src, min_side)):  # counted before the file is read
                    return self._decode_bytes(read_file(src, field), model, out, min_side)
            with self.budget.hold(self.cost(src, min_side)):  # bounded decode memory across requests
                return self._decode_bytes(src, model, out, min_side)
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

    def _decode_bytes(self, data: bytes, model: LoadedModel, out: np.ndarray, min_side: int) -> tuple[float, float]:
        e = self.settings
        t0 = time.perf_counter()
        image = decode_image(data, max_bytes=e.max_image_bytes, max_pixels=e.max_pixels,
                             allowed_formats=e.allowed_formats, min_side=min_side)
        t1 = time.perf_counter()
        model.embedder.preprocess(image, out=out)
        return t1 - t0, time.perf_counter() - t1  # the image is freed on return, before the budget is

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

    def file_cost(self, src: FileImage, min_side: int = 0) -> int:
        """What reading and decoding a file holds: its bytes (as pixels, :data:`BYTES_PER_PIXEL`) plus the
        pixels its header announces, read from the first :data:`HEADER_BYTES`; a header not found there
        reserves ``max_pixels`` (the most decode will allow)."""
        pixels = self.cost(read_prefix(src, HEADER_BYTES), min_side) if src.size else 1
        if pixels <= 1 and src.size > HEADER_BYTES:
            pixels = self.settings.max_pixels
        return pixels + -(-src.size // BYTES_PER_PIXEL)

    def close(self) -> None:
        """Stop the workers; an app that is started again (tests, mounted apps) gets a new pool on first use."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["ImageDecoder"]
