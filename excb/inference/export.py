"""ONNX export of a trained teacher plus a parity check against PyTorch -> a servable bundle.

``export_bundle(run_dir_or_checkpoint, out_dir)`` writes ``model.onnx`` (single file, dynamic batch,
outputs ``embedding`` [N, D] and ``cluster_similarities`` [N, K]) and ``model.json`` (architecture,
input size, mean/std, D, K, the final size estimate ``s``, opset, source, sha256, parity result).

Parity is not optional: ONNX Runtime (CPU) and torch eval are run on *real* images and the bundle is only
marked ``parity.passed`` when every embedding has cosine >= 0.9999 to PyTorch and the top-1 cluster agrees
on >= 99.9% of images. On failure ``model.json`` still records the numbers (for diagnosis) and
:class:`ParityError` is raised; the embed service refuses bundles whose parity did not pass.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from excb.data.decode import load_image
from excb.fileio import atomic_write, sha256_bytes, sha256_file
from excb.inference.onnx_runtime import (
    BUNDLE_FORMAT,
    INPUT_NAME,
    META_FILE,
    MODEL_FILE,
    OUTPUT_NAMES,
    balance_paper,
    check_no_external_data,
    session_options,
)
from excb.version import __version__

# excb.models (and what builds one: the teacher loader, the weights export) is imported where it is used:
# excb/cli.py imports this module to register ``excb export``, and ``excb --help`` should not load torchvision.
if TYPE_CHECKING:  # for annotations only
    from excb.models.model import ExCBModel

log = logging.getLogger("excb.export")

DEFAULT_OPSET = 18
MIN_OPSET = 17
COSINE_THRESHOLD = 0.9999
TOP1_THRESHOLD = 0.999
DEFAULT_PARITY_IMAGES = 256
# The dynamo exporter's optimiser logs every pass at INFO (20-odd lines per export, in every job's log).
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir")


class ParityError(RuntimeError):
    """The exported graph does not reproduce PyTorch closely enough; ``result`` holds the numbers."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


# ---------------------------------------------------------------------------------------------------------
# loading the teacher


def _load_source(source: str | os.PathLike[str]) -> tuple[Any, ExCBModel, np.ndarray, dict[str, Any]]:
    """Run dir or checkpoint -> (cfg, eval-mode teacher, final sizes s, source info)."""
    from excb.training.teacher import load_teacher

    cfg, model, ckpt, ckpt_path = load_teacher(source, "cpu", require=("config", "teacher", "balancer"))
    sizes = ckpt["balancer"]["sizes"].detach().float().cpu().numpy()
    info = {
        "run_dir": str((ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent)
                       .resolve()),
        "checkpoint": str(ckpt_path.resolve()),
        "checkpoint_sha256": sha256_file(ckpt_path),
        "step": int(ckpt.get("step", 0)),
    }
    return cfg, model, sizes, info


# ---------------------------------------------------------------------------------------------------------
# the ONNX graph


