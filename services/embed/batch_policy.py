"""How many images the next ONNX Runtime run may hold: learned from the runs themselves (issue 19).

Why: a fixed ``max_batch`` assumes bigger runs are cheaper per image. On a GPU they are (~50x from batch 1 to
64); on a CPU whose cores the decoder and the HTTP server share, measured runs of 4-16 images cost about as
much per image as single ones, while every request in a big run waits for all of it: batching on was then
slower than off at concurrency 32 with three times the p99. So the policy keeps, per power-of-two size
bucket, a moving average of seconds per image, and allows the smallest size whose cost per image is within
``tolerance`` of the cheapest seen, never more than fits the ``budget_s`` for one run. A neighbouring size
not seen yet is tried first, and one size down or up every ``probe_every`` runs, so the estimate follows the
machine and its load.
"""

from __future__ import annotations

import threading


class BatchPolicy:
    """``limit()`` -> images the next run may merge; ``observe(n, seconds)`` after every run."""

    def __init__(self, max_batch: int, budget_s: float, *, alpha: float = 0.2, tolerance: float = 0.05,
                 probe_every: int = 16) -> None:
        self.max_batch = max(1, int(max_batch))
        self.budget_s = float(budget_s)
        self.alpha = alpha
        self.tolerance = tolerance
        self.probe_every = max(1, probe_every)
        self.per_image: dict[int, float] = {}  # bucket -> EWMA seconds per image
        self.runs = 0
        self._lock = threading.Lock()

    @staticmethod
    def bucket(n: int) -> int:
        """The largest power of two <= n."""
        return 1 << (max(1, int(n)).bit_length() - 1)

    def observe(self, n: int, seconds: float) -> None:
        if n < 1 or seconds <= 0:
            return
        b, cost = self.bucket(n), seconds / n
        with self._lock:
            old = self.per_image.get(b)
            self.per_image[b] = cost if old is None else old + self.alpha * (cost - old)
            self.runs += 1

    def limit(self) -> int:
        with self._lock:
            if not self.per_image:
                return self.max_batch
            cheapest = min(self.per_image.values())
            best = min(b for b, c in self.per_image.items() if c <= cheapest * (1 + self.tolerance))
            best = self._explore(best)
            while best > 1 and best * self._cost(best) > self.budget_s:
                best //= 2  # one run must fit the latency budget
            return min(best, self.max_batch)

    def _explore(self, best: int) -> int:
        """A neighbour of ``best`` not measured yet (smaller first), else every ``probe_every`` runs one size
        down or up in turn, so the estimates follow the machine and its load."""
        down = best // 2 if best > 1 else None
        up = min(best * 2, self.max_batch) if best < self.max_batch else None
        if down is not None and down not in self.per_image:
            return down
        if up is not None and up not in self.per_image:
            return up
        if self.runs % self.probe_every == 0:
            turn = [down, up] if (self.runs // self.probe_every) % 2 else [up, down]
            return next((b for b in turn if b is not None), best)
        return best

    def _cost(self, b: int) -> float:
        """Seconds per image at bucket ``b``: its own estimate, else the nearest smaller one seen."""
        while b >= 1:
            if b in self.per_image:
                return self.per_image[b]
            b //= 2
        return min(self.per_image.values())

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"per_image_ms": {b: round(c * 1000, 3) for b, c in sorted(self.per_image.items())},
                    "runs": self.runs}


__all__ = ["BatchPolicy"]
