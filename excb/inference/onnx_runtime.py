"""Exported bundles and the ONNX Runtime session that runs them (shared by ``excb embed`` and the service).

A bundle is a directory with ``model.onnx`` and ``model.json``. Loading it is the trust boundary
(reliability.md rows 17-18): the ONNX bytes are read once, hashed and compared with the sha256 recorded
at export, any tensor stored as external data is refused (single-file models only, so no ``location``
can point outside the bundle), and the session is built from those same verified bytes. Providers are
tried in a fixed order (TensorRT, CUDA, CPU); what ORT actually activated is reported so a silent GPU->CPU
fallback is visible to readiness checks.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from excb.fileio import sha256_bytes
from excb.inference.assign import l2_normalize  # noqa: F401 - re-exported: callers import them from here

if TYPE_CHECKING:
    from excb.inference.eval_pixels import EvalPixels

MODEL_FILE = "model.onnx"
META_FILE = "model.json"
BUNDLE_FORMAT = "excb-bundle/1"
INPUT_NAME = "image"
OUTPUT_NAMES = ("embedding", "cluster_similarities")
DRAFT_MARGIN = 4  # a JPEG is decoded at no less than this many times the model's input size

# The order in which execution providers are tried when none are configured explicitly.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
                           "MIGraphXExecutionProvider", "DmlExecutionProvider"})
_PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider", "gpu": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider", "rocm": "ROCMExecutionProvider",
}


class BundleError(ValueError):
    """A bundle that must not be served: missing files, bad metadata, hash mismatch, external data."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: metadata plus the exact ONNX bytes whose hash was checked."""

    path: Path
    meta: dict[str, Any]
    onnx_bytes: bytes = field(repr=False)

    @property
    def sha256(self) -> str:
        return str(self.meta["sha256"])

    @property
    def input_size(self) -> int:
        return int(self.meta["input"]["size"])

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    @property
    def num_clusters(self) -> int:
        return int(self.meta["num_clusters"])

    @functools.cached_property
    def sizes(self) -> np.ndarray:
        """The final cluster-size estimate ``s`` [K] from training (used for balanced assignment)."""
        return np.asarray(self.meta["sizes"], dtype=np.float32)


_REQUIRED_META = ("sha256", "input", "embed_dim", "num_clusters", "sizes", "opset")


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: {META_FILE} is missing") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: {META_FILE} is unreadable: {exc}") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: {META_FILE} must hold an object")
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise BundleError(f"{path}: {META_FILE} lacks {', '.join(missing)}")
    if len(meta["sizes"]) != int(meta["num_clusters"]):
        raise BundleError(f"{path}: sizes has {len(meta['sizes'])} entries, num_clusters is {meta['num_clusters']}")
    return meta


def check_no_external_data(onnx_bytes: bytes, where: str = "model") -> None:
    """Refuse any initializer/attribute tensor whose data lives in an external file (CVE-2024-27318 class)."""
    import onnx

    try:
        model = onnx.load_model_from_string(onnx_bytes)  # never resolves external files
    except Exception as exc:  # onnx raises DecodeError and friends for garbage
        raise BundleError(f"{where}: not a valid ONNX model: {exc}") from exc
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise BundleError(f"{where}: tensor {tensor.name!r} uses external data ({location!r}); "
                              "only single-file models are served")


def _all_tensors(graph: Any) -> Iterable[Any]:
    """Initializers and tensor attributes, recursing into subgraphs (If/Loop/Scan bodies)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def load_bundle(path: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Read and verify a bundle directory; raises :class:`BundleError` for anything unservable.

    The hash is computed over the bytes that will be handed to ONNX Runtime, so a file swapped after the
    check cannot be loaded instead (no time-of-check/time-of-use gap).
    """
    p = Path(path)
    if not p.is_dir():
        raise BundleError(f"{p}: not a bundle directory")
    meta = _read_meta(p)
    model_path = p / MODEL_FILE
    if model_path.is_symlink():
        raise BundleError(f"{p}: {MODEL_FILE} is a symlink")
    try:
        data = model_path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{p}: cannot read {MODEL_FILE}: {exc}") from exc
    if verify:
        actual = sha256_bytes(data)
        if actual != meta["sha256"]:
            raise BundleError(f"{p}: sha256 mismatch (model.json says {str(meta['sha256'])[:12]}..., "
                              f"{MODEL_FILE} is {actual[:12]}...)")
        check_no_external_data(data, str(model_path))
    return Bundle(path=p, meta=meta, onnx_bytes=data)


# ---------------------------------------------------------------------------------------------------------
# providers and threads


