"""``excb serve --model BUNDLE [--host H] [--port P]``: the embed service on its own."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "serve", help="serve embeddings and cluster assignments from ONNX bundles",
        description="Run the embed service alone. Bundles come from --model (repeatable; the last one is "
                    "'latest') and from EXCB_MODELS_DIR / EXCB_HOME/models. Other knobs: EXCB_EMBED__* "
                    "environment variables (max_batch, max_delay_ms, queue_size, providers, ...).")
    p.add_argument("--model", action="append", default=[], metavar="BUNDLE",
                   help="bundle directory (model.onnx + model.json); may be repeated")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port")
    p.add_argument("--models-dir", help="also load every bundle under this directory (default: EXCB_MODELS_DIR)")
    p.add_argument("--data-root", action="append", default=[],
                   help="allow GET /embed?uri= paths under this root (repeatable; default: EXCB_DATA_ROOTS)")
    p.add_argument("--no-batching", action="store_true", help="run each request alone (benchmark baseline)")
    p.add_argument("--max-batch", type=int, help="images per ONNX Runtime run (default: EXCB_EMBED__MAX_BATCH, 32)")
    p.add_argument("--max-delay-ms", type=float,
                   help="how long a lone request waits for company (default: EXCB_EMBED__MAX_DELAY_MS, 5)")
    p.add_argument("--threads", type=int,
                   help="ONNX Runtime intra-op threads "
                        "(default: EXCB_EMBED__INTRA_OP_THREADS, else the cores available)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require this bearer key on /embed and /v1/* (default: EXCB_API_KEY; more keys: "
                        "EXCB_API_KEYS_FILE). Visible in `ps`: prefer EXCB_API_KEY on shared machines")
    p.set_defaults(func=_cmd_serve)


def build_settings(args: argparse.Namespace):  # -> Settings (import kept lazy for a fast `excb --help`)
    from pathlib import Path

    from services.settings import Settings

    base = Settings()
    embed = base.embed.model_copy(update={k: v for k, v in {
        "batching": False if args.no_batching else None,
        "max_batch": args.max_batch, "max_delay_ms": args.max_delay_ms, "intra_op_threads": args.threads,
    }.items() if v is not None})
    update: dict = {"embed": embed}
    if args.models_dir:
        update["models_dir"] = Path(args.models_dir)
    if args.data_root:
        update["data_roots"] = [Path(r) for r in args.data_root]
    if args.api_key:
        from pydantic import SecretStr

        update["api_key"] = SecretStr(args.api_key)
    return base.model_copy(update=update)


def _cmd_serve(args: argparse.Namespace) -> int:
    from services.common.logging import configure_logging

    settings = build_settings(args)
    configure_logging(settings.log_level, settings.log_json)  # before the imports below log anything

    import uvicorn

    from excb.inference.onnx_runtime import BundleError
    from services.embed.app import create_app
    from services.embed.registry import ModelRegistry

    registry = ModelRegistry(settings.embed, settings.resolved_models_dir)
    registry.rescan()
    try:
        for bundle in args.model:
            registry.register(bundle, activate=True)
    except (BundleError, ValueError, FileNotFoundError) as exc:
        print(f"excb serve: {exc}", file=sys.stderr)
        registry.close()
        return 2
    if not registry.models() and settings.embed.rescan_seconds <= 0:
        print("excb serve: no model to serve (give --model BUNDLE, put bundles in the models dir, or set "
              "EXCB_EMBED__RESCAN_SECONDS to start empty and wait for the first bundle)", file=sys.stderr)
        return 2
    # With rescanning on, an empty registry is fine: /readyz answers 503 until the first bundle appears,
    # so containers started before the first export wait instead of crash-looping.
    registry.start_rescan(settings.embed.rescan_seconds)
    app = create_app(settings, registry)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=settings.log_level.lower(),
                    timeout_graceful_shutdown=10)
    finally:
        registry.close()
    return 0
