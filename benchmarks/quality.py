"""Representation quality: ExCB vs raw pixels vs the same network randomly initialised.

Studies, each printing a markdown table and a JSON line:

  suite       the default recipe (no preset, fitted to each data set) with a compute budget on every set of
              benchmarks/suite_data.py (Fashion-MNIST, two digit sets, two colour sets), then kNN (k=20) and
              the fast linear probe on ExCB features, raw pixels and a random-init network, plus kNN on the raw
              pixels under the same PCA whitening the served embedding gets (excb.models.whitening); the better of the
              two pixel figures is the baseline the margin is taken against. ``--split val`` (the default) trains
              on the training split without its validation images and scores on them: every tuning choice is
              made there. ``--split test`` trains on the whole training split and scores on the test split: run
              once per committed recipe, and the only figure README and RESULTS headline.

  screen      the default recipe on one suite set for a fixed number of steps (``--steps``), with extra
              overrides: kNN and the fast linear probe on the served embedding, and kNN of the two unwhitened
              embeddings (``final``: the pooled last stage; ``multiscale``) of the same teacher. For comparing recipe
              choices side by side at equal steps; it does not evaluate baselines.

  whiten      trained run directories (``--runs``): kNN and the fast linear probe of the same teacher's served
              embedding without and with the PCA whitening the trainer fits at the end of a run, next to raw
              pixels with and without the same whitening.

  main        one `cpu-small` run with a time (or step) budget, then kNN (k=20, T=0.07; exp-weighted and
              majority vote) on teacher features, raw pixels and a random-init network, evaluated identically.
  robustness  batch 32 vs 256 x balancing excb / dino-centering / none, same budget each: kNN accuracy,
              empty-cluster fraction and effective clusters of the final size estimate and of the last
              epoch's hard assignments.

A time budget is turned into a step budget by timing a short calibration run first, so the lr/EMA
schedules still complete; the steps actually used and the wall time are reported.

  python benchmarks/quality.py suite --budget 10m                 # validation split: for tuning
  python benchmarks/quality.py suite --budget 10m --split test    # once per committed recipe
  python benchmarks/quality.py screen --sets opencv-digits --steps 800 augment.flip_p=0.5
  python benchmarks/quality.py whiten --runs /tmp/suite/runs/suite-icons /tmp/suite/runs/suite-openclipart
  python benchmarks/quality.py main --minutes 25
  python benchmarks/quality.py robustness --images 40000   # same number of training images per run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from excb.config import resolve
from excb.evaluation.metrics import evaluate, evaluate_features, extract_features, raw_pixel_features
from excb.evaluation.runs import baselines, evaluate_model
from excb.evaluation.splits import labelled_splits, model_transform
from excb.method import stats
from excb.training.checkpoint import latest_checkpoint, load_checkpoint
from excb.training.teacher import load_teacher
from excb.training.trainer import train

FASHION_MNIST_TRAIN = 60_000


def _cfg(out: Path, extra: list[str]):
    return resolve(preset_name="cpu-small", overrides=[f"out={out}", "progress=false", *extra])


def _metric_rows(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The run's metrics.jsonl rows of one ``type`` (step, epoch, whitening, ...), in order."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("type") == kind]


def calibrate_steps(out: Path, extra: list[str], minutes: float, probe_steps: int = 12) -> tuple[int, float]:
    """Seconds per step measured on a short run of the same config (k-means excluded)."""
    probe = out.with_name(out.name + "-probe")
    shutil.rmtree(probe, ignore_errors=True)
    cfg = _cfg(probe, [*extra, f"max_steps={probe_steps}", "kmeans.samples=2000"])
    result = train(cfg)
    step_times = [cfg.batch_size / r["img_per_s"] for r in _metric_rows(probe, "step")][2:]
    per_step = sorted(step_times)[len(step_times) // 2]
    shutil.rmtree(probe, ignore_errors=True)
    del result
    return max(int(minutes * 60 / per_step), 10), per_step


def run_one(out: Path, extra: list[str], minutes: float | None, steps: int | None) -> dict[str, Any]:
    """Train once with a budget and return the run's facts (steps, wall time, final balance)."""
    shutil.rmtree(out, ignore_errors=True)
    per_step = None
    if steps is None:
        steps, per_step = calibrate_steps(out, extra, minutes or 1.0)
    t0 = time.time()
    result = train(_cfg(out, [*extra, f"max_steps={steps}"]))
    wall = time.time() - t0
    epochs = _metric_rows(out, "epoch")
    ckpt = load_checkpoint(latest_checkpoint(out))
    sizes = stats.balance_stats(ckpt["balancer"]["sizes"], kind="sizes")
    hard = assignment_stats(ckpt)
    return {"steps": result.steps, "epochs": result.summary["images_seen"] / FASHION_MNIST_TRAIN,
            "train_wall_seconds": wall,
            "calibrated_seconds_per_step": per_step,
            "final_size_effective_clusters": sizes["effective_clusters"],
            "final_size_empty_fraction": sizes["empty_fraction"],
            "last_epoch_empty_fraction": epochs[-1]["empty_clusters"] if epochs else None,
            "last_epoch_effective_clusters": epochs[-1]["epoch_effective_clusters"] if epochs else None,
            "num_clusters": sizes["num_clusters"], **hard}


