"""``excb corpus embed|status``: corpus embedding jobs through the control plane (like ``excb jobs submit``), or
``--local`` in this process; ``index|search|dedup|subset`` come from cli_curate.py."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from services.corpus.cli_curate import add_commands


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser("corpus", help="embed a whole data source into Parquet parts (a corpus job)",
                              description="Embed every image of a folder, list:FILE or shards:DIR with a model: "
                                          "a job on the control plane split into chunks over all workers, or "
                                          "--local in this process. Output: manifest.json + parts/*.parquet.")
    sub = p.add_subparsers(dest="corpus_cmd", required=True)
    e = sub.add_parser("embed", help="start a corpus job (or run it here with --local)")
    e.add_argument("source", metavar="SOURCE", help="folder, list:FILE or shards:DIR (under the server's data roots)")
    e.add_argument("--model", help="model id on the control plane (required unless --local)")
    e.add_argument("--chunk-size", type=int, default=1000, help="images per chunk (a shard is one chunk)")
    e.add_argument("--batch-size", type=int, default=64, help="images per ONNX Runtime run")
    e.add_argument("--name", help="job name")
    e.add_argument("--wait", action="store_true", help="print progress until the job ends")
    e.add_argument("--local", action="store_true", help="embed in this process (needs --bundle and --out)")
    e.add_argument("--bundle", help="--local: bundle directory (model.onnx + model.json)")
    e.add_argument("--out", help="--local: corpus directory to write (re-running resumes)")
    e.set_defaults(func=_cmd_embed)
    s = sub.add_parser("status", help="a corpus job's progress")
    s.add_argument("job_id", help="the corpus embedding job's id (POST /v1/jobs kind=embed)")
    s.add_argument("--json", action="store_true", help="the job as JSON")
    s.set_defaults(func=_cmd_status)
    add_commands(sub)  # index, search, dedup, subset (services/corpus/cli_curate.py)


def _cmd_embed(args: argparse.Namespace) -> int:
    if args.local:
        return _embed_local(args)
    if not args.model:
        print("excb corpus embed: --model is required (or --local --bundle DIR --out DIR)", file=sys.stderr)
        return 2
    from services.api.client import ApiClientError, Client

    body: dict[str, Any] = {"kind": "embed", "model": args.model, "source": args.source,
                            "chunk_size": args.chunk_size, "batch_size": args.batch_size}
    try:
        with Client() as client:
            job = client.submit(body, name=args.name)
            print(f"{job.id}  {job.status}")
            return _follow(client, job.id) if args.wait else 0
    except ApiClientError as exc:
        print(f"excb corpus embed: {exc}", file=sys.stderr)
        return 2


def _follow(client: Any, job_id: str) -> int:
    from services.corpus.progress import progress_line

    last = ""
    while True:
        job = client.status(job_id)
        line = f"{job.status}  {progress_line(job.progress.model_dump(), job.status)}"
        if line != last:
            print(line, flush=True)
            last = line
        if job.status in ("SUCCEEDED", "FAILED", "CANCELLED"):
            if job.error:
                print(f"error: {job.error.type}: {job.error.message}", file=sys.stderr)
            return 0 if job.status == "SUCCEEDED" else 1
        time.sleep(2)


def _cmd_status(args: argparse.Namespace) -> int:
    from services.api.client import ApiClientError, Client
    from services.corpus.progress import progress_line

    try:
        with Client() as client:
            job = client.status(args.job_id)
    except ApiClientError as exc:
        print(f"excb corpus status: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(job.model_dump_json())
        return 0
    print(f"{job.id}  {job.status}  {progress_line(job.progress.model_dump(), job.status)}")
    if job.artifacts.get("corpus"):
        print(f"  corpus: {job.artifacts['corpus']}")
    if job.error:
        print(f"  error:  {job.error.type}: {job.error.message}")
    return 0


def _embed_local(args: argparse.Namespace) -> int:
    from excb.inference.onnx_runtime import BundleError
    from services.corpus.local import embed_local
    from services.corpus.progress import progress_line

    if not args.bundle or not args.out:
        print("excb corpus embed --local: needs --bundle DIR and --out DIR", file=sys.stderr)
        return 2
    try:
        manifest = embed_local(args.source, args.bundle, args.out, chunk_size=args.chunk_size,
                               batch_size=args.batch_size,
                               report=lambda p: print(progress_line(p, "RUNNING"), file=sys.stderr, flush=True))
    except (BundleError, OSError, ValueError) as exc:
        print(f"excb corpus embed: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: manifest.get(k) for k in ("source", "images", "errors", "embed_dim", "status")}
                     | {"parts": len(manifest["chunks"]), "out": args.out}))
    return 0
