"""Job-history series of the control plane's ``/metrics``, read from the job store at scrape time.

Workers run in other processes (other machines, in compose), so no counter in this process could see a job
finish; the database is the one place every outcome lands. Each scrape therefore derives, from the rows the
store holds: ``excb_jobs_submitted_total``, ``excb_jobs_finished_total{outcome}``, the histograms
``excb_job_duration_seconds{outcome}`` (first start to end) and ``excb_job_queue_wait_seconds`` (submit to first
start), and the latest balance of every RUNNING job as ``excb_train_balance_<stat>{job}`` - the training-side
twin of the served ``excb_serve_balance_<stat>{model}``. Deleting jobs lowers the totals; Prometheus reads that
as a counter reset.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import select

from services.api.state import ControlPlane
from services.common.metrics import NAMESPACE
from services.db.tables import TERMINAL, Job

DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0,
                    86400.0, 172800.0)
QUEUE_WAIT_BUCKETS = (0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
TRAIN_BALANCE = {
    "normalized_entropy": "normalized entropy of the running job's cluster sizes (latest logged step)",
    "effective_clusters": "exp(entropy) of the running job's cluster sizes (latest logged step)",
    "empty_fraction": "fraction of the running job's clusters below the empty threshold (latest logged step)",
    "max_share": "largest cluster share of the running job (latest logged step)",
    "gini": "Gini coefficient of the running job's cluster shares (latest logged step)",
    "kl_to_uniform": "KL divergence of the running job's cluster shares to uniform, nats (latest logged step)",
}


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    return max(0.0, (end - start).total_seconds()) if start is not None and end is not None else None


def _histogram(name: str, doc: str, buckets: tuple[float, ...], by_label: dict[tuple[str, ...], list[float]],
               labels: list[str]) -> HistogramMetricFamily:
    """A histogram family from raw observations per label set (cumulative buckets, as the format wants)."""
    fam = HistogramMetricFamily(name, doc, labels=labels)
    for key, values in sorted(by_label.items()):
        cumulative = [(repr(b), float(sum(v <= b for v in values))) for b in buckets]
        fam.add_metric(list(key), cumulative + [("+Inf", float(len(values)))], sum_value=float(sum(values)))
    return fam


class JobHistoryCollector:
    """The series named in the module docstring; nothing when the store cannot be read (the scrape goes on)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def collect(self) -> Iterable[Metric]:
        try:
            with self.cp.db.session() as s:
                rows = s.execute(select(Job.status, Job.created_at, Job.started_at, Job.finished_at)).all()
                running = s.execute(select(Job.id, Job.balance).where(Job.status == "RUNNING")).all()
        except Exception:
            return []
        return list(self._families(rows, running))

    def _families(self, rows: Sequence[Any], running: Sequence[Any]) -> Iterator[Metric]:
        submitted = CounterMetricFamily(f"{NAMESPACE}_jobs_submitted", "jobs submitted (rows the store holds)")
        submitted.add_metric([], float(len(rows)))
        yield submitted
        finished = CounterMetricFamily(f"{NAMESPACE}_jobs_finished", "jobs that ended, by outcome",
                                       labels=["outcome"])
        durations: dict[tuple[str, ...], list[float]] = {}
        waits: list[float] = []
        for status, created, started, ended in rows:
            wait = _seconds(created, started)
            if wait is not None:
                waits.append(wait)
            if status in TERMINAL:
                durations.setdefault((status,), [])
                took = _seconds(started, ended)
                if took is not None:
                    durations[(status,)].append(took)
        for outcome in sorted(TERMINAL):
            finished.add_metric([outcome], float(sum(1 for r in rows if r[0] == outcome)))
        yield finished
        yield _histogram(f"{NAMESPACE}_job_duration_seconds", "first start to end of finished jobs, by outcome",
                         DURATION_BUCKETS, durations, ["outcome"])
        yield _histogram(f"{NAMESPACE}_job_queue_wait_seconds", "submit to first start of started jobs",
                         QUEUE_WAIT_BUCKETS, {(): waits} if waits else {}, [])
        yield from _train_balance(running)


def _train_balance(running: Sequence[Any]) -> Iterator[Metric]:
    """``excb_train_balance_<stat>{job}`` from each RUNNING job's latest balance block (the worker copies it
    from the trainer's metrics every ``progress_interval_seconds``); a job with none logged yet has no series."""
    families = {k: GaugeMetricFamily(f"{NAMESPACE}_train_balance_{k}", doc, labels=["job"])
                for k, doc in TRAIN_BALANCE.items()}
    for job_id, balance in running:
        for k, fam in families.items():
            value = (balance or {}).get(k)
            if isinstance(value, (int, float)):
                fam.add_metric([job_id], float(value))
    yield from families.values()


def visible_jobs(cp: ControlPlane, owner: str | None) -> set[str]:
    """The RUNNING jobs whose ``job`` label ``owner``'s scrape may carry: its own."""
    with cp.db.session() as s:
        return set(s.scalars(select(Job.id).where(Job.status == "RUNNING", Job.owner == owner)))
