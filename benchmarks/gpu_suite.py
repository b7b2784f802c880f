"""Bookkeeping for ``benchmarks/gpu_suite.sh``: the environment probe, each stage's verdict, and the report.

The shell script runs the stages (each under ``timeout``); this file turns exit codes, junit XML and the
benchmarks' JSON into one ``suite.json`` and a markdown table for benchmarks/RESULTS.md. It imports neither
torch nor excb at module level, so a stage that broke the environment still gets reported.

    python benchmarks/gpu_suite.py env --work DIR
    python benchmarks/gpu_suite.py record --work DIR --stage NAME --rc RC --seconds S --limit L [--junit F] [--result F]
                                          [--budget-skip --why TEXT]
    python benchmarks/gpu_suite.py report --work DIR --out OUT
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

# What the GPU machine may lack (KINDS.md): each is probed, none is required by the training stages.
OPTIONAL_MODULES = ("pydantic", "pydantic_settings", "yaml", "tqdm", "sklearn", "onnx", "onnxscript", "onnxruntime",
                    "fastapi", "starlette", "uvicorn", "celery", "kombu", "sqlalchemy", "alembic", "redis",
                    "multipart", "httpx", "orjson", "prometheus_client", "pyarrow", "pytest", "pytest_timeout")
# performance.md: the reference ExCB step on an H200 (img/s), and the bar the tuned step must clear.
ANCHORS = {("resnet50", 64): 576.0, ("resnet50", 128): 643.0, ("vit_small", 64): 614.0, ("vit_small", 128): 792.0}
ANCHOR_TARGET = 1.6
E2E_TARGET = 0.85
TIMEOUT_CODES = (124, 137)
SKIP_CODE = 77  # a stage script's "not applicable here" (automake's convention)


# ------------------------------------------------------------------------------------------- environment
def probe_env() -> dict[str, Any]:
    """Versions, the GPU, ORT providers and which optional modules import: the first thing to read on failure."""
    mods: dict[str, str | None] = {}
    for name in OPTIONAL_MODULES:
        try:
            mod = importlib.import_module(name)
            mods[name] = str(getattr(mod, "__version__", "ok"))
        except Exception as exc:  # noqa: BLE001 - any import failure means "missing" here
            mods[name] = None if isinstance(exc, ImportError) else f"error: {exc}"[:120]
    info: dict[str, Any] = {"python": sys.version.split()[0], "modules": mods,
                            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import torch
        import torchvision

        info.update({"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "cuda": torch.cuda.is_available(), "cuda_version": torch.version.cuda,
                     "nccl": torch.distributed.is_nccl_available() if torch.distributed.is_available() else False})
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except Exception as exc:  # noqa: BLE001
        info.update({"torch": f"error: {exc}"[:200], "cuda": False})
    try:
        import onnxruntime

        info["ort_providers"] = onnxruntime.get_available_providers()
    except Exception:  # noqa: BLE001
        info["ort_providers"] = []
    return info


# ------------------------------------------------------------------------------------------------ verdicts
def junit_verdict(path: Path) -> tuple[str, str, dict[str, int]]:
    """pytest's junit XML -> (status, why, counts). All skipped is a skip, never a pass."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    reasons = sorted({(sk.get("message") or "").strip()[:80] for sk in root.iter("skipped")})
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["passed"] = passed
    summary = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    if failed:
        return "fail", f"{summary}: {', '.join(failed)[:300]}", counts
    if counts["tests"] == 0:
        return "fail", "no tests collected", counts
    if passed == 0:
        return "skip", f"{summary} ({'; '.join(reasons)})", counts
    return "pass", summary + (f" (skips: {'; '.join(reasons)})" if counts["skipped"] else ""), counts


def verdict(rc: int, limit: float, log_tail: str) -> tuple[str, str]:
    """Exit code -> (status, why)."""
    if rc == 0:
        return "pass", ""
    if rc in TIMEOUT_CODES:
        return "fail", f"timed out after {limit:.0f} s"
    last = next((ln.strip() for ln in reversed(log_tail.splitlines()) if ln.strip()), "")
    if rc == SKIP_CODE:
        return "skip", last[:200]
    return "fail", f"exit {rc}: {last[:200]}"


def record(work: Path, stage: str, rc: int, seconds: float, limit: float, junit: Path | None, result: Path | None,
           log: Path | None, why: str | None, mode: str, budget_skip: bool = False) -> dict[str, Any]:
    """Append one stage's row to ``stages.jsonl``; ``budget_skip`` marks a stage the suite's budget left out, so
    the report can name the command that runs it in the device time left."""
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    status, reason = verdict(rc, limit, tail)
    row: dict[str, Any] = {"stage": stage, "mode": mode, "rc": rc, "seconds": round(seconds, 1), "limit": limit}
    if junit is not None and junit.exists() and rc not in TIMEOUT_CODES:
        status, reason, row["tests"] = junit_verdict(junit)
    if why:
        reason = why if not reason else f"{why}; {reason}"
    if result is not None and result.exists() and status != "skip":
        try:
            row["result"] = json.loads(result.read_text().strip().splitlines()[-1])
        except (ValueError, IndexError):
            row["result_text"] = result.read_text()[-6000:]
    row.update(status=status, why=reason)
    if budget_skip:
        row["budget_skip"] = True
    with (work / "stages.jsonl").open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