@contextlib.contextmanager
def _exporter_logs_at_warning() -> Any:
    """The exporter's third-party loggers at WARNING (or above, when set so) while it runs, as elsewhere
    (README: third-party chatter at WARNING); their levels are put back afterwards."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_onnx(wrapper: nn.Module, size: int, path: Path, opset: int) -> str:
    """Export with the dynamo exporter; fall back to the TorchScript exporter. Returns which one worked."""
    dummy = torch.randn(2, 3, size, size)
    errors: list[str] = []
    try:
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.onnx.export(wrapper, (dummy,), str(path), dynamo=True, opset_version=opset, external_data=False,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_shapes={"x": {0: batch}}, verbose=False)
        return "dynamo"
    except Exception as exc:  # the dynamo exporter still rejects some graphs; the legacy one is the fallback
        errors.append(f"dynamo: {exc}")
        log.warning("dynamo exporter failed (%s); trying the TorchScript exporter", str(exc).splitlines()[0][:200])
    try:
        torch.onnx.export(wrapper, (dummy,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"},
                                        OUTPUT_NAMES[1]: {0: "batch"}})
        return "torchscript"
    except Exception as exc:
        errors.append(f"torchscript: {exc}")
        raise RuntimeError("ONNX export failed: " + " | ".join(errors)) from exc


# ---------------------------------------------------------------------------------------------------------
# parity


def _parity_batch(cfg: Any, parity_images: Sequence[Any] | None, parity_data: str | None,
                  count: int) -> tuple[torch.Tensor, str]:
    """Real images, preprocessed by the eval transform the service uses: [N, 3, S, S] and a description."""
    from excb.data.augment import eval_transform

    a = cfg.augment
    transform = eval_transform(a.global_size, tuple(a.mean), tuple(a.std))
    if parity_images is not None:
        tensors = [transform(load_image(p) if isinstance(p, (str, os.PathLike)) else p.convert("RGB"))
                   for p in parity_images]
        if not tensors:
            raise ValueError("parity_images: no images given")
        return torch.stack(tensors[:count]), f"{len(tensors[:count])} given images"
    from excb.data.datasets import build_dataset

    source = parity_data or cfg.data.source
    dataset = build_dataset(source, split=cfg.data.split if parity_data is None else "all", limit=count,
                            transform=transform, labelled=False)
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    tensors = [it[0] if isinstance(it, (tuple, list)) else it for it in items if it is not None]
    if not tensors:
        raise ValueError(f"parity data {source!r}: no images")
    return torch.stack(tensors), str(source)


def _rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return num / np.maximum(den, 1e-30)


def check_parity(wrapper: nn.Module, onnx_bytes: bytes, images: torch.Tensor, sizes: np.ndarray,
                 batch_size: int = 32) -> dict[str, Any]:
    """Compare torch eval vs ORT CPU on the same inputs; batches of varying size exercise the dynamic axis."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, sess_options=session_options(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        t_emb, t_sim = (o.float().numpy() for o in wrapper(images))
    o_emb_parts, o_sim_parts = [], []
    start = 0
    for n in _batch_sizes(len(images), batch_size):
        e, s = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: images[start:start + n].numpy()})
        o_emb_parts.append(e)
        o_sim_parts.append(s)
        start += n
    o_emb, o_sim = np.concatenate(o_emb_parts), np.concatenate(o_sim_parts)
    cos = _rowwise_cosine(t_emb, o_emb)
    top1 = float((t_sim.argmax(1) == o_sim.argmax(1)).mean())
    btop1 = float((balance_paper(t_sim, sizes).argmax(1) == balance_paper(o_sim, sizes).argmax(1)).mean())
    min_cosine = float(cos.min())
    result: dict[str, Any] = {
        "images": int(len(images)),
        "min_cosine": min_cosine,
        "mean_cosine": float(cos.mean()),
        "top1_agreement": top1,
        "balanced_top1_agreement": btop1,
        "max_abs_diff_embedding": float(np.abs(t_emb - o_emb).max()),
        "max_abs_diff_similarity": float(np.abs(t_sim - o_sim).max()),
        "thresholds": {"min_cosine": COSINE_THRESHOLD, "top1_agreement": TOP1_THRESHOLD},
        "runtime": "onnxruntime CPUExecutionProvider vs torch eval (fp32)",
    }
    result["passed"] = bool(min_cosine >= COSINE_THRESHOLD and top1 >= TOP1_THRESHOLD)
    return result


def _batch_sizes(total: int, batch_size: int) -> list[int]:
    """1 first (the shape most unlike the export dummy), then full batches, then the remainder."""
    out = [1] if total > 0 else []
    left = total - 1
    while left > 0:
        n = min(batch_size, left)
        out.append(n)
        left -= n
    return out


# ---------------------------------------------------------------------------------------------------------
# the bundle


