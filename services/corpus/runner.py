"""Corpus jobs on the workers: a coordinator that owns the job and helpers that take single chunks.

The coordinator is the job's ordinary Celery message (``excb.run_job``, the same lease, heartbeat, reaper and
retry rules as a training job). It plans the chunks (once; later attempts reuse the plan), sends one
``excb.corpus_chunk`` message per unfinished chunk so idle workers help, and then embeds chunks itself, last
first, until every chunk has a completion record. It alone writes the job row (fenced by its lease) and the
manifest. A helper claims its chunk, embeds it and commits it; it never blocks a worker waiting for others, so
one worker finishes a corpus alone and N workers share it.

Failure handling: a helper killed mid-chunk leaves a claim that goes stale, which the coordinator takes over; a
coordinator killed stops heartbeating, the reaper requeues the job and the next attempt resumes from the
completion records (finished chunks are never embedded again). A redelivered chunk message finds its chunk
done or claimed and returns. Cancel: the coordinator sees the flag on its heartbeat, helpers on their checks
between batches; nothing half-written is ever visible.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path
from typing import Any, Callable

from excb.inference.onnx_runtime import BundleError
from services.common.paths import BUILTIN_SOURCES, PathNotAllowed, check_source_contained
from services.corpus import claims
from services.corpus.embed import DEFAULT_BATCH_SIZE, Stopped, embedder_for
from services.corpus.index import build_corpus_index
from services.corpus.parts import MANIFEST, read_manifest, write_json, write_part
from services.corpus.plan import DEFAULT_CHUNK_SIZE, chunk_items, plan_chunks
from services.db import jobs as store
from services.db.jobs import Lease
from services.db.session import Database
from services.db.tables import ACTIVE, ModelRow, utcnow
from services.settings import Settings
from services.worker import retry

log = logging.getLogger("excb.corpus")

KIND = "embed"  # the job body's "kind" that makes a corpus job
TASK_EMBED_CHUNK = "excb.corpus_chunk"

SendChunk = Callable[[str, int], None]
StopCheck = Callable[[], bool]


def model_row(db: Database, model_id: str) -> ModelRow | None:
    """The registered model ``model_id`` (its bundle dir and owner)."""
    with db.session() as s:
        return s.get(ModelRow, model_id)


def job_source(config: dict[str, Any]) -> str:
    """A corpus job's data source, stored as ``data.source`` like a training job's (the API shows both alike)."""
    return str((config.get("data") or {}).get("source") or "")


def is_corpus_config(config: dict[str, Any] | None) -> bool:
    return isinstance(config, dict) and config.get("kind") == KIND


def corpus_root(run_dir: str | Path) -> Path:
    """The corpus dir inside a job's run dir (``parts.corpus_dir`` from the job id gives the same path)."""
    return Path(run_dir) / "corpus"


def embed_chunk(root: Path, source: str, chunk: dict[str, Any], bundle_dir: str, batch_size: int,
                worker: str, between: Callable[[int], bool]) -> dict[str, Any]:
    """Embed one chunk, commit its part atomically, then record it done; returns the completion record."""
    t0 = time.perf_counter()
    index = int(chunk["index"])
    table, items, errors = embedder_for(bundle_dir).embed(chunk_items(source, chunk, root), batch_size, between)
    write_part(root, index, table)
    del table
    record = {"items": items, "errors": errors, "worker": worker, "seconds": round(time.perf_counter() - t0, 3)}
    claims.mark_done(root, index, record)
    return record


# --- helpers: one chunk per message --------------------------------------------------------------------------
def run_chunk(db: Database, settings: Settings, job_id: str, index: int, worker: str,
              stopping: StopCheck = lambda: False) -> str:
    """Embed chunk ``index`` of job ``job_id`` unless it is done, claimed, or the job is no longer running."""
    job = store.get_job(db, job_id)
    if job is None or job.status not in ("STARTING", "RUNNING") or job.cancel_requested:
        return "skipped: job not running"
    root = corpus_root(job.run_dir)
    manifest = read_manifest(root)
    chunks = manifest.get("chunks") or [] if manifest is not None else []
    if manifest is None or not 0 <= index < len(chunks):
        return "skipped: no such chunk"
    if claims.is_done(root, index):
        return "skipped: done"
    claim = claims.try_claim(root, index, worker)
    if claim is None:
        return "skipped: claimed"
    bundle_dir = str(manifest.get("bundle_dir") or "")
    checked = [time.monotonic()]

    def between(_done: int) -> bool:
        """Between batches: refresh the claim; about once per heartbeat, is the job still running?"""
        claim.touch()
        if stopping():
            return True
        if time.monotonic() - checked[0] < settings.heartbeat_seconds:
            return False
        checked[0] = time.monotonic()
        current = store.get_job(db, job_id)
        return current is None or current.status not in ACTIVE or current.cancel_requested

    try:
        if claims.is_done(root, index):  # finished by someone else between the check and the claim
            return "skipped: done"
        record = embed_chunk(root, str(manifest["source"]), chunks[index], bundle_dir,
                             int(manifest.get("batch_size") or DEFAULT_BATCH_SIZE), worker, between)
    except Stopped:
        return "stopped"
    finally:
        claim.release()
    return f"embedded {record['items']} items ({record['errors']} errors)"