def assignment_stats(ckpt: dict[str, Any]) -> dict[str, float | None]:
    """Hard teacher assignments counted since the current epoch began (the whole run when it is < 1 epoch)."""
    counts = ckpt["balancer"]["cluster_count"]
    if float(counts.sum()) == 0:
        return {"assign_empty_fraction": None, "assign_effective_clusters": None, "assign_total": 0.0}
    st = stats.balance_stats(counts, kind="counts")
    return {"assign_empty_fraction": st["empty_fraction"], "assign_effective_clusters": st["effective_clusters"],
            "assign_total": st["total"]}


def knn_of_run(out: Path, k: int = 20) -> dict[str, Any]:
    cfg, model, *_ = load_teacher(out, torch.device("cpu"))
    res = evaluate(model.features, *labelled_splits("fashion-mnist", model_transform(cfg)), k=k, batch_size=512)
    return {"knn_acc": res["knn_acc"], "knn_majority_acc": res["knn_majority_acc"]}


def fashion_mnist_baselines(out: Path, extra: list[str], k: int = 20) -> dict[str, Any]:
    """Raw pixels (28x28) and the same architecture (the run's overrides) randomly initialised, same kNN."""
    from torchvision.transforms import v2

    from excb.models import build_model

    raw_tr, raw_te = labelled_splits("fashion-mnist", v2.PILToTensor())
    raw = evaluate_features(*raw_pixel_features(raw_tr), *raw_pixel_features(raw_te), k=k)
    cfg = _cfg(out, extra)
    torch.manual_seed(0)
    model = build_model(cfg, teacher=True).eval()
    rnd = evaluate(model.features, *labelled_splits("fashion-mnist", model_transform(cfg)), k=k, batch_size=512)
    return {"raw_pixels": {"knn_acc": raw["knn_acc"], "knn_majority_acc": raw["knn_majority_acc"]},
            "random_init": {"knn_acc": rnd["knn_acc"], "knn_majority_acc": rnd["knn_majority_acc"]}}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()[0]}


