"""The GPU suite's quality stage: the default recipe on one labelled set, trained on the device, exported, scored.

It answers what a GPU buys in representation quality, the way `benchmarks/quality.py suite --split test` scores it
on the CPU: the fitted default recipe (no preset; what ``excb train data=FOLDER out=DIR budget=3m`` does) trained
on ``--device``, exported to the ONNX bundle (``excb export``), then kNN (k=20) of the served embedding as ONNX
Runtime computes it on the test split, against the best pixel baseline (the better of raw pixels and PCA-whitened
raw pixels, ``excb.evaluation.runs.baselines``, as the CPU suite takes it). The set travels with the tree as one
committed file (``benchmarks/data/opencv-digits.npz``, the suite's prepared split: 4,000 train / 1,000 test grey
20x20 digits), unpacked into PNG folders here, so the device machine needs neither the network nor opencv-doc.
The same set's 10-minute CPU figure is read from ``benchmarks/data/quality_cpu.json`` and printed beside it.

    python benchmarks/quality_gpu.py pack                     # here, once: the prepared suite folder -> the .npz
    python benchmarks/quality_gpu.py run --work DIR --device cuda --budget 3m --json-out R.json      # GPU suite
    python benchmarks/quality_gpu.py run --work DIR --device cpu --max-steps 4 --train-per-class 20 \\
        --test-per-class 10 --json-out R.json                                                        # --check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SET_NAME = "opencv-digits"
PACK = HERE / "data" / f"{SET_NAME}.npz"
CPU_FIGURES = HERE / "data" / "quality_cpu.json"
SPLITS = ("train", "test")
K = 20


# --------------------------------------------------------------------------------------------- the data file
def pack(folder: Path, dest: Path) -> dict[str, int]:
    """A prepared suite folder (``ROOT/NAME/{train,test}/CLASS/cellNNNNN.png``) -> one compressed .npz of uint8
    images, labels and cell numbers per split: a few hundred kB that the device tool carries in the tree."""
    from PIL import Image

    arrays: dict[str, Any] = {}
    for split in SPLITS:
        paths = sorted((folder / split).glob("*/*.png"), key=lambda p: (int(p.parent.name), p.name))
        if not paths:
            raise FileNotFoundError(f"{folder / split}: no PNGs (python benchmarks/suite_data.py prepare --only "
                                    f"{SET_NAME})")
        arrays[f"{split}_images"] = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.uint8) for p in paths])
        arrays[f"{split}_labels"] = np.array([int(p.parent.name) for p in paths], dtype=np.uint8)
        arrays[f"{split}_ids"] = np.array([int(p.stem.removeprefix("cell")) for p in paths], dtype=np.uint16)
    dest.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dest, **arrays)
    return {split: int(arrays[f"{split}_labels"].shape[0]) for split in SPLITS}


def _take_per_class(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices of the first ``per_class`` images of each class (all when None): a small stratified subset."""
    if per_class is None:
        return np.arange(labels.shape[0])
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))


def unpack(src: Path, dest: Path, train_per_class: int | None = None,
           test_per_class: int | None = None) -> dict[str, int]:
    """The .npz -> ``dest/{train,test}/CLASS/cellNNNNN.png``, the layout ``suite_data.prepare`` writes (and the
    loader reads); optionally only the first N images of each class."""
    from PIL import Image

    counts = {}
    with np.load(src) as data:
        for split, per_class in zip(SPLITS, (train_per_class, test_per_class)):
            labels = data[f"{split}_labels"]
            keep = _take_per_class(labels, per_class)
            for i in keep:
                cls_dir = dest / split / str(int(labels[i]))
                cls_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(data[f"{split}_images"][i]).save(
                    cls_dir / f"cell{int(data[f'{split}_ids'][i]):05d}.png")
            counts[split] = int(keep.shape[0])
    return counts


def cpu_figure(path: Path, name: str = SET_NAME, split: str = "test") -> dict[str, Any] | None:
    """The set's recorded CPU figure (``knn`` as a fraction, with its budget, machine and command), or None while
    nobody has recorded one: the report then says so instead of showing a number."""
    if not path.exists():
        return None
    entry = json.loads(path.read_text()).get(name, {}).get(split)
    return entry if entry and entry.get("knn") is not None else None


# ------------------------------------------------------------------------------------------ train, export, score
def train_default_recipe(folder: Path, out: Path, device: str, budget: str | None,
                         max_steps: int | None) -> dict[str, Any]:
    """``excb train data=FOLDER out=OUT device=DEVICE budget=B`` in this process (``max_steps`` instead of a
    budget for --check: a budget times real steps first, which a check run must not wait for)."""
    from excb.config import resolve
    from excb.training.trainer import train

    length = [f"budget={budget}"] if budget else [f"max_steps={max_steps}"]
    cfg = resolve(overrides=[f"data={folder}", f"out={out}", f"device={device}", "progress=false", *length])
    t0 = time.perf_counter()
    result = train(cfg)
    return {"steps": int(result.steps), "train_seconds": round(time.perf_counter() - t0, 1)}


