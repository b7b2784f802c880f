"""`excb up` (embedded control plane + worker + embed service + dashboard) and `excb jobs ...` (client)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.corpus.progress import duration, progress_line

if TYPE_CHECKING:
    from services.api.client import Client

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``up`` and ``jobs`` verbs."""
    _add_up(subparsers)
    _add_jobs(subparsers)


# --- excb up ------------------------------------------------------------------------------------------------

def _add_up(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("up", help="run API + worker + embed service + dashboard on this machine",
                       description="Embedded mode: SQLite and a server-less Celery transport under --home; set "
                                   "EXCB_REDIS_URL / EXCB_DATABASE_URL to use Redis / PostgreSQL instead.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the API, embed routes and dashboard")
    p.add_argument("--home", type=Path, help="state directory (default: EXCB_HOME or ./.excb)")
    p.add_argument("--data-root", type=Path, action="append", default=[],
                   help="folder jobs may read datasets from (repeatable; default: EXCB_DATA_ROOTS)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (one job each)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require this bearer key on the API, embed routes and dashboard (default: EXCB_API_KEY; "
                        "more keys: EXCB_API_KEYS_FILE). Visible in `ps`: prefer EXCB_API_KEY on shared machines")
    p.set_defaults(func=_cmd_up)


def _cmd_up(args: argparse.Namespace) -> int:
    from services.api.embedded import run_embedded

    return run_embedded(host=args.host, port=args.port, home=args.home, data_roots=args.data_root,
                        workers=args.workers, api_key=args.api_key)


# --- excb jobs ----------------------------------------------------------------------------------------------

def _add_jobs(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("jobs", help="submit and manage training jobs on a control plane",
                       description="Talks to EXCB_API_URL (default http://127.0.0.1:8000) with EXCB_API_TOKEN "
                                   "(else EXCB_API_KEY). The same verbs in Python: services.api.client.Client.")
    p.add_argument("--url", help="control-plane URL (default: EXCB_API_URL, else http://127.0.0.1:8000)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    jobs = p.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    s = jobs.add_parser("submit", help="submit a job file (YAML/JSON, the same as `excb train --config`)")
    s.add_argument("file", help="job file: a TrainConfig in YAML or JSON; `-` reads it from stdin")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for excb train")
    s.add_argument("--job-id", help="your id for the job (scoped to your API key; default: made by the server)")
    s.add_argument("--idempotency-key", help="a retried submit with the same key returns the first job")
    s.add_argument("--gpus", type=int, help="GPUs the job needs (default: the server's default)")
    s.add_argument("--follow", action="store_true", help="stream logs until the job ends")
    s.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="a metadata label kept with the job (repeatable; the value is JSON when it parses)")
    s.set_defaults(jobs_func=_jobs_submit)
    ls = jobs.add_parser("list", help="list your jobs, newest first")
    _list_filters(ls)
    ls.set_defaults(jobs_func=_jobs_list)
    st = jobs.add_parser("status", help="show a job; without an id, list jobs as `list` does")
    st.add_argument("job_id", nargs="?", help="the job's id (none: the list)")
    _list_filters(st)
    st.set_defaults(jobs_func=_jobs_status)
    for name, func, text in (("cancel", _jobs_cancel, "cancel a job"),
                             ("retry", _jobs_retry, "retry a failed/cancelled job from its checkpoint"),
                             ("delete", _jobs_delete, "delete a finished job with its run dir (its model stays)"),
                             ("config", _jobs_config, "print the config the job runs with (YAML; --json: JSON)")):
        a = jobs.add_parser(name, help=text)
        a.add_argument("job_id", help="the job's id")
        a.set_defaults(jobs_func=func)
    lg = jobs.add_parser("logs", help="print a job's log")
    lg.add_argument("job_id", help="the job's id")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until the job ends")
    lg.set_defaults(jobs_func=_jobs_logs)
    pl = jobs.add_parser("pull", help="download a finished job's model bundle into --out/<model id>/")
    pl.add_argument("job_id", help="the job's id")
    pl.add_argument("--out", type=Path, default=Path("."), help="directory to save the bundle in (default: .)")
    pl.set_defaults(jobs_func=_jobs_pull)
    p.set_defaults(func=_cmd_jobs)


def _list_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", help="only jobs in these states, comma-separated (QUEUED, RUNNING, SUCCEEDED, ...)")
    p.add_argument("--limit", type=int, default=50, help="at most this many jobs")


def _cmd_jobs(args: argparse.Namespace) -> int:
    from services.api.client import ApiClientError, Client

    with Client(args.url) as client:
        try:
            return int(args.jobs_func(client, args) or 0)
        except ApiClientError as exc:
            print(f"excb: {exc}", file=sys.stderr)
            return 2 if exc.status in (400, 409, 422) else 1


def _job_body(source: str) -> dict[str, Any]:
    """The job file's mapping; ``-``: read from stdin (YAML, of which JSON is a part)."""
    import yaml

    from excb.config import load_file

    if source != "-":
        return dict(load_file(source))
    try:
        body = yaml.safe_load(sys.stdin.read())
    except yaml.YAMLError as exc:
        raise _Usage(f"the job on stdin is not YAML or JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _Usage("the job on stdin must be a mapping (a TrainConfig in YAML or JSON)")
    return body


class _Usage(Exception):
    """A mistake in the command line or its input: one ``excb:`` line, exit 2."""


def _jobs_submit(client: Client, args: argparse.Namespace) -> int:
    try:
        body = _job_body(args.file)
        metadata = _labels(args.meta) if args.meta else None
    except _Usage as exc:
        print(f"excb: {exc}", file=sys.stderr)
        return 2
    job = client.submit(body, args.overrides, job_id=args.job_id, gpus=args.gpus, metadata=metadata,
                        idempotency_key=args.idempotency_key)
    if args.json:
        print(job.model_dump_json())
    else:
        jid = job.id
        print(f"submitted {jid} ({job.status})")
        print(f"  status:  excb jobs status {jid}\n  logs:    excb jobs logs {jid} --follow\n"
              f"  cancel:  excb jobs cancel {jid}")
    return _follow(client, job.id) if args.follow else 0


def _jobs_list(client: Client, args: argparse.Namespace) -> int:
    items = client.list_jobs(args.status, args.limit)
    if args.json:
        print(json.dumps({"items": [j.model_dump(mode="json") for j in items]}))
        return 0
    print(f"{'ID':22} {'STATUS':10} {'ATT':>3} {'STEP':>12} {'%':>6}  CREATED")
    for j in items:
        pr = j.progress
        step = f"{pr.step or 0}/{pr.total_steps or '?'}"
        pct = "" if pr.percent is None else f"{pr.percent:.0f}"
        print(f"{j.id:22} {j.status:10} {j.attempt:>3} {step:>12} {pct:>6}  {j.created_at:%Y-%m-%d %H:%M:%S}Z")
    stuck = next((j.status_detail for j in items if j.status == "QUEUED"
                  and "no live worker" in (j.status_detail or "")), None)
    if stuck:
        print(f"warning: {stuck}", file=sys.stderr)
    return 0


def _jobs_status(client: Client, args: argparse.Namespace) -> int:
    if args.job_id is None:
        return _jobs_list(client, args)
    job = client.status(args.job_id).model_dump(mode="json")
    if args.json:
        print(json.dumps(job))
        return 0
    print("\n".join(status_lines(job)))
    return 0


def _jobs_config(client: Client, args: argparse.Namespace) -> int:
    """The effective config (the run's config.yaml, after the recipe and the budget); until the worker reports
    it, the submitted one, said so on stderr."""
    import yaml

    job = client.status(args.job_id)
    cfg = job.effective
    if cfg is None:
        cfg = job.requested
        print(f"excb: {job.id} has not reported its effective config yet ({job.status}); this is the submitted "
              f"one", file=sys.stderr)
    print(json.dumps(cfg) if args.json else yaml.safe_dump(cfg, sort_keys=False).rstrip())
    return 0


def status_lines(job: dict[str, Any]) -> list[str]:
    """``excb jobs status`` for a person: what is known, never a ``None`` (issue 27 item 5); the config shown is
    the one that runs (``effective``), or the submitted one, labelled so, until the worker reports it."""
    lines = [f"{job['id']}  {job['status']}  attempt {job['attempt']}/{job['max_attempts']}"]
    if job.get("status_detail"):
        lines.append(f"  detail:   {job['status_detail']}")
    lines.append(f"  progress: {_progress_text(job)}")
    lines += _config_lines(job)
    if job["latest_metrics"]:
        lines.append("  metrics:  " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(job["latest_metrics"].items())[:8]))
    if job["balance"]:
        b = job["balance"]
        lines.append(f"  balance:  effective clusters {b.get('effective_clusters', 0):.1f}, "
                     f"normalized entropy {b.get('normalized_entropy', 0):.3f}, max share {b.get('max_share', 0):.4f}")
    if job["model_id"]:
        lines.append(f"  model:    {job['model_id']}")
    if job["error"]:
        lines.append(f"  error:    {job['error']['type']}: {job['error']['message']}")
    if job.get("metadata"):
        lines.append("  metadata: " + json.dumps(job["metadata"], sort_keys=True))
    for a in job.get("attempts") or []:
        ended = a["ended_at"] or "running"
        reason = f" ({a['reason'][:120]})" if a.get("reason") else ""
        lines.append(f"  attempt {a['number']}: {a['outcome'] or 'running'} on {a['worker']}, {a['started_at']} -> "
                     f"{ended}{reason}")
    return lines


def _progress_text(job: dict[str, Any]) -> str:
    pr = job.get("progress") or {}
    if pr.get("chunks_total") is not None or (job.get("requested") or {}).get("kind") == "embed":
        return progress_line(pr, job["status"])
    step, total = pr.get("step"), pr.get("total_steps")
    if step is None and job["status"] in ("QUEUED", "STARTING"):
        return "not started"
    if step is None:
        return "no step logged"
    parts = [f"step {step}/{total}" if total else f"step {step}"]
    if pr.get("percent") is not None:
        parts.append(f"{pr['percent']:.1f}%")
    if pr.get("epoch") is not None:
        parts.append(f"epoch {pr['epoch']:g}")
    if pr.get("eta_seconds") is not None and job["status"] == "RUNNING":
        parts.append(f"eta {duration(pr['eta_seconds'])}")
    return ", ".join(parts)


_TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def _shape(cfg: dict[str, Any]) -> str:
    """K, batch, input size and network of a config tree; the parts it has (an old row may lack some)."""
    model, augment = cfg.get("model") or {}, cfg.get("augment") or {}
    arch = model.get("backbone")
    if arch and str(arch).startswith("resnet") and model.get("width"):
        arch = f"{arch} width {model['width']}"
    parts = [f"K={model['num_clusters']}" if model.get("num_clusters") else None,
             f"batch {cfg['batch_size']}" if cfg.get("batch_size") else None,
             f"{augment['global_size']} px" if augment.get("global_size") else None, arch]
    return ", ".join(str(p) for p in parts if p) or "defaults"


def _config_lines(job: dict[str, Any]) -> list[str]:
    """The run's shape (K, batch, input size, model) from ``effective``; the recipe's reasons and step count."""
    cfg = job.get("effective")
    recipe = job.get("recipe") or {}
    if cfg:
        origin = "as run"
        if recipe.get("fitted"):
            origin += f"; recipe fitted to {recipe.get('data') or 'the data'} on {recipe.get('device') or 'its device'}"
    else:
        cfg = job.get("requested") or job.get("config") or {}
        if cfg.get("recipe") == "auto" and job["status"] not in _TERMINAL:  # the submitted K, batch, size won't run
            return ["  config:   fitted to the data when training starts (recipe=auto); shown here once the worker "
                    "reports it"]
        origin = "as submitted; " + ("the worker did not report what ran" if job["status"] in _TERMINAL
                                     else "the worker reports what runs once the trainer starts")
    lines = [f"  config:   {_shape(cfg)} ({origin})"]
    steps = recipe.get("steps") or {}
    if steps.get("line"):
        lines.append(f"  steps:    {steps['line']}")
    for i, reason in enumerate(recipe.get("reasons") or []):
        lines.append(("  recipe:   " if i == 0 else "            ") + reason)
    return lines


def _labels(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` labels; a value that parses as JSON (numbers, true, lists) is kept typed."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            print(f"excb: --meta {pair!r}: use KEY=VALUE", file=sys.stderr)
            raise SystemExit(2)
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _jobs_cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel(args.job_id)
    print(job.model_dump_json() if args.json else f"{job.id}: {job.status}")
    return 0


def _jobs_retry(client: Client, args: argparse.Namespace) -> int:
    job = client.retry(args.job_id)
    print(job.model_dump_json() if args.json else f"{job.id}: {job.status} (resumes from its last checkpoint)")
    return 0


def _jobs_delete(client: Client, args: argparse.Namespace) -> int:
    client.delete(args.job_id)
    print(json.dumps({"deleted": args.job_id}) if args.json else f"{args.job_id}: deleted")
    return 0


def _jobs_logs(client: Client, args: argparse.Namespace) -> int:
    if args.follow:
        return _follow(client, args.job_id)
    for text in client.logs(args.job_id):
        print(text, end="", flush=True)
    return 0


def _jobs_pull(client: Client, args: argparse.Namespace) -> int:
    target = client.pull(args.job_id, args.out)
    print(json.dumps({"model_dir": str(target)}) if args.json else f"saved {target}")
    return 0


def _follow(client: Client, job_id: str) -> int:
    """Stream the log until the job ends, however long that is (the client reconnects where it left off);
    exit 0 only if it SUCCEEDED."""
    for line in client.logs(job_id, follow=True):
        print(line, flush=True)
    status = client.status(job_id).status
    print(f"{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1