def cmd_main(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out) / "excb-main"
    extra = [*([f"batch_size={args.batch}"] if args.batch else []), *args.overrides]
    batch = args.batch or _cfg(out, extra).batch_size
    run = run_one(out, extra, args.minutes, args.images // batch if args.images else args.steps)
    res = {"study": "main", "machine": machine(), "run": run, "overrides": extra, "excb": knn_of_run(out)}
    rows = [("ExCB (cpu-small)", res["excb"])]
    if not args.no_baselines:
        res.update(fashion_mnist_baselines(out, extra))
        rows += [("raw pixels", res["raw_pixels"]), ("random init", res["random_init"])]
    print(f"\nFashion-MNIST kNN (k=20), {run['steps']} steps, {run['epochs']:.2f} epochs, "
          f"train wall {run['train_wall_seconds'] / 60:.1f} min\n")
    print("| features | kNN exp-weighted (T=0.07) | kNN majority |\n|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {100 * r['knn_acc']:.2f}% | {100 * r['knn_majority_acc']:.2f}% |")
    return res


def cmd_robustness(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for batch in args.batches:
        for method in args.methods:
            out = Path(args.out) / f"b{batch}-{method}"
            extra = [f"batch_size={batch}", f"balancing.method={method}", *args.overrides]
            steps = args.images // batch if args.images else args.steps
            run = run_one(out, extra, args.minutes, steps)
            results.append({"batch": batch, "method": method, **run, **knn_of_run(out)})
            print(json.dumps(results[-1]), flush=True)
    print("\n| batch | balancing | steps | kNN (exp) | kNN (majority) | empty (assignments) | effective clusters "
          "(assignments) | empty (size est.) | effective clusters (size est.) |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        def fmt(v: float | None, p: bool = False) -> str:
            return "–" if v is None else (f"{100 * v:.1f}%" if p else f"{v:.0f}")

        print(f"| {r['batch']} | {r['method']} | {r['steps']} | {100 * r['knn_acc']:.2f}% | "
              f"{100 * r['knn_majority_acc']:.2f}% | {fmt(r['assign_empty_fraction'], True)} | "
              f"{fmt(r['assign_effective_clusters'])} | {fmt(r['final_size_empty_fraction'], True)} | "
              f"{fmt(r['final_size_effective_clusters'])} |")
    return {"study": "robustness", "machine": machine(), "results": results}


def suite_row(name: str, source: str, out: Path, budget: str, extra: list[str], split: str) -> dict[str, Any]:
    """Train the default recipe (no preset) on one suite set, then kNN + linear on ExCB, raw pixels, random init.

    ``source`` is the set's folder for ``split``: with ``val`` it trains on the training split without its
    validation images and scores on them; with ``test`` it trains on the whole training split and scores on
    the test split."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = resolve(overrides=[f"data={source}", f"out={out}", f"budget={budget}", "progress=false", *extra])
    t0 = time.time()
    result = train(cfg)
    wall = time.time() - t0
    run_cfg, model, *_ = load_teacher(out, torch.device("cpu"))
    excb = evaluate_model(model, *labelled_splits(source, model_transform(run_cfg)), k=20, linear=True,
                          batch_size=512)
    base = baselines(run_cfg, source, torch.device("cpu"), k=20, linear=True, batch_size=512)
    recipe = json.loads((out / "recipe.json").read_text())
    whitened = base.get("raw_pixels_whitened", {}).get("knn_acc")
    best = max(base["raw_pixels"]["knn_acc"], whitened if whitened is not None else 0.0)
    return {"name": name, "split": split, "source": source, "images": recipe.get("profile", {}).get("images"),
            "test_images": excb["num_test"], "steps": result.steps, "train_minutes": wall / 60,
            "timing": result.summary.get("timing"),
            "global_size": run_cfg.augment.global_size, "num_clusters": run_cfg.model.num_clusters,
            "batch_size": run_cfg.batch_size, "excb": _scores(excb), "raw_pixels": _scores(base["raw_pixels"]),
            "random_init": _scores(base["random_init"]), "raw_pixels_whitened_knn": whitened,
            "best_pixels_knn": best, "margin_best_pixels": excb["knn_acc"] - best,
            "whitening": _whitening_row(out),
            "final_size_effective_clusters": result.summary["balance"]["effective_clusters"]}


def _whitening_row(out: Path) -> dict[str, Any] | None:
    """The run's ``whitening`` row of metrics.jsonl (images, seconds), or None when it was not fitted."""
    rows = _metric_rows(out, "whitening")
    return rows[-1] if rows else None


def _scores(r: dict[str, Any]) -> dict[str, float]:
    return {"knn": r["knn_acc"], "knn_majority": r["knn_majority_acc"], "linear": r["linear"]["acc"]}


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def suite_table(rows: list[dict[str, Any]]) -> str:
    """One markdown table: per set and split, raw pixels (as they are and whitened; the best of the two is the
    baseline), random init and ExCB (kNN k=20 and the fast linear probe), the margin over the best pixels."""
    lines = ["| data set | split | train / scored images | input px, K, batch | raw pixels kNN / linear | raw pixels "
             "whitened kNN | best pixels kNN | random init kNN / linear | **ExCB kNN** / linear | ExCB - best pixels "
             "(kNN) | steps | train min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pct = _pct
    for r in rows:
        e, raw, rnd = r["excb"], r["raw_pixels"], r["random_init"]
        lines.append(f"| {r['name']} | {r['split']} | {r['images']} / {r['test_images']} | {r['global_size']}, "
                     f"{r['num_clusters']}, {r['batch_size']} | {pct(raw['knn'])} / {pct(raw['linear'])} | "
                     f"{pct(r.get('raw_pixels_whitened_knn'))} | {pct(r['best_pixels_knn'])} | {pct(rnd['knn'])} / "
                     f"{pct(rnd['linear'])} | **{pct(e['knn'])}** / {pct(e['linear'])} | "
                     f"{100 * r['margin_best_pixels']:+.1f} | {r['steps']} | {r['train_minutes']:.1f} |")
    return "\n".join(lines)


SPLIT_TEXT = {"val": "validation split (trained on the training split without its validation images, scored on "
                     "them; every tuning choice is made here)",
              "test": "test split (trained on the whole training split, scored on the test split; run once per "
                      "committed recipe)"}


def cmd_suite(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import suite_data

    names = args.sets or list(suite_data.SUITE)
    rows = []
    for name in names:
        suite_data.prepare(name, args.root)
        source = suite_data.data_source(name, args.root, args.split)
        out = Path(args.out) / f"suite-{name}-{args.split}"
        rows.append(suite_row(name, source, out, args.budget, list(args.overrides), args.split))
        print(json.dumps(rows[-1]), flush=True)
    table = suite_table(rows)
    print(f"\nQuality suite, default recipe (no preset), budget {args.budget} per set, {SPLIT_TEXT[args.split]}; "
          f"kNN k=20 (T=0.07, exp weighting) on the served (whitened) embedding; best pixels = the better of raw "
          f"pixels and raw pixels whitened alike; linear = the fast probe (standardised pre-extracted features, 100 "
          f"epochs) on the embedding before its whitening\n\n{table}\n\nCommand: `{argv_text()}`")
    res = {"study": "suite", "machine": machine(), "budget": args.budget, "split": args.split, "rows": rows,
           "table": table}
    if args.write_results:
        append_results(Path(args.write_results), res, argv_text())
    return res


def cmd_screen(args: argparse.Namespace) -> dict[str, Any]:
    """Fitted recipe + overrides for ``--steps`` steps on each of ``--sets``; one JSON row per set."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import suite_data

    from excb.models.model import feature_and_embedding

    rows = []
    for name in args.sets or ["opencv-digits"]:
        suite_data.prepare(name, args.root)
        source = suite_data.data_source(name, args.root, args.split)
        out = Path(args.out) / f"screen-{name}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        result = train(resolve(overrides=[f"data={source}", f"out={out}", f"max_steps={args.steps or 800}",
                                          "progress=false", *args.overrides]))
        wall = time.time() - t0
        run_cfg, model, *_ = load_teacher(out, torch.device("cpu"))
        splits = labelled_splits(source, model_transform(run_cfg))
        served = evaluate_model(model, *splits, k=20, linear=True, batch_size=512)  # kNN: what the bundle serves
        unwhitened = {kind: evaluate(lambda x, kind=kind, net=model.backbone: feature_and_embedding(net, kind, x)[1],
                                     *splits, k=20, batch_size=512)["knn_acc"] for kind in ("final", "multiscale")}
        rows.append({"name": name, "split": args.split, "steps": result.steps, "overrides": list(args.overrides),
                     "embedding": run_cfg.model.embedding, "whitening": run_cfg.model.whitening,
                     "knn": served["knn_acc"], "linear": served["linear"]["acc"],
                     "knn_unwhitened_by_embedding": unwhitened, "train_minutes": wall / 60})
        print(json.dumps(rows[-1]), flush=True)
    return {"study": "screen", "machine": machine(), "rows": rows}


def _teacher_with_whitening(run: Path) -> tuple[Any, torch.nn.Module, int]:
    """A run's ``(cfg, teacher, step)`` with ``model.whitening=pca`` (a run trained without it gets identity
    buffers to fit)."""
    from excb.models import build_model

    teacher = load_teacher(run, torch.device("cpu"))
    step = int(teacher.checkpoint.get("step", 0))
    if teacher.cfg.model.whitening == "pca":
        return teacher.cfg, teacher.model, step
    cfg = teacher.cfg.model_copy(deep=True)
    cfg.model.whitening = "pca"
    model = build_model(cfg, teacher=True)
    keys = model.load_state_dict(teacher.checkpoint["teacher"], strict=False)
    assert not keys.unexpected_keys and all(k.startswith("whiten.") for k in keys.missing_keys), keys
    return cfg, model.eval(), step


def _knn_by_fit_images(tr: torch.Tensor, ytr: torch.Tensor, te: torch.Tensor, yte: torch.Tensor,
                       sizes: list[int]) -> dict[int, float]:
    """kNN with the whitening fitted on only ``n`` evenly spaced training embeddings, for each ``n`` in ``sizes``:
    how many images a user's data set needs before the whitening helps (the trainer fits on all, up to 10,000)."""
    from excb.data.datasets import evenly_spaced
    from excb.models.whitening import Whitening

    out: dict[int, float] = {}
    for n in sizes:
        if n > tr.shape[0]:
            continue
        white = Whitening.fitted_on(tr[evenly_spaced(tr.shape[0], n)])
        with torch.no_grad():
            out[n] = evaluate_features(white(tr), ytr, white(te), yte, k=20)["knn_acc"]
    return out


def cmd_whiten(args: argparse.Namespace) -> dict[str, Any]:
    """The same trained teachers, served embedding unwhitened vs PCA-whitened as the trainer fits it at the end
    of a run (``excb.evaluation.whitening_fit.fit_model`` on the run's own training images), with the baselines
    whitened too."""
    from excb.evaluation.whitening_fit import fit_images, fit_model

    rows = []
    for run in map(Path, args.runs):
        cfg, model, step = _teacher_with_whitening(run)
        if not model.whiten.fitted:
            fit_model(model, fit_images(cfg), torch.device("cpu"))
        (tr, ytr), (te, yte) = (extract_features(model.unwhitened_features, ds, batch_size=512)
                                for ds in labelled_splits(cfg.data.source, model_transform(cfg)))
        plain = evaluate_features(tr, ytr, te, yte, k=20, linear=True)
        with torch.no_grad():
            white = evaluate_features(model.whiten(tr), ytr, model.whiten(te), yte, k=20, linear=True)
        base = baselines(cfg, cfg.data.source, torch.device("cpu"), k=20, batch_size=512)
        by_size = _knn_by_fit_images(tr, ytr, te, yte, args.fit_images)
        rows.append({"run": str(run), "steps": step, "whitened_on": int(model.whiten.images),
                     "unwhitened": _scores(plain), "whitened": _scores(white), "knn_by_fit_images": by_size,
                     "raw_pixels_knn": base["raw_pixels"]["knn_acc"],
                     "raw_pixels_whitened_knn": base["raw_pixels_whitened"]["knn_acc"],
                     "random_init_whitened_knn": base["random_init"]["knn_acc"]})
        print(json.dumps(rows[-1]), flush=True)
    pct = _pct
    lines = ["| run | steps | kNN unwhitened -> **whitened** | linear unwhitened -> whitened | raw pixels kNN / "
             "whitened | random init (whitened) kNN |", "|---|---|---|---|---|---|"]
    for r in rows:
        u, w = r["unwhitened"], r["whitened"]
        lines.append(f"| {Path(r['run']).name} | {r['steps']} | {pct(u['knn'])} -> **{pct(w['knn'])}** | "
                     f"{pct(u['linear'])} -> {pct(w['linear'])} | {pct(r['raw_pixels_knn'])} / "
                     f"{pct(r['raw_pixels_whitened_knn'])} | {pct(r['random_init_whitened_knn'])} |")
    sizes = sorted({n for r in rows for n in r["knn_by_fit_images"]})
    if sizes:
        lines += ["", "kNN of the served embedding with the whitening fitted on only N training images "
                  "(evenly spaced):", "", "| run | " + " | ".join(f"N={n}" for n in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        lines += [f"| {Path(r['run']).name} | " + " | ".join(
            pct(r["knn_by_fit_images"][n]) if n in r["knn_by_fit_images"] else "" for n in sizes) + " |" for r in rows]
    print("\n".join(lines))
    return {"study": "whiten", "machine": machine(), "rows": rows, "table": "\n".join(lines)}


def argv_text() -> str:
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def append_results(path: Path, res: dict[str, Any], command: str) -> None:
    """Append the suite table to RESULTS.md with the machine, the command and the date."""
    m = res["machine"]
    section = (f"\n### Quality suite, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: default recipe, budget "
               f"{res['budget']} per data set, {res['split']} split\n\nMachine: {m['cpu']}, {m['cores']} cores, torch "
               f"{m['torch']}, {m['threads']} threads, load average at start {m['load_avg_start']:.2f}. Command: "
               f"`{command}`. Scored on the {SPLIT_TEXT[res['split']]}. "
               f"kNN k=20 (T=0.07, exp-weighted) on the served embedding, PCA-whitened as the trainer fits it; "
               f"linear = the fast probe (pre-extracted standardised features, 100 epochs) on the embedding before "
               f"its whitening; raw pixels at the model's input size, as they are and under the same whitening (the "
               f"better of the two is the baseline the margin is taken against); random init = the same fitted "
               f"network, untrained, its whitening fitted alike.\n\n{res['table']}\n")
    with path.open("a") as fh:
        fh.write(section)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=("main", "robustness", "suite", "screen", "whiten"))
    p.add_argument("--runs", nargs="+", default=[], help="whiten: run directories of trained teachers")
    p.add_argument("--fit-images", nargs="*", type=int, default=[],
                   help="whiten: also fit the whitening on only these many training images (e.g. 16 64 256 1024)")
    p.add_argument("--budget", default="10m", help="suite: training budget per data set (600s, 10m, 2h)")
    p.add_argument("--sets", nargs="+", help="suite/screen: only these data sets (suite default: all of "
                   "benchmarks/suite_data.py; screen default: opencv-digits)")
    p.add_argument("--root", default=None, help="suite: where the data sets are prepared (~/.cache/excb/suite)")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="suite/screen: score on the validation split carved from the training split (tuning; the "
                   "default) or on the test split (once per committed recipe, by a fresh run)")
    p.add_argument("--write-results", metavar="RESULTS_MD", help="suite: append the table to this file")
    p.add_argument("--minutes", type=float, default=25.0, help="training budget per run (calibrated to steps)")
    p.add_argument("--steps", type=int, help="fixed step budget instead of --minutes (screen: default 800)")
    p.add_argument("--images", type=int, help="fixed budget in training images (steps = images // batch)")
    p.add_argument("--batch", type=int, help="main: batch size (default: the preset's)")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    p.add_argument("--methods", nargs="+", default=["excb", "dino-centering", "none"])
    p.add_argument("--out", default="runs/benchmarks")
    p.add_argument("--no-baselines", action="store_true", help="main: skip the raw-pixel/random-init rows")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = p.parse_intermixed_args(argv)
    studies = {"main": cmd_main, "robustness": cmd_robustness, "suite": cmd_suite, "screen": cmd_screen,
               "whiten": cmd_whiten}
    res = studies[args.study](args)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