# --- the coordinator: the job's own message --------------------------------------------------------------------
class CorpusJob:
    """One attempt of one corpus job, from lease to final commit (``JobRunner``'s counterpart)."""

    def __init__(self, db: Database, settings: Settings, job_id: str, worker: str, send_chunk: SendChunk,
                 republish: Callable[[float], None], stopping: StopCheck = lambda: False) -> None:
        self.db, self.settings, self.job_id, self.worker = db, settings, job_id, worker
        self.send_chunk, self.republish, self.stopping = send_chunk, republish, stopping
        self.stop_reason: str | None = None  # cancelled, lease_lost, preempted
        self.last_beat = 0.0
        self.listed = -1  # completion records the manifest lists as done

    def run(self) -> str:
        lease = store.acquire(self.db, self.job_id, self.worker)
        if lease is None:
            store.settle_unrunnable(self.db, self.job_id)
            return "skipped"
        log.info("corpus job %s attempt %d leased with token %d", self.job_id, lease.attempt, lease.token)
        try:
            return self._run_leased(lease)
        except Exception as exc:  # never leave the job RUNNING: counted, retried from the completion records
            log.exception("corpus job %s: worker error", self.job_id)
            return self._fail(lease, "worker_error", f"{type(exc).__name__}: {exc}", count=True)

    # --- set-up -------------------------------------------------------------------------------------------
    def _run_leased(self, lease: Lease) -> str:
        job = store.get_job(self.db, self.job_id)
        assert job is not None
        run_dir = Path(job.run_dir)
        self.root = corpus_root(run_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / "job.log"
        self._log(f"--- attempt {lease.attempt} on {self.worker} (token {lease.token})")
        config = dict(job.config)
        model = model_row(self.db, str(config.get("model_id")))
        if model is None:
            return self._fail(lease, "model_not_found", f"model {config.get('model_id')!r} no longer exists",
                              count=False)
        source = job_source(config)
        if source not in BUILTIN_SOURCES:  # the tree may have changed since the API checked it
            try:
                check_source_contained(source, self.settings.data_roots)
            except PathNotAllowed as exc:
                return self._fail(lease, "path_not_allowed", str(exc), count=False)
        if not store.fenced_update(self.db, lease, status="RUNNING", heartbeat_at=utcnow()):
            store.end_attempt(self.db, lease, "lease_lost")
            return "lease_lost"
        try:
            self.manifest = self._manifest(job, config, model.bundle_dir)
        except BundleError as exc:  # the model's files changed since it was registered: no retry mends that
            return self._fail(lease, "model_unusable", f"model {config.get('model_id')!r}: {exc}", count=False)
        except (OSError, ValueError) as exc:
            return self._fail(lease, "bad_source", f"{source!r}: {exc}", count=False)
        return self._coordinate(lease)

    def _manifest(self, job: Any, config: dict[str, Any], bundle_dir: str) -> dict[str, Any]:
        """The plan of an earlier attempt, or a new one (listing the source once)."""
        manifest = read_manifest(self.root)
        if manifest is not None and manifest.get("chunks"):
            manifest["status"] = "running"
            return manifest
        embedder = embedder_for(bundle_dir)
        chunk_size = int(config.get("chunk_size") or DEFAULT_CHUNK_SIZE)
        chunks = plan_chunks(job_source(config), chunk_size, self.root)
        manifest = {
            "job_id": job.id, "model_id": config["model_id"], "owner": job.owner, "source": job_source(config),
            "embed_dim": embedder.embed_dim, "num_clusters": embedder.bundle.num_clusters,
            "model_sha256": embedder.bundle.sha256, "bundle_dir": bundle_dir, "chunk_size": chunk_size,
            "batch_size": int(config.get("batch_size") or DEFAULT_BATCH_SIZE),
            "chunks": chunks, "status": "running",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json(self.root / MANIFEST, manifest)
        self._log(f"planned {len(chunks)} chunks, {sum(c['items'] for c in chunks)} items of {job_source(config)}")
        return manifest

    # --- the loop -------------------------------------------------------------------------------------------
    def _coordinate(self, lease: Lease) -> str:
        chunks = self.manifest["chunks"]
        done = claims.done_records(self.root)
        self.t0, self.done_before = time.monotonic(), sum(int(r["items"]) for r in done.values())
        pending = [int(c["index"]) for c in chunks if int(c["index"]) not in done]
        for index in pending:
            self.send_chunk(self.job_id, index)
        self._log(f"{len(chunks) - len(pending)} of {len(chunks)} chunks already done; {len(pending)} sent")
        while True:
            done = claims.done_records(self.root)
            self._beat(lease, done, force=True)
            if self.stop_reason is not None:
                return self._stopped(lease, done)
            todo = [i for i in reversed(pending) if i not in done]
            if not todo:
                self._write_manifest(done, "running")  # the index reads the parts the manifest lists as done
                self._index(lease, done)
                if self.stop_reason is not None:
                    return self._stopped(lease, done)
                return self._succeed(lease, done)
            if not self._embed_one(lease, todo):
                time.sleep(0.3)

    def _embed_one(self, lease: Lease, todo: list[int]) -> bool:
        """Take one unclaimed (or stale) chunk and embed it here; False when every one is held elsewhere."""
        for index in todo:
            claim = claims.try_claim(self.root, index, self.worker, stale_after=self.settings.stall_seconds)
            if claim is None:
                continue
            try:
                if claims.is_done(self.root, index):
                    return True

                def between(_done: int, claim: claims.Claim = claim) -> bool:
                    claim.touch()
                    self._beat(lease, None)
                    return self.stop_reason is not None

                embed_chunk(self.root, str(self.manifest["source"]), self.manifest["chunks"][index],
                            str(self.manifest["bundle_dir"]), int(self.manifest["batch_size"]), self.worker, between)
            except Stopped:
                pass
            finally:
                claim.release()
            return True
        return False

    def _beat(self, lease: Lease, done: dict[int, dict[str, Any]] | None, force: bool = False) -> None:
        """Heartbeat with progress about every ``heartbeat_seconds``; sets ``stop_reason`` on cancel, a lost
        lease or a worker shutdown."""
        if self.stopping():
            self.stop_reason = "preempted"
            return
        now = time.monotonic()
        if not force and now - self.last_beat < self.settings.heartbeat_seconds:
            return
        if force and now - self.last_beat < min(1.0, self.settings.heartbeat_seconds):
            return
        self.last_beat = now
        done = claims.done_records(self.root) if done is None else done
        try:
            ours, cancel = store.heartbeat(self.db, lease, progress=self._progress(done))
        except Exception as exc:  # DB unreachable: keep going; the reaper decides if it lasts
            log.warning("heartbeat of corpus job %s failed: %s", self.job_id, exc)
            return
        if not ours:
            self.stop_reason = "lease_lost"
        elif cancel:
            self.stop_reason = "cancelled"
        elif len(done) != self.listed:  # readers of a running corpus see its committed chunks as done
            self.listed = len(done)
            self._write_manifest(done, "running")

    def _progress(self, done: dict[int, dict[str, Any]]) -> dict[str, Any]:
        chunks = self.manifest["chunks"]
        total = sum(int(c["items"]) for c in chunks)
        images = sum(int(r["items"]) for r in done.values())
        errors = sum(int(r["errors"]) for r in done.values())
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        rate = (images - self.done_before) / elapsed
        left = total - images
        return {"chunks_done": len(done), "chunks_total": len(chunks), "images": images, "images_total": total,
                "errors": errors, "images_per_second": round(rate, 2),
                "percent": round(100.0 * images / total, 2) if total else 100.0,
                "eta_seconds": round(left / rate, 1) if rate > 0 and left > 0 else (0.0 if left == 0 else None)}

    # --- endings ----------------------------------------------------------------------------------------------
    def _write_manifest(self, done: dict[int, dict[str, Any]], status: str) -> None:
        for chunk in self.manifest["chunks"]:
            record = done.get(int(chunk["index"]))
            if record is not None:
                chunk.update(items=int(record["items"]), errors=int(record["errors"]), status="done")
        self.manifest.update(status=status, images=sum(int(r["items"]) for r in done.values()),
                             errors=sum(int(r["errors"]) for r in done.values()),
                             updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_json(self.root / MANIFEST, self.manifest)

    def _index(self, lease: Lease, done: dict[int, dict[str, Any]]) -> None:
        """Build the corpus's search index (services/corpus/index.py) before the job ends, so the first search of
        a big corpus does not wait for it (1M x 384-d: 75 s). The job keeps its heartbeat while faiss works in a
        thread; an index failure is logged and leaves the job's outcome alone (a search then builds or says how)."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="corpus-index") as pool:
            build = pool.submit(build_corpus_index, self.root)
            while True:
                try:
                    meta = build.result(timeout=max(0.5, self.settings.heartbeat_seconds / 2))
                except FuturesTimeout:
                    self._beat(lease, done)
                    continue
                except Exception as exc:  # noqa: BLE001 (any failure of the build: logged, the job still succeeds)
                    self._log(f"index not built: {type(exc).__name__}: {exc}")
                    return
                self._log(f"index built: {meta['index_type']} over {meta['count']} embeddings in "
                          f"{sum(meta['seconds'].values()):.1f} s")
                return

    def _succeed(self, lease: Lease, done: dict[int, dict[str, Any]]) -> str:
        self._write_manifest(done, "succeeded")
        progress = self._progress(done)
        artifacts = {"corpus": str(self.root), "parts": len(done), "images": progress["images"],
                     "errors": progress["errors"]}
        ok = store.fenced_update(self.db, lease, status="SUCCEEDED", error=None, finished_at=utcnow(),
                                 lease_owner=None, progress=progress, artifacts=artifacts)
        store.end_attempt(self.db, lease, "succeeded" if ok else "lease_lost")
        self._log(f"corpus done: {progress['images']} images ({progress['errors']} undecodable) in "
                  f"{len(done)} parts" if ok else "final commit refused: the lease was lost")
        return "succeeded" if ok else "lease_lost"

    def _stopped(self, lease: Lease, done: dict[int, dict[str, Any]]) -> str:
        reason = self.stop_reason
        if reason == "lease_lost":
            store.end_attempt(self.db, lease, "lease_lost")
            return "lease_lost"
        if reason == "preempted":
            status = store.release_for_retry(self.db, lease, count_failure=False, error=None)
            store.end_attempt(self.db, lease, "preempted")
            if status == "QUEUED":
                self.republish(0.0)
            return "preempted"
        self._write_manifest(done, "cancelled")
        ok = store.fenced_update(self.db, lease, status="CANCELLED", finished_at=utcnow(), lease_owner=None,
                                 progress=self._progress(done))
        store.end_attempt(self.db, lease, "cancelled" if ok else "lease_lost")
        self._log(f"cancelled with {len(done)} of {len(self.manifest['chunks'])} chunks done")
        return "cancelled"

    def _fail(self, lease: Lease, kind: str, message: str, count: bool) -> str:
        error = {"type": kind, "message": message[-2000:]}
        self._log(f"error: {kind}: {message}")
        if count:  # the back-off a trainer's counted failure waits too (services/worker/retry.py)
            job = store.get_job(self.db, self.job_id)
            delay = retry.retry_delay((job.failures if job is not None else 0) + 1,
                                      self.settings.retry_backoff_seconds, self.settings.retry_backoff_max_seconds)
            status = store.release_for_retry(self.db, lease, count_failure=True, error=error, due_in=delay)
            if status == "QUEUED":
                self.republish(delay)
        else:
            ok = store.fenced_update(self.db, lease, status="FAILED", error=error, finished_at=utcnow(),
                                     lease_owner=None)
            status = "FAILED" if ok else "LOST"
        if status == "FAILED" and getattr(self, "manifest", None):
            self._write_manifest(claims.done_records(self.root), "failed")
        store.end_attempt(self.db, lease, kind, message[-2000:])
        return status.lower()

    def _log(self, line: str) -> None:
        log.info("corpus job %s: %s", self.job_id, line)
        try:
            with self.log_path.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        except (OSError, AttributeError):
            pass