# -------------------------------------------------------------------------------------------------- report
def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}" if x >= 10 else f"{x:.3f}"


def _train_lines(rows: list[dict[str, Any]], check: bool) -> list[str]:
    out = ["| backbone | batch | K | crops | tuned img/s | naive img/s | tuned/naive | tuned / H200 reference anchor "
           f"(target >= {ANCHOR_TARGET}x) | tuned peak | naive peak |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        anchor = ANCHORS.get((r["backbone"], r["batch"]))
        vs = "n/a (check run)" if check else ("no anchor" if anchor is None else
                                              f"{r['tuned_img_s'] / anchor:.2f}x of {anchor:.0f}")
        peak = [("n/a" if m is None else f"{m / 1024:.1f} GiB")
                for m in (r.get("tuned_peak_mib"), r.get("naive_peak_mib"))]
        out.append(f"| {r['backbone']} | {r['batch']} | {r['num_clusters']} | {r['crops']} | {_fmt(r['tuned_img_s'])} "
                   f"| {_fmt(r['naive_img_s'])} | {r['ratio']:.2f}x | {vs} | {peak[0]} | {peak[1]} |")
    return out


def _data_lines(result: dict[str, Any], label: str) -> list[str]:
    out = []
    mc, e2e = result.get("multicrop"), result.get("end_to_end")
    if mc:
        out.append(f"- {label}: decode + multi-crop, device path {_fmt(mc['device_img_s'])} img/s "
                   f"vs CPU (PIL, one core) {_fmt(mc['cpu_img_s'])} img/s ({mc['ratio']:.1f}x)")
    if e2e:
        out.append(f"- {label}: end to end (batch {e2e['preset_batch']}, gpu_augment={e2e['gpu_augment']}, loader "
                   f"{e2e['loader']}): real {_fmt(e2e['real_img_s'])} img/s "
                   f"vs synthetic {_fmt(e2e['synthetic_img_s'])} img/s = {e2e['real_over_synthetic']:.0%} "
                   f"(target >= {E2E_TARGET:.0%} on a GPU)")
    return out


def _serving_lines(result: dict[str, Any]) -> list[str]:
    info = result["info"]
    out = [f"- bundle {info['backbone']} {info['size']} px, K = {info['clusters']}, export {info['export_seconds']} s, "
           f"parity passed: {info['parity']['passed']} (min cosine {info['parity']['min_cosine']:.6f}); ORT providers "
           f"{info['ort_providers']} on {info['ort_threads']} threads (CPU build: no CUDA ORT wheel fits the 64 MiB "
           "carried to the GPU machine)", "", "| engine | batch | img/s |", "|---|---|---|"]
    out += [f"| {r['engine']} | {r['batch']} | {_fmt(r['img_s'])} |" for r in result["rows"]]
    return out


def _quality_lines(res: dict[str, Any]) -> list[str]:
    """quality_gpu.py's row: the GPU-trained teacher's served (ONNX) kNN beside the pixels and the CPU figure."""
    cpu = res.get("cpu_figure")
    cpu_text = (f"{_pct(cpu['knn'])} ({cpu.get('budget')}, {cpu.get('date')}, {cpu.get('machine')})" if cpu
                else "CPU figure: not recorded")
    rec = res["recipe"]
    length = f"budget {res['budget']}" if res.get("budget") else f"max_steps={res['max_steps']}"
    return [f"- {res['set']} {res['split']} split, {res['train_images']} train / {res['test_images']} scored images; "
            f"default recipe ({rec['backbone']}, {rec['global_size']} px, K = {rec['num_clusters']}, batch "
            f"{rec['batch_size']}) on {res['device']}{' (' + res['gpu'] + ')' if res.get('gpu') else ''}, "
            f"{length}: {res['steps']} steps in {res['train_seconds']:.0f} s; export {res['export_seconds']:.0f} s, "
            f"parity passed: {res['parity']['passed']}", "",
            "| ExCB kNN, ONNX (served) | ExCB kNN, torch teacher | raw pixels | raw pixels whitened | best pixels | "
            "ExCB - best pixels | random init | same set, 10-minute CPU run |", "|---|---|---|---|---|---|---|---|",
            f"| **{_pct(res['excb_onnx_knn'])}** | {_pct(res['excb_torch_knn'])} | {_pct(res['raw_pixels_knn'])} | "
            f"{_pct(res.get('raw_pixels_whitened_knn'))} | {_pct(res['best_pixels_knn'])} | "
            f"{100 * res['margin_best_pixels']:+.1f} | {_pct(res['random_init_knn'])} | {cpu_text} |"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def rerun_line(rows: list[dict[str, Any]]) -> str | None:
    """The command that runs the stages the budget left out (None when none was): the lease's second call."""
    skipped = [r for r in rows if r.get("budget_skip")]
    if not skipped:
        return None
    check = " --check" if any(r["mode"] == "check" for r in skipped) else ""
    return f"bash benchmarks/gpu_suite.sh{check} --stages {','.join(r['stage'] for r in skipped)}"


def markdown(env: dict[str, Any], rows: list[dict[str, Any]], command: str) -> str:
    """The section to paste into RESULTS.md: machine line, stage table, then each stage's figures."""
    check = any(r["mode"] == "check" for r in rows)
    gpu = env.get("gpu") or "no GPU (CPU check run: code paths only, no timings)"
    head = (f"### GPU suite, {env.get('date')}: {gpu}"
            f"; torch {env.get('torch')}, CUDA {env.get('cuda_version')}, Python {env.get('python')}")
    missing = [m for m, v in env.get("modules", {}).items() if v is None]
    lines = [head, "", f"Command: `{command}`. Modules missing: {', '.join(missing) or 'none'}; ORT providers: "
             f"{env.get('ort_providers')}.", "", "| stage | mode | status | seconds (limit) | notes |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['mode']} | {r['status'].upper()} | {r['seconds']:.0f} ({r['limit']:.0f}) "
                     f"| {r['why'].replace('|', '/')[:300]} |")
    for r in rows:
        res = r.get("result")
        if not res:
            if r.get("result_text"):
                lines += ["", f"**{r['stage']}**", "", r["result_text"].strip()]
            continue
        note = " (check run: shapes are tiny, figures are not timings)" if check else ""
        lines += ["", f"**{r['stage']}**" + note, ""]
        if res.get("benchmark") == "train_throughput":
            lines += _train_lines(res["rows"], check)
        elif res.get("benchmark") == "serving_gpu":
            lines += _serving_lines(res)
        elif res.get("benchmark") == "quality_gpu":
            lines += _quality_lines(res)
        elif "multicrop" in res or "end_to_end" in res:
            lines += _data_lines(res, r["stage"])
        else:
            lines.append("```\n" + json.dumps(res)[:2000] + "\n```")
    rerun = rerun_line(rows)
    if rerun:
        lines += ["", f"Left out for the budget; run them in the device time left: `{rerun}`."]
    return "\n".join(lines) + "\n"


def report(work: Path, out: Path, command: str) -> int:
    """Write suite.json + suite.md to ``out`` and print the summary; exit 1 if any stage failed."""
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").exists() else {}
    rows = [json.loads(ln) for ln in (work / "stages.jsonl").read_text().splitlines() if ln.strip()] \
        if (work / "stages.jsonl").exists() else []
    text = markdown(env, rows, command)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps({"env": env, "stages": rows, "command": command}, indent=1) + "\n")
    (out / "suite.md").write_text(text)
    print(text)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "skip")}
    print(f"GPU suite: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped; "
          f"results in {out}/suite.md and {out}/suite.json")
    return 1 if counts["fail"] else 0


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("--work", type=Path, required=True)
    r = sub.add_parser("record")
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--stage", required=True)
    r.add_argument("--rc", type=int, required=True)
    r.add_argument("--seconds", type=float, required=True)
    r.add_argument("--limit", type=float, required=True)
    r.add_argument("--mode", default="gpu")
    r.add_argument("--junit", type=Path)
    r.add_argument("--result", type=Path)
    r.add_argument("--log", type=Path)
    r.add_argument("--why")
    r.add_argument("--budget-skip", action="store_true", help="the suite's budget left this stage out")
    o = sub.add_parser("report")
    o.add_argument("--work", type=Path, required=True)
    o.add_argument("--out", type=Path, required=True)
    o.add_argument("--command", default="bash benchmarks/gpu_suite.sh")
    args = p.parse_args(argv)
    if args.cmd == "env":
        info = probe_env()
        (args.work / "env.json").write_text(json.dumps(info, indent=1) + "\n")
        print(f"torch {info.get('torch')}, cuda {info.get('cuda')} {info.get('gpu', '')}; missing: "
              f"{', '.join(m for m, v in info['modules'].items() if v is None) or 'none'}; ORT {info['ort_providers']}")
        return 0
    if args.cmd == "record":
        row = record(args.work, args.stage, args.rc, args.seconds, args.limit, args.junit, args.result, args.log,
                     args.why, args.mode, args.budget_skip)
        print(f"== {row['stage']}: {row['status'].upper()} in {row['seconds']:.0f} s {row['why']}")
        return 0
    return report(args.work, args.out, args.command)


if __name__ == "__main__":
    raise SystemExit(main())
