"""Prometheus metrics of the embed service, in its own registry (one per app, so apps never collide) or, in
`excb up`, in the control plane's (one ``/metrics`` for the one service).

Label values are bounded: ``model`` (the loaded models) and ``reason`` (a fixed set). Balance gauges are
computed at scrape time from each model's monitor; there is never one series per cluster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Summary
from prometheus_client.core import GaugeMetricFamily, Metric

from services.common.metrics import NAMESPACE

if TYPE_CHECKING:
    from services.embed.registry import ModelRegistry

# The request path, in order (services/embed/app.py): body read, parse (JSON + base64 / multipart / raw),
# wait for a decode worker, decode, preprocess, micro-batch (queue + the ORT run of its batch), assignment,
# response encoding, and the whole handler. HTTP parsing and the framework are the client's latency minus
# "handler"; the ORT run per batch is excb_embed_batch_seconds.
STAGES = ("read", "parse", "decode_wait", "decode", "preprocess", "batch", "assign", "encode", "handler")

_BALANCE_GAUGES = {
    "normalized_entropy": "normalized entropy of served (balanced) cluster assignments in the window",
    "effective_clusters": "exp(entropy) of served assignments in the window",
    "empty_fraction": "fraction of clusters with no served assignment in the window",
    "max_share": "largest cluster share of served assignments in the window",
    "gini": "Gini coefficient of served cluster shares in the window",
    "kl_to_uniform": "KL divergence of served shares to uniform (nats)",
    "window_assignments": "assignments currently in the sliding window",
}
_DRIFT_GAUGES = {
    "kl": "KL(served || training sizes), nats",
    "js": "Jensen-Shannon divergence between served shares and training sizes, nats",
    "tv": "total-variation distance between served shares and training sizes",
}


class _ModelCollector:
    """Scrape-time gauges for every loaded model."""

    def __init__(self, registry: "ModelRegistry") -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        balance = {k: GaugeMetricFamily(f"{NAMESPACE}_serve_balance_{k}", doc, labels=["model"])
                   for k, doc in _BALANCE_GAUGES.items()}
        drift = {k: GaugeMetricFamily(f"{NAMESPACE}_serve_drift_{k}", doc, labels=["model"])
                 for k, doc in _DRIFT_GAUGES.items()}
        loaded = GaugeMetricFamily(f"{NAMESPACE}_model_loaded", "1 for every model being served",
                                   labels=["model", "version"])
        queue = GaugeMetricFamily(f"{NAMESPACE}_embed_queue_depth", "images queued or running", labels=["model"])
        for m in self.registry.models():
            loaded.add_metric([m.id, m.version], 1.0)
            queue.add_metric([m.id], float(m.batcher.pending))
            gauges = m.monitor.gauges()  # no served traffic yet: only window_assignments (the rest: no data)
            for k, fam in balance.items():
                if k in gauges:
                    fam.add_metric([m.id], gauges[k])
            for k, fam in drift.items():
                if f"drift_{k}" in gauges:
                    fam.add_metric([m.id], gauges[f"drift_{k}"])
        yield loaded
        yield queue
        yield from balance.values()
        yield from drift.values()


class EmbedMetrics:
    """Counters/histograms updated on the request path plus the scrape-time model collector."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.images = Counter(f"{NAMESPACE}_embed_images_total", "images embedded", ["model"], registry=self.registry)
        self.rejected = Counter(f"{NAMESPACE}_embed_rejected_total", "requests refused", ["reason"],
                                registry=self.registry)
        self.batch_size = Histogram(f"{NAMESPACE}_embed_batch_size", "images per ONNX Runtime run", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry)
        self.batch_seconds = Histogram(f"{NAMESPACE}_embed_batch_seconds", "ONNX Runtime run time", ["model"],
                                       registry=self.registry)
        self.request_seconds = Histogram(f"{NAMESPACE}_embed_request_duration_seconds",
                                         "embedding request latency (decode to response)", ["route"],
                                         registry=self.registry)
        self.stage_seconds = Summary(f"{NAMESPACE}_embed_stage_seconds",
                                     "time per request in each stage of the embed pipeline (sum/count)", ["stage"],
                                     registry=self.registry)
        self.stages = {s: self.stage_seconds.labels(s) for s in STAGES}
        self._collector: _ModelCollector | None = None

    def stage(self, name: str, seconds: float) -> None:
        """Record one request's time in a stage (STAGES); where the time goes, under real load."""
        self.stages[name].observe(seconds)

    def batch_hook(self, model_id: str) -> Callable[[int, float], None]:
        size = self.batch_size.labels(model_id)
        secs = self.batch_seconds.labels(model_id)

        def hook(n: int, seconds: float) -> None:
            size.observe(n)
            secs.observe(seconds)

        return hook

    def attach(self, registry: "ModelRegistry") -> None:
        if self._collector is None:
            self._collector = _ModelCollector(registry)
            self.registry.register(self._collector)
