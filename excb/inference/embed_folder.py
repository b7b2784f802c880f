"""``excb embed FOLDER --model BUNDLE --out FILE``: embed a folder offline with the same runtime as the service.

Images are decoded with the same defensive decoder and preprocessed with the same eval transform as the
embed service, then run through the same verified ONNX bundle (``excb.inference.onnx_runtime``), so offline and
served embeddings of one file are identical. Unreadable files are skipped and listed, never fatal.

Output: ``.npy`` -> the float32 matrix [N, D] plus ``<out>.meta.json`` (paths, clusters, skipped files);
``.parquet`` -> one row per image: path, embedding, cluster, similarity, balanced_cluster (needs pyarrow).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from excb.data.decode import ImageDecodeError, load_image
from excb.inference.assign import Assigner
from excb.inference.onnx_runtime import BundleError, OrtEmbedder, load_bundle

FORMATS = ("npy", "parquet")


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, directory symlinks not followed)."""
    from excb.data.datasets import IMAGE_EXTENSIONS  # lazy: excb/cli.py imports this module for ``excb --help``

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(Path(dirpath) / name)
    return found


def _load(path: Path, embedder: OrtEmbedder, max_bytes: int, max_pixels: int) -> np.ndarray | str:
    """Preprocessed image, or the reason it was skipped."""
    try:
        image = load_image(path, max_bytes=max_bytes, max_pixels=max_pixels, min_side=embedder.decode_min_side)
        return embedder.preprocess(image)
    except ImageDecodeError as exc:
        return f"{exc.code}: {exc.message}"


def _batches(paths: Sequence[Path], batch_size: int) -> Iterator[Sequence[Path]]:
    for i in range(0, len(paths), batch_size):
        yield paths[i:i + batch_size]


def embed_folder(folder: str | os.PathLike[str], bundle_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                 *, batch_size: int = 64, normalize: bool = True, providers: Sequence[str] | None = None,
                 threads: int | None = None, max_bytes: int = 20_000_000, max_pixels: int = 40_000_000,
                 progress: bool = True) -> dict[str, Any]:
    """Embed every image under ``folder``; returns a summary (counts, output path, skipped files)."""
    out_path = Path(out)
    fmt = out_path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"out: the file must end in .npy or .parquet, got {out_path.name!r}")
    if batch_size < 1:
        raise ValueError("batch_size: must be >= 1")
    bundle = load_bundle(bundle_dir)
    embedder = OrtEmbedder(bundle, providers, threads)
    assign = Assigner(bundle.sizes)
    paths = list_images(folder)
    kept: list[str] = []
    skipped: list[dict[str, str]] = []
    embs, raw_ids, raw_sims, bal_ids = [], [], [], []
    bar = _progress(len(paths), progress)
    with ThreadPoolExecutor(max_workers=2) as pool:  # decode the next images while ORT runs
        for chunk in _batches(paths, batch_size):
            loaded = list(pool.map(lambda p: _load(p, embedder, max_bytes, max_pixels), chunk))
            good = [(p, x) for p, x in zip(chunk, loaded) if isinstance(x, np.ndarray)]
            skipped += [{"path": str(p), "reason": x} for p, x in zip(chunk, loaded) if isinstance(x, str)]
            if good:
                a = assign(*embedder.run(np.stack([x for _, x in good])), normalize=normalize)
                embs.append(a.embeddings)
                raw_ids.append(a.cluster)
                raw_sims.append(a.similarity)
                bal_ids.append(a.balanced_cluster)
                kept += [str(p) for p, _ in good]
            bar.update(len(chunk))
    bar.close()
    d = bundle.embed_dim
    result = {
        "embeddings": np.concatenate(embs) if embs else np.zeros((0, d), np.float32),
        "cluster": np.concatenate(raw_ids) if raw_ids else np.zeros(0, np.int64),
        "similarity": np.concatenate(raw_sims) if raw_sims else np.zeros(0, np.float32),
        "balanced_cluster": np.concatenate(bal_ids) if bal_ids else np.zeros(0, np.int64),
    }
    meta = {"model_sha256": bundle.sha256, "bundle": str(Path(bundle_dir).resolve()), "embed_dim": d,
            "num_clusters": bundle.num_clusters, "normalized": normalize, "providers": embedder.active_providers}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        _write_npy(out_path, kept, result, skipped, meta)
    else:
        _write_parquet(out_path, kept, result, skipped, meta)
    return {"out": str(out_path), "images": len(kept), "skipped": len(skipped), "skipped_files": skipped,
            "embed_dim": d, "format": fmt}


def _write_npy(out: Path, paths: list[str], r: dict[str, np.ndarray], skipped: list[dict[str, str]],
               meta: dict[str, Any]) -> None:
    np.save(out, r["embeddings"].astype(np.float32))
    side = {**meta, "paths": paths, "cluster": r["cluster"].tolist(), "similarity": r["similarity"].tolist(),
            "balanced_cluster": r["balanced_cluster"].tolist(), "skipped": skipped}
    Path(str(out) + ".meta.json").write_text(json.dumps(side))


def _write_parquet(out: Path, paths: list[str], r: dict[str, np.ndarray], skipped: list[dict[str, str]],
                   meta: dict[str, Any]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pyarrow ships with the services extra
        raise ValueError("out: writing parquet needs pyarrow (pip install pyarrow), or use .npy") from exc
    emb = r["embeddings"].astype(np.float32)
    table = pa.table({
        "path": pa.array(paths, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
        "cluster": pa.array(r["cluster"].astype(np.int32)),
        "similarity": pa.array(r["similarity"].astype(np.float32)),
        "balanced_cluster": pa.array(r["balanced_cluster"].astype(np.int32)),
    })
    table = table.replace_schema_metadata({"excb": json.dumps({**meta, "skipped": skipped})})
    pq.write_table(table, out)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="embed", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# CLI


def register_cli(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``excb embed FOLDER --model BUNDLE --out FILE``."""
    p = subparsers.add_parser("embed", help="embed a folder of images offline (npy/parquet)",
                              description="Embed every image under FOLDER with an exported bundle. Writes FILE.npy "
                                          "(+ FILE.npy.meta.json) or FILE.parquet; unreadable images are skipped.")
    p.add_argument("folder", metavar="FOLDER", help="folder of images (searched recursively)")
    p.add_argument("--model", required=True, metavar="BUNDLE", help="bundle directory (model.onnx + model.json)")
    p.add_argument("--out", required=True, metavar="FILE", help="output file ending in .npy or .parquet")
    p.add_argument("--batch-size", type=int, default=64, help="images per ONNX Runtime run")
    p.add_argument("--no-normalize", action="store_true", help="keep raw (not L2-normalised) embeddings")
    p.add_argument("--providers", help="comma-separated ONNX Runtime providers, e.g. cuda,cpu (default: auto)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: the cores available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_embed)


def _cmd_embed(args: argparse.Namespace) -> int:
    providers = [p for p in (args.providers or "").split(",") if p.strip()] or None
    try:
        summary = embed_folder(args.folder, args.model, args.out, batch_size=args.batch_size,
                               normalize=not args.no_normalize, providers=providers, threads=args.threads,
                               progress=not args.no_progress)
    except (BundleError, FileNotFoundError, ValueError) as exc:
        print(f"excb embed: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped_files"}))
    return 0
