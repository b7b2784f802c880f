"""``excb index build SOURCE --model ID``: build (or atomically rebuild) a model's image index.

SOURCE names data exactly as a job's ``data.source`` does (``services.common.paths.resolve_source``): a folder,
``list:FILE`` or ``shards:DIR`` relative to a data root (``--data-root``, else ``EXCB_DATA_ROOTS``; with neither,
the current directory is the one root) or absolute inside one, or a built-in data set (``digits``,
``fashion-mnist``). The model is looked up by id in the models directory (``--models-dir``, else ``--home``/models,
else ``EXCB_MODELS_DIR`` / ``EXCB_HOME/models``, as ``excb up --home``), where the index is written too
(``.indexes/ID/NAME``).
The worker runs the same command as a child process after every successful job (services/index/jobs.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from services.index.build import DEFAULT_SAMPLE, MAX_SAMPLE

    p = subparsers.add_parser("index", help="image index of a model: cluster gallery and similar-image search",
                              description="Build the image index that POST /v1/search and the dashboard's cluster "
                                          "gallery read.")
    sub = p.add_subparsers(dest="index_command", metavar="COMMAND")
    sub.required = True
    b = sub.add_parser("build", help="embed a sample of SOURCE with the model and index it",
                       description=f"Embed up to --sample images of SOURCE (a uniform sample drawn with --seed; "
                                   f"default {DEFAULT_SAMPLE}, at most {MAX_SAMPLE}) and write the index next to "
                                   f"the model, replacing the previous one atomically.")
    b.add_argument("source", metavar="SOURCE", help="as a job's data.source: a folder (or list:FILE, shards:DIR) "
                                                    "relative to a data root, digits or fashion-mnist")
    b.add_argument("--model", required=True, metavar="ID", help="model id (a directory of the models dir)")
    b.add_argument("--name", default="default", help="index name (several indexes per model; default 'default')")
    b.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, help="at most this many images")
    b.add_argument("--seed", type=int, default=0, help="seed of the sample")
    b.add_argument("--split", default="all", choices=["train", "test", "all"], help="which split of a labelled source")
    b.add_argument("--limit", type=int, help="the first N images of the source only (as a job's data.limit)")
    b.add_argument("--home", type=Path, help="state directory, as `excb up --home` (default: EXCB_HOME or ./.excb)")
    b.add_argument("--models-dir", help="default: HOME/models (EXCB_MODELS_DIR)")
    b.add_argument("--data-root", action="append", default=[],
                   help="data root SOURCE is resolved in (repeatable; default: EXCB_DATA_ROOTS, else the current "
                        "directory)")
    b.add_argument("--origin", default="folder", help=argparse.SUPPRESS)
    b.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    b.set_defaults(func=_cmd_build)


def _cmd_build(args: argparse.Namespace) -> int:
    from excb.inference.onnx_runtime import BundleError
    from services.common.paths import PathNotAllowed, resolve_source
    from services.index.build import build_index
    from services.index.store import index_root, valid_name, write_status
    from services.settings import Settings

    settings = Settings(home=args.home) if args.home else Settings()
    models_dir = Path(args.models_dir).expanduser().resolve() if args.models_dir else settings.resolved_models_dir
    roots = [Path(r) for r in args.data_root] or list(settings.data_roots) or [Path.cwd()]
    if not valid_name(args.name):
        print("excb index: --name must be 1-64 characters of [A-Za-z0-9._-]", file=sys.stderr)
        return 2
    bundle = models_dir / args.model
    if not (bundle / "model.json").is_file():
        print(f"excb index: no model {args.model!r} in {models_dir}", file=sys.stderr)
        return 2
    try:
        source = resolve_source(args.source, roots, field="source")
    except PathNotAllowed as exc:
        print(f"excb index: {exc}", file=sys.stderr)
        return 2
    root = index_root(models_dir, args.model, args.name)
    write_status(root, "running", source=args.source)
    try:
        meta = build_index(bundle, source, root, model_id=args.model, split=args.split, limit=args.limit,
                           sample=args.sample, seed=args.seed, threads=args.threads, origin=args.origin)
    except (BundleError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        write_status(root, "failed", source=args.source, error=str(exc))
        print(f"excb index: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:  # a crash or Ctrl-C: never leave "running" behind (it blocks new builds)
        write_status(root, "failed", source=args.source, error=f"{type(exc).__name__}: {exc}")
        raise
    print(json.dumps({k: meta[k] for k in ("model_id", "count", "skipped", "sample_cap", "seed", "index_type",
                                           "seconds")}))
    return 0