def served_embeddings(bundle: Path, folder: Path, split: str, threads: int) -> tuple[Any, Any]:
    """Every image of ``split`` through the bundle as the service runs it (its preprocessing, ONNX Runtime on the
    CPU): the embedding a user gets back, as float tensors with their labels."""
    import torch

    from excb.data.datasets import build_dataset
    from excb.inference.onnx_runtime import OrtEmbedder, load_bundle

    emb = OrtEmbedder(load_bundle(bundle), ["cpu"], intra_op_threads=threads)
    ds = build_dataset(str(folder), split=split, labelled=True)
    size = emb.bundle.input_size
    feats, labels = [], []
    for start in range(0, len(ds), 256):
        items = [ds[i] for i in range(start, min(start + 256, len(ds)))]
        batch = np.empty((len(items), 3, size, size), dtype=np.float32)
        for j, (image, _) in enumerate(items):
            emb.preprocess(image.convert("RGB"), out=batch[j])
        feats.append(emb.run(batch)[0])
        labels += [int(label) for _, label in items]
    return torch.from_numpy(np.concatenate(feats)), torch.tensor(labels)


def best_pixels(base: dict[str, Any]) -> float:
    """The pixel baseline the CPU suite takes its margin against: raw pixels or raw pixels whitened, the better."""
    whitened = base.get("raw_pixels_whitened", {}).get("knn_acc")
    return max(base["raw_pixels"]["knn_acc"], whitened if whitened is not None else 0.0)


def run(pack_file: Path, work: Path, device: str, budget: str | None, max_steps: int | None,
        train_per_class: int | None, test_per_class: int | None, threads: int, cpu_figures: Path) -> dict[str, Any]:
    """Unpack, train, export, score; a pure function of its arguments (the result row of the suite's record)."""
    import torch

    from excb.evaluation.metrics import evaluate_features
    from excb.evaluation.runs import baselines, evaluate_model
    from excb.evaluation.splits import labelled_splits, model_transform
    from excb.inference.export import export_bundle
    from excb.training.teacher import load_teacher

    folder, out, bundle = work / SET_NAME, work / f"run-{SET_NAME}", work / f"bundle-{SET_NAME}"
    counts = unpack(pack_file, folder, train_per_class, test_per_class)
    trained = train_default_recipe(folder, out, device, budget, max_steps)
    t0 = time.perf_counter()
    meta = export_bundle(out, bundle)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    (tr, ytr), (te, yte) = (served_embeddings(bundle, folder, split, threads) for split in SPLITS)
    onnx = evaluate_features(tr, ytr, te, yte, k=K)
    dev = torch.device(device)
    run_cfg, model, *_ = load_teacher(out, dev)
    teacher = evaluate_model(model, *labelled_splits(str(folder), model_transform(run_cfg)), k=K, batch_size=512,
                             device=dev)
    base = baselines(run_cfg, str(folder), dev, k=K, batch_size=512)
    best = best_pixels(base)
    return {"benchmark": "quality_gpu", "set": SET_NAME, "split": "test", "device": device,
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
            "budget": budget, "max_steps": max_steps, "train_images": counts["train"],
            "test_images": counts["test"], **trained, "export_seconds": round(export_s, 1),
            "eval_seconds": round(time.perf_counter() - t0, 1),
            "recipe": {"global_size": run_cfg.augment.global_size, "num_clusters": run_cfg.model.num_clusters,
                       "batch_size": run_cfg.batch_size, "backbone": run_cfg.model.backbone},
            "parity": {k: meta["parity"][k] for k in ("passed", "min_cosine", "top1_agreement")},
            "excb_onnx_knn": onnx["knn_acc"], "excb_torch_knn": teacher["knn_acc"],
            "raw_pixels_knn": base["raw_pixels"]["knn_acc"],
            "raw_pixels_whitened_knn": base.get("raw_pixels_whitened", {}).get("knn_acc"),
            "random_init_knn": base["random_init"]["knn_acc"], "best_pixels_knn": best,
            "margin_best_pixels": onnx["knn_acc"] - best, "cpu_figure": cpu_figure(cpu_figures)}


def summary(res: dict[str, Any]) -> str:
    """One line a person reads in the suite log; the report's table is gpu_suite.py's."""
    cpu = res.get("cpu_figure")
    cpu_text = (f"CPU figure ({cpu.get('budget')}): {100 * cpu['knn']:.1f}%" if cpu else "CPU figure: not recorded")
    return (f"{res['set']} {res['split']}, {res['device']}, {res['steps']} steps in {res['train_seconds']:.0f} s: "
            f"ExCB kNN (ONNX) {100 * res['excb_onnx_knn']:.1f}% vs best pixels {100 * res['best_pixels_knn']:.1f}% "
            f"({100 * res['margin_best_pixels']:+.1f}); {cpu_text}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("pack", help="the prepared suite folder -> the committed .npz")
    k.add_argument("--root", type=Path, default=Path("~/.cache/excb/suite").expanduser())
    k.add_argument("--out", type=Path, default=PACK)
    r = sub.add_parser("run", help="unpack, train, export, score; the last stdout line is the JSON result")
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    length = r.add_mutually_exclusive_group(required=True)
    length.add_argument("--budget", help="training budget as excb train takes it (3m)")
    length.add_argument("--max-steps", type=int, help="a fixed step count instead (--check)")
    r.add_argument("--train-per-class", type=int, help="only the first N training images of each class")
    r.add_argument("--test-per-class", type=int, help="only the first N test images of each class")
    r.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="ONNX Runtime threads")
    r.add_argument("--pack", type=Path, default=PACK)
    r.add_argument("--cpu-figures", type=Path, default=CPU_FIGURES)
    r.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        counts = pack(args.root / SET_NAME, args.out)
        print(f"{args.out}: {counts}, {args.out.stat().st_size} bytes")
        return 0
    res = run(args.pack, args.work, args.device, args.budget, args.max_steps, args.train_per_class,
              args.test_per_class, args.threads, args.cpu_figures)
    print(summary(res))
    line = json.dumps(res)
    if args.json_out:
        args.json_out.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