def normalize_provider(name: str) -> str:
    """``cuda`` -> ``CUDAExecutionProvider``; full names pass through."""
    return _PROVIDER_ALIASES.get(name.strip().lower(), name.strip())


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(requested: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Resolve the provider list: ``(to_try, required_gpu)``.

    ``requested`` empty/None means "auto": every provider of :data:`PROVIDER_ORDER` that this ORT build
    has, and nothing is required. An explicit list is tried in the given order (CPU appended as the last
    resort); GPU providers in it are *required*: if ORT does not activate them, readiness fails.
    """
    available = set(available_providers())
    if not requested:
        return [p for p in PROVIDER_ORDER if p in available], []
    names = [normalize_provider(r) for r in requested]
    to_try = [n for n in names if n in available]
    if "CPUExecutionProvider" not in to_try:
        to_try.append("CPUExecutionProvider")
    required = [n for n in names if n in GPU_PROVIDERS]
    return to_try, required


def default_intra_op_threads(workers: int = 1) -> int:
    """Cores given to this process divided by the sessions sharing them (oversubscription hurts ORT)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


def session_options(intra_op_threads: int | None = None, inter_op_threads: int = 1) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads or default_intra_op_threads()
    opts.inter_op_num_threads = max(1, inter_op_threads)
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only; fallbacks are reported through active_providers
    # No busy-waiting between runs: in a server the same cores decode images and speak HTTP, and a spinning
    # pool steals them (measured: it halves torch/decoder throughput on a 2-core box).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


# ---------------------------------------------------------------------------------------------------------
# the embedder


class OrtEmbedder:
    """One ORT session over a verified bundle: ``run(x) -> (embedding [N, D], cosines [N, K])``.

    ``InferenceSession.run`` is thread-safe, so one embedder can serve a micro-batcher thread and
    ad-hoc callers at once.
    """

    def __init__(self, bundle: Bundle, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None, inter_op_threads: int = 1) -> None:
        import onnxruntime as ort

        self.bundle = bundle
        self.requested_providers, self.required_providers = choose_providers(providers)
        self.intra_op_threads = intra_op_threads or default_intra_op_threads()
        self.inter_op_threads = inter_op_threads
        self.session = ort.InferenceSession(bundle.onnx_bytes,
                                            sess_options=session_options(self.intra_op_threads, inter_op_threads),
                                            providers=self.requested_providers)
        self.active_providers: list[str] = list(self.session.get_providers())
        self._preprocess: EvalPixels | None = None

    @property
    def missing_providers(self) -> list[str]:
        """Required GPU providers that ORT did not activate (a silent fallback to CPU)."""
        return [p for p in self.required_providers if p not in self.active_providers]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run a preprocessed float32 batch [N, 3, S, S]."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        size = self.bundle.input_size
        if x.ndim != 4 or x.shape[1:] != (3, size, size):
            raise ValueError(f"expected a batch [N, 3, {size}, {size}], got {list(x.shape)}")
        emb, sims = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return emb, sims

    @property
    def decode_min_side(self) -> int:
        """The short side a JPEG may be decoded down to before :meth:`preprocess` (``decode_image(min_side=)``).

        Four times the input size: on real photos the served embedding then stays at cosine 0.9997 on average
        to a full decode, against 0.997 at twice (RESULTS.md, "JPEG draft decoding")."""
        return DRAFT_MARGIN * self.bundle.input_size

    def preprocess(self, image: Any, out: np.ndarray | None = None) -> np.ndarray:
        """PIL RGB image -> float32 [3, S, S] with the training eval transform (the pixels export parity saw),
        written into ``out`` (e.g. one slot of a batch) when given."""
        if self._preprocess is None:
            self._preprocess = preprocessor(self.bundle.meta)
        return self._preprocess(image, out)

    def warmup(self) -> None:
        """Preprocess one image and run one forward pass, so the first request pays no lazy initialisation
        (torch's resize kernel, ORT kernel setup)."""
        from PIL import Image

        x = self.preprocess(Image.new("RGB", (self.bundle.input_size + 3, self.bundle.input_size + 5)))
        self.run(x[None])


def preprocessor(meta: dict[str, Any]) -> "EvalPixels":
    """The eval transform recorded in the bundle, returning NumPy: ``excb.inference.eval_pixels`` gives the pixels of
    torchvision's ``EvalTransform`` bit for bit (the model sees exactly what parity saw) without its per-image
    dispatch cost; ``fn(image, out=batch[i])`` writes straight into a batch."""
    from excb.inference.eval_pixels import EvalPixels

    inp = meta["input"]
    return EvalPixels(int(inp["size"]), tuple(inp["mean"]), tuple(inp["std"]))


# ---------------------------------------------------------------------------------------------------------
# post-processing (the service and `excb embed` use excb.inference.assign; this torch form serves export parity)


def balance_paper(z: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``excb.method.balancing.balance(z, s, mode="paper")`` on NumPy arrays: serving assigns with the training formula.

    The views share memory. ``excb.inference.assign.Assigner`` gives the same values in NumPy (per-request path).
    """
    import torch

    from excb.method.balancing import balance

    z_t = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
    s_t = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32))
    return balance(z_t, s_t, mode="paper").numpy()
