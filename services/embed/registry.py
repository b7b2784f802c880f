"""The set of servable models: verified bundles by id, a ``latest`` alias, hot swap without failed requests.

Layout: ``MODELS_DIR/<model_id>/{model.onnx, model.json}``. A bundle is served only if its sha256 matches,
it holds no external-data tensors and its export parity check passed (``excb.inference.onnx_runtime.load_bundle``).

Hot swap (reliability.md row 18): a new model is built completely - session, warm-up run, batcher,
monitor - before one pointer changes under a lock. Requests hold a *lease* on the model they started
with (``with registry.use(id) as m``), so a swap never pulls a session from under a running request and
every response is computed and stamped by exactly one model. A replaced model is closed only once its
last lease is released.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from excb.inference.assign import Assigner
from excb.inference.onnx_runtime import META_FILE, Bundle, BundleError, OrtEmbedder, load_bundle
from services.common.active_model import read_active_id
from services.common.auth import CURRENT_PRINCIPAL
from services.common.periodic import Periodic
from services.embed.batcher import MicroBatcher
from services.embed.manifest import ModelRecord, read_manifest
from services.embed.monitor import BalanceMonitor
from services.settings import EmbedSettings

log = logging.getLogger("excb.embed.registry")

LATEST = "latest"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

BatchHookFactory = Callable[[str], Callable[[int, float], None]]


class ModelNotFound(KeyError):
    """No model with this id (or no model at all for ``latest``)."""


def _recorded_sha(bundle_dir: Path) -> str | None:
    try:
        return str(json.loads((bundle_dir / META_FILE).read_text()).get("sha256"))
    except (OSError, ValueError, AttributeError):
        return None


def _caller() -> str | None:
    """The authenticated key of the request being served; None = no tenant filter (auth off, or no request)."""
    principal = CURRENT_PRINCIPAL.get()
    return principal.id if principal is not None else None


def valid_model_id(model_id: str) -> bool:
    return bool(_ID_RE.match(model_id)) and model_id != LATEST


def servable_bundle(bundle_dir: Path, model_id: str, record: ModelRecord | None) -> Bundle:
    """The bundle's verified bytes, or :class:`BundleError` saying why it must not be served: its files and
    hash (``load_bundle``), the control plane's recorded sha256, the export parity check. The registry loads
    through this, and ``POST /v1/models/{id}/activate`` asks it before it points anything at the bundle."""
    bundle = load_bundle(bundle_dir)
    if record is not None and bundle.sha256 != record.sha256:
        raise BundleError(f"{bundle_dir}: model.onnx is {bundle.sha256[:12]}..., the control plane recorded "
                          f"{record.sha256[:12]}... for {model_id}; refusing to serve it")
    parity = bundle.meta.get("parity") or {}
    if parity.get("passed") is not True:
        raise BundleError(f"{bundle_dir}: the export parity check did not pass; refusing to serve it")
    return bundle


@dataclass(eq=False)
class LoadedModel:
    """Everything one served model needs; immutable once published."""

    id: str
    bundle: Bundle
    embedder: OrtEmbedder
    batcher: MicroBatcher
    monitor: BalanceMonitor
    assigner: Assigner
    record: ModelRecord | None = None  # the control plane's record (owner, sharing); None = operator-loaded
    loaded_at: float = field(default_factory=time.time)
    leases: int = 0
    retired: bool = False

    def visible_to(self, caller: str | None) -> bool:
        """Tenancy (issue 13 item 6): with API keys on, a key sees its own, shared and ownerless models."""
        return self.record is None or self.record.visible_to(caller)

    @property
    def version(self) -> str:
        """What every response is stamped with: id plus a prefix of the ONNX sha256."""
        return f"{self.id}@{self.bundle.sha256[:12]}"

    def info(self) -> dict[str, Any]:
        meta = self.bundle.meta
        return {
            "id": self.id,
            "version": self.version,
            "sha256": self.bundle.sha256,
            "bundle_dir": str(self.bundle.path),
            "embed_dim": self.bundle.embed_dim,
            "num_clusters": self.bundle.num_clusters,
            "input": meta.get("input"),
            "arch": (meta.get("arch") or {}).get("backbone"),
            "opset": meta.get("opset"),
            "source": meta.get("source"),
            "parity": {k: (meta.get("parity") or {}).get(k) for k in ("passed", "min_cosine", "top1_agreement")},
            "providers": {"requested": self.embedder.requested_providers, "active": self.embedder.active_providers,
                          "missing_required": self.embedder.missing_providers},
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "queue": {"pending_images": self.batcher.pending, "batches": self.batcher.batches,
                      "images": self.batcher.images, "batch_limit": self.batcher.policy.limit(),
                      **self.batcher.policy.snapshot()},
        }

    def close(self) -> None:
        self.batcher.close(drain=True)


class ModelRegistry:
    """Loaded models by id + the ``latest`` alias. Thread-safe; loading happens outside the lock."""

    def __init__(self, settings: EmbedSettings | None = None, models_dir: Path | None = None,
                 batch_hook: BatchHookFactory | None = None, require_record: bool = False) -> None:
        self.settings = settings or EmbedSettings()
        # Serve bundles found in models_dir only with a control-plane record (also whenever manifest.json exists).
        self.require_record = require_record
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.batch_hook = batch_hook
        self._models: dict[str, LoadedModel] = {}
        self._latest: str | None = None
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()  # one load at a time: loads are heavy, swaps are cheap
        self.errors: dict[str, str] = {}
        self._failed_sha: dict[str, str | None] = {}
        self._unrecorded: set[str] = set()
        self._rescan_thread: Periodic | None = None

    def set_batch_hook(self, factory: BatchHookFactory) -> None:
        """Install the per-batch metrics hook, also on models loaded before the app existed."""
        with self._lock:
            self.batch_hook = factory
            for m in self._models.values():
                m.batcher.on_batch = factory(m.id)

    # -- loading ---------------------------------------------------------------------------------------

    def _build(self, model_id: str, bundle_dir: Path, record: ModelRecord | None) -> LoadedModel:
        bundle = servable_bundle(bundle_dir, model_id, record)
        s = self.settings
        embedder = OrtEmbedder(bundle, s.providers, s.intra_op_threads, s.inter_op_threads)
        if s.warmup:
            embedder.warmup()
        hook = self.batch_hook(model_id) if self.batch_hook else None
        batcher = MicroBatcher(embedder.run, max_batch=s.max_batch, max_delay_ms=s.max_delay_ms,
                               queue_size=s.queue_size, enabled=s.batching, timeout_s=s.request_timeout_seconds,
                               retry_after=s.retry_after_seconds, name=model_id, on_batch=hook,
                               latency_budget_ms=s.batch_budget_ms)
        monitor = BalanceMonitor(bundle.num_clusters, bundle.sizes, s.balance_window)
        return LoadedModel(model_id, bundle, embedder, batcher, monitor, Assigner(bundle.sizes), record)

    def register(self, bundle_dir: str | Path, model_id: str | None = None, activate: bool = True,
                 record: ModelRecord | None = None) -> LoadedModel:
        """Load (verify, build, warm up) a bundle and publish it; replaces a model with the same id.

        ``activate`` points ``latest`` at it. ``record`` (the control plane's sha256 and owner) must match the
        bytes loaded. Raises :class:`BundleError` for an unservable bundle, in which case nothing that is being
        served changes.
        """
        path = Path(bundle_dir)
        model_id = model_id or path.resolve().name
        if not valid_model_id(model_id):
            raise ValueError(f"invalid model id {model_id!r}")
        with self._load_lock:
            try:
                new = self._build(model_id, path, record)
            except Exception as exc:
                self.errors[model_id] = str(exc)
                raise
            self.errors.pop(model_id, None)
            with self._lock:
                old = self._models.get(model_id)
                self._models[model_id] = new
                if activate or self._latest is None:
                    self._latest = model_id
                if old is not None:
                    self._retire(old)
        log.info("model %s registered (%s)", new.version, ", ".join(new.embedder.active_providers))
        return new

    def activate(self, model_id: str) -> LoadedModel:
        """Point ``latest`` at an already loaded model (the cheap half of a hot swap)."""
        with self._lock:
            model = self._models.get(model_id)
            if model is None:
                raise ModelNotFound(model_id)
            self._latest = model_id
            return model

    def unload(self, model_id: str) -> None:
        with self._lock:
            model = self._models.pop(model_id, None)
            if model is None:
                raise ModelNotFound(model_id)
            if self._latest == model_id:
                self._latest = self._newest_id()
            self._retire(model)

    def rescan(self) -> list[str]:
        """Load bundles in ``models_dir`` that are new or changed; returns the ids (re)loaded.

        A directory that fails to load is recorded in :attr:`errors` and skipped; serving continues.
        ``latest`` follows ``models_dir/active.json`` (written atomically by the worker and by
        ``POST /v1/models/{id}/activate``) when it names a loaded bundle; otherwise it moves to the newest
        bundle found (by its ``created_at``) only if nothing is served yet.
        """
        if self.models_dir is None or not self.models_dir.is_dir():
            return []
        records = read_manifest(self.models_dir)
        required = records is not None or self.require_record
        self._refresh_records(records or {})
        loaded: list[str] = []
        for sub in sorted(p for p in self.models_dir.iterdir() if p.is_dir() and (p / META_FILE).is_file()):
            if not valid_model_id(sub.name) or not self._changed(sub):
                continue
            record = (records or {}).get(sub.name)
            if required and record is None:
                self._refuse(sub, "no control-plane record in manifest.json (not registered by a job)")
                continue
            self._unrecorded.discard(sub.name)
            try:
                self.register(sub, sub.name, activate=False, record=record)
                loaded.append(sub.name)
                self._failed_sha.pop(sub.name, None)
            except Exception as exc:  # one bad bundle must not stop the others
                self._failed_sha[sub.name] = _recorded_sha(sub)
                log.warning("skipping bundle %s: %s", sub, exc)
        if loaded:
            with self._lock:
                newest = self._newest_id()
                if newest is not None and (self._latest is None or self._latest not in self._models
                                           or self._latest in loaded):
                    self._latest = newest
        self._follow_active_pointer()
        return loaded

    def _refuse(self, bundle_dir: Path, reason: str) -> None:
        """Log (once) why a bundle in models_dir is not served; it is looked at again on every rescan, so a
        record that arrives later is picked up."""
        if bundle_dir.name not in self._unrecorded:
            log.warning("refusing bundle %s: %s", bundle_dir, reason)
            self._unrecorded.add(bundle_dir.name)
        self.errors[bundle_dir.name] = reason

    def _refresh_records(self, records: dict[str, ModelRecord]) -> None:
        """Sharing and activation times change without the bundle changing: update loaded models in place;
        a model whose recorded hash no longer matches is unloaded."""
        with self._lock:
            for m in list(self._models.values()):
                rec = records.get(m.id)
                if m.record is None or rec is None:
                    continue
                if rec.sha256 != m.bundle.sha256:
                    log.warning("model %s: the control plane's record changed its sha256; unloading it", m.id)
                    self.unload(m.id)
                else:
                    m.record = rec

    def _follow_active_pointer(self) -> None:
        """Point ``latest`` at the model named by ``active.json`` so separate embed replicas switch too."""
        model_id = read_active_id(self.models_dir) if self.models_dir is not None else None
        if model_id is None:
            return
        with self._lock:
            if model_id in self._models and self._latest != model_id:
                log.info("active.json names %s: it is now 'latest'", model_id)
                self._latest = model_id

    def _changed(self, bundle_dir: Path) -> bool:
        """Not loaded yet, or its sha256 differs from the loaded one; a bundle that failed is retried only
        once its sha256 changes (no reload storm on a broken directory)."""
        sha = _recorded_sha(bundle_dir)
        with self._lock:
            current = self._models.get(bundle_dir.name)
        if current is not None:
            return current.bundle.sha256 != sha
        if bundle_dir.name in self._failed_sha:
            return self._failed_sha[bundle_dir.name] != sha
        return True

    def _newest_id(self) -> str | None:
        if not self._models:
            return None
        return max(self._models.values(),
                   key=lambda m: (str(m.bundle.meta.get("created_at", "")), m.loaded_at)).id

    def start_rescan(self, every_s: float) -> None:
        """Poll ``models_dir`` in a daemon thread (new bundles written by the worker appear by themselves)."""
        if every_s <= 0 or self._rescan_thread is not None:
            return
        self._rescan_thread = Periodic("registry-rescan", self.rescan, every_s)
        self._rescan_thread.start()

    # -- serving ---------------------------------------------------------------------------------------

    def resolve_id(self, model_id: str | None) -> str:
        """The served id for ``model_id`` as the current caller sees it; a model the caller may not see is
        :class:`ModelNotFound`, exactly like one that does not exist (no existence oracle across keys)."""
        caller = _caller()
        with self._lock:
            if model_id in (None, "", LATEST):
                return self._default_for(caller)
            model = self._models.get(model_id)
            if model is None or not model.visible_to(caller):
                raise ModelNotFound(model_id)
            return model.id

    def _default_for(self, caller: str | None) -> str:
        """Each key's default: its most recently activated model, else the global latest if it may see it,
        else the newest model it may see. Called under the lock."""
        if caller is None:
            if self._latest is None:
                raise ModelNotFound(LATEST)
            return self._latest
        own = [m for m in self._models.values() if m.record is not None and m.record.owner == caller]
        if own:
            return max(own, key=lambda m: (m.record.activated_at if m.record else 0.0, m.loaded_at)).id
        latest = self._models.get(self._latest) if self._latest else None
        if latest is not None and latest.visible_to(caller):
            return latest.id
        visible = [m for m in self._models.values() if m.visible_to(caller)]
        if not visible:
            raise ModelNotFound(LATEST)
        return max(visible, key=lambda m: (str(m.bundle.meta.get("created_at", "")), m.loaded_at)).id

    def get(self, model_id: str | None = None) -> LoadedModel:
        """The model (no lease: for metadata only)."""
        with self._lock:
            return self._models[self.resolve_id(model_id)]

    @contextlib.contextmanager
    def use(self, model_id: str | None = None) -> Iterator[LoadedModel]:
        """Lease a model for one request: it stays alive until the block exits, even if swapped out."""
        with self._lock:
            model = self._models[self.resolve_id(model_id)]
            model.leases += 1
        try:
            yield model
        finally:
            with self._lock:
                model.leases -= 1
                close_now = model.retired and model.leases == 0
            if close_now:
                model.close()

    def _retire(self, model: LoadedModel) -> None:
        """Called under the lock: close now if idle, else when the last lease ends."""
        model.retired = True
        if model.leases == 0:
            threading.Thread(target=model.close, name=f"close-{model.id}", daemon=True).start()

    @property
    def latest_id(self) -> str | None:
        """The current caller's default model (the global ``latest`` outside a request)."""
        try:
            return self.resolve_id(None)
        except ModelNotFound:
            return None

    def models(self) -> list[LoadedModel]:
        """The loaded models the current caller may see (all of them outside a request)."""
        caller = _caller()
        with self._lock:
            return [m for m in self._models.values() if m.visible_to(caller)]

    def readiness(self) -> tuple[bool, list[str]]:
        """Ready = at least one model, and no required GPU provider silently replaced by CPU."""
        problems: list[str] = []
        models = self.models()
        if not models:
            problems.append("no model loaded" + (f" from {self.models_dir}" if self.models_dir else ""))
        for m in models:
            if m.embedder.missing_providers:
                problems.append(f"model {m.id}: requested {', '.join(m.embedder.missing_providers)} but ONNX Runtime "
                                f"runs on {', '.join(m.embedder.active_providers)}")
        return not problems, problems

    def close(self) -> None:
        if self._rescan_thread is not None:
            self._rescan_thread.stop()
        with self._lock:
            models = list(self._models.values())
            self._models.clear()
            self._latest = None
        for m in models:
            m.close()
