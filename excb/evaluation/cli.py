"""``excb eval RUN_DIR_OR_CHECKPOINT``: kNN (and optionally a linear probe and the baselines) of a run's teacher."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _cmd_eval(args: argparse.Namespace) -> int:
    # lazy: excb/cli.py imports this module to register the verb, and ``excb --help`` (every verb) should not
    # load torchvision with excb.models
    from excb.distributed import resolve_device
    from excb.evaluation.linear_reference import reference_linear_probe
    from excb.evaluation.runs import baselines, evaluate_model
    from excb.evaluation.splits import holdout_note, labelled_splits, model_transform
    from excb.training.teacher import load_teacher

    try:
        device = resolve_device(args.device)
        teacher = load_teacher(args.source, device)
        cfg, model, info = teacher.cfg, teacher.model, teacher.info
        data = args.data or cfg.data.source
        k = args.k if args.k is not None else cfg.eval.knn_k
        train_limit = args.train_limit if args.train_limit is not None else cfg.eval.train_limit
        test_limit = args.test_limit if args.test_limit is not None else cfg.eval.test_limit
        args.train_limit, args.test_limit = train_limit, test_limit
        train_ds, test_ds = labelled_splits(data, model_transform(cfg), train_limit, test_limit)
        fast_linear = args.linear and args.protocol == "fast"
        result = evaluate_model(model, train_ds, test_ds, k=k, temperature=args.temperature,
                                linear=fast_linear, batch_size=args.batch_size, device=device,
                                progress=not args.json and sys.stderr.isatty())
        if args.linear and args.protocol == "reference":
            result["linear"] = reference_linear_probe(model, cfg, data, device, epochs=args.linear_epochs,
                                                      train_limit=train_limit, test_limit=test_limit)
        result.update(info, data=data, backbone=cfg.model.backbone, holdout=holdout_note(test_ds))
        if args.baselines:
            result["baselines"] = baselines(cfg, data, device, k, args.temperature, fast_linear, train_limit,
                                            test_limit, args.batch_size)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"excb eval: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else _format(result))
    return 0


def _format_one(name: str, r: dict[str, Any]) -> str:
    line = (f"{name:<12} kNN k={r['k']} T={r['temperature']}: {100 * r['knn_acc']:.2f}% (exp), "
            f"{100 * r['knn_majority_acc']:.2f}% (majority)")
    if "linear" in r:
        line += f"; linear probe ({r['linear'].get('protocol', 'fast')}) {100 * r['linear']['acc']:.2f}%"
    return line


def _format(result: dict[str, Any]) -> str:
    lines = [f"checkpoint {result['checkpoint']} (step {result['step']}), data {result['data']}: "
             f"{result['num_train']} train / {result['num_test']} test, {result['feature_dim']}-d features",
             _format_one("teacher", result)]
    held = result.get("holdout")
    if held:
        lines.insert(1, f"no train/test split in the data: {held['test']} of {held['of']} images "
                        f"({100 * held['fraction']:.0f}% per class, seed {held['seed']}) held out as the test split")
    for name, r in result.get("baselines", {}).items():
        lines.append(_format_one(name, r))
    return "\n".join(lines)


def register_cli(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``excb eval RUN_DIR_OR_CHECKPOINT``: kNN (and optionally a linear probe) on the teacher backbone."""
    p = subparsers.add_parser(
        "eval", help="kNN / linear-probe evaluation of a trained teacher",
        description="Extract teacher backbone features (eval transform of the run) for the train and test "
                    "splits of a labelled data set and report kNN accuracy (DINO exp(sim/T) weighting and "
                    "majority vote), optionally a linear probe and the raw-pixel / random-init baselines.")
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run directory (its latest checkpoint) or a .pt file")
    p.add_argument("--data", metavar="SOURCE", help="labelled data set (default: the run's data.source)")
    p.add_argument("--k", type=int, default=None, help="neighbours (default: the run's eval.knn_k, 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote weight exp(cos/T), as DINO")
    p.add_argument("--linear", action="store_true", help="also train a linear probe (100 epochs)")
    p.add_argument("--protocol", choices=("fast", "reference"), default="fast",
                   help="linear probe: fast = one head on pre-extracted standardised features (seconds; the "
                        "default for small runs); reference = augmented images through the frozen teacher every "
                        "epoch, lr 0.3 @ 256 (ResNet) / last-4 CLS (ViT), wd 0, as the authors' code (method.md "
                        "§8.2); baselines are only probed with the fast protocol")
    p.add_argument("--linear-epochs", type=int, default=100, help="epochs of the reference protocol")
    p.add_argument("--baselines", action="store_true", help="also evaluate raw pixels and a random-init network")
    p.add_argument("--train-limit", type=int, default=None, metavar="N", help="use only the first N train images")
    p.add_argument("--test-limit", type=int, default=None, metavar="N", help="use only the first N test images")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = CUDA when available")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_eval)