def _versions() -> dict[str, str]:
    import onnx  # lazy: only the export itself needs the ONNX packages, not ``excb --help``
    import onnxruntime

    return {"excb": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def export_bundle(source: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                  parity_images: Sequence[Any] | None = None, *, parity_data: str | None = None,
                  parity_count: int = DEFAULT_PARITY_IMAGES, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Export the teacher of a run (or checkpoint) to ``out_dir``; returns the model.json dict.

    Raises :class:`ParityError` (after writing model.json with ``parity.passed = false``) when the check fails.
    """
    from excb.models import ExportWrapper
    from excb.models.whitening import whitening_meta

    if opset < MIN_OPSET:
        raise ValueError(f"opset: must be >= {MIN_OPSET}, got {opset}")
    if parity_count < 1:
        raise ValueError("parity_count: must be >= 1")
    t0 = time.perf_counter()
    cfg, model, sizes, source_info = _load_source(source)
    wrapper = ExportWrapper(model).eval()
    size = int(cfg.augment.global_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        tmp_model = Path(tmp) / MODEL_FILE
        with _exporter_logs_at_warning():
            exporter = _export_onnx(wrapper, size, tmp_model, opset)
        onnx_bytes = tmp_model.read_bytes()
    check_no_external_data(onnx_bytes, "exported model")
    images, data_desc = _parity_batch(cfg, parity_images, parity_data, parity_count)
    parity = check_parity(wrapper, onnx_bytes, images, sizes)
    parity["data"] = data_desc
    atomic_write(out / MODEL_FILE, onnx_bytes, mode=0o644)
    meta = {
        "format": BUNDLE_FORMAT,
        "arch": json.loads(cfg.model.model_dump_json()),
        "input": {"name": INPUT_NAME, "size": size, "channels": 3, "layout": "NCHW", "dtype": "float32",
                  "mean": list(cfg.augment.mean), "std": list(cfg.augment.std),
                  "transform": "excb.data.augment.eval_transform"},
        "outputs": list(OUTPUT_NAMES),
        "embed_dim": int(wrapper.embed_dim),
        "whitening": whitening_meta(wrapper.whiten),
        "num_clusters": int(wrapper.num_clusters),
        "sizes": [float(v) for v in sizes],
        "balancing": {"method": cfg.balancing.method, "inference_mode": "paper"},
        "opset": opset,
        "exporter": exporter,
        "source": source_info,
        "sha256": sha256_bytes(onnx_bytes),
        "onnx_bytes": len(onnx_bytes),
        "parity": parity,
        "versions": _versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "export_seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write(out / META_FILE, json.dumps(meta, indent=1).encode(), mode=0o644)
    if not parity["passed"]:
        raise ParityError(f"parity check failed: min cosine {parity['min_cosine']:.6f} (need >= {COSINE_THRESHOLD}), "
                          f"top-1 agreement {parity['top1_agreement']:.4f} (need >= {TOP1_THRESHOLD})", parity)
    return meta


# ---------------------------------------------------------------------------------------------------------
# CLI


def register_cli(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``excb export RUN_DIR_OR_CHECKPOINT --out BUNDLE_DIR``."""
    p = subparsers.add_parser("export", help="export a trained teacher to an ONNX bundle (with parity check) "
                                             "or its backbone weights (--format torch)",
                              description="Write BUNDLE_DIR/model.onnx + model.json and verify ONNX Runtime "
                                          "against PyTorch on real images; exits 1 when parity fails.")
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run directory (its latest checkpoint) or a .pt file")
    p.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="directory to write the bundle to (created)")
    p.add_argument("--parity-data", metavar="SOURCE", help="images for the parity check (default: the run's data)")
    p.add_argument("--parity-images", type=int, default=DEFAULT_PARITY_IMAGES, metavar="N",
                   help="images checked for PyTorch vs ONNX Runtime parity")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    p.add_argument("--format", choices=("onnx", "torch"), default="onnx",
                   help="onnx: the servable bundle (default); torch: the teacher's weights for fine-tuning "
                        "(backbone.safetensors, whitening.safetensors when the run whitens, backbone.json); "
                        "excb.models.load_backbone(DIR) gives the served embedding, features='backbone' the backbone")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    if getattr(args, "format", "onnx") == "torch":
        from excb.inference.weights_export import cmd_export_weights

        return cmd_export_weights(args.source, args.out)
    try:
        meta = export_bundle(args.source, args.out, parity_data=args.parity_data, parity_count=args.parity_images,
                             opset=args.opset)
    except ParityError as exc:
        print(f"excb export: {exc}", file=sys.stderr)
        print(json.dumps({"bundle": str(args.out), "parity": exc.result}), file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"excb export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"bundle": str(Path(args.out).resolve()), "sha256": meta["sha256"],
                      "embed_dim": meta["embed_dim"], "num_clusters": meta["num_clusters"],
                      "exporter": meta["exporter"], "parity": meta["parity"]}))
    return 0
