"""Readers for what tests/deploy checks statically: Kubernetes manifests as YAML documents, Dockerfiles as stages
(what each installs, copies, sets and runs), the EXCB_* variables every place sets, and whether a container's
command exists in its image and its arguments parse with the real CLIs."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Iterator

import yaml

from support import HANG_GUARD_S
from support import REPO_ROOT as ROOT

DEPLOY = ROOT / "deploy"


def raw_manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def yaml_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def all_docs(rendered: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, docs in rendered.items():
        for d in docs:
            yield name, d
    for f in raw_manifest_files():
        for d in yaml_docs(f.read_text()):
            yield str(f.relative_to(ROOT)), d


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        return [doc["spec"]["template"]["spec"]]
    if kind == "PyTorchJob":
        return [r["template"]["spec"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    return []


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for spec in pod_specs(doc) for c in spec.get("initContainers", []) + spec["containers"]]


def by_kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


# --- helpers: Dockerfiles ---------------------------------------------------------------------------------

class Stage:
    """One ``FROM ... AS name`` block: what it installs, copies, sets and runs (parents resolved on demand)."""

    def __init__(self, name: str, base: str) -> None:
        self.name, self.base = name, base
        self.copies: list[tuple[list[str], str, bool]] = []  # (sources, dest, from_other_stage)
        self.env: dict[str, str] = {}
        self.runs: list[str] = []
        self.user: str | None = None
        self.entrypoint: list[str] | None = None
        self.cmd: list[str] | None = None
        self.healthcheck: list[str] | None = None  # [] = HEALTHCHECK NONE


def _instructions(path: Path) -> Iterator[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                         if not line.lstrip().startswith("#")))
    for line in text.splitlines():
        if line.strip():
            op, _, rest = line.strip().partition(" ")
            yield op.upper(), rest.strip()


def parse_dockerfile(path: Path) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    cur: Stage | None = None
    for op, rest in _instructions(path):
        if op == "FROM":
            parts = rest.split()
            cur = Stage(parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else f"#{len(stages)}", parts[0])
            stages[cur.name] = cur
        elif cur is None:
            continue
        elif op == "COPY":
            words = shlex.split(rest)
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            cur.copies.append((paths[:-1], paths[-1], any(f.startswith("--from") for f in flags)))
        elif op == "ENV":
            for word in shlex.split(rest):
                k, _, v = word.partition("=")
                cur.env[k] = v
        elif op == "RUN":
            cur.runs.append(rest)
        elif op == "USER":
            cur.user = rest
        elif op == "ENTRYPOINT":
            cur.entrypoint = json.loads(rest)
        elif op == "CMD":
            cur.cmd = json.loads(rest)
        elif op == "HEALTHCHECK":
            cur.healthcheck = [] if rest.upper() == "NONE" else json.loads(rest[rest.index("CMD") + 3:])
    return stages


def chain(stages: dict[str, Stage], target: str) -> list[Stage]:
    """The target and the stages it is built FROM, nearest first."""
    out = []
    name: str | None = target
    while name in stages:
        out.append(stages[name])
        name = stages[name].base
    return out


def files_in_image(stages: dict[str, Stage], target: str) -> set[str]:
    return {dest for st in chain(stages, target) for _, dest, _ in st.copies}


def apt_packages(stages: dict[str, Stage], target: str) -> set[str]:
    pkgs: set[str] = set()
    for st in chain(stages, target):
        for run in st.runs:
            for m in re.finditer(r"apt-get install ([^&;]+)", run):
                pkgs |= {w for w in m.group(1).split() if not w.startswith("-")}
    return pkgs


def image_builds(compose: dict[str, Any]) -> dict[str, tuple[Path, str]]:
    """Image name (no tag) -> (Dockerfile, target), as compose builds them; the manifests use the same names."""
    builds = {}
    for svc in compose["services"].values():
        if "build" in svc:
            b = svc["build"]
            builds[svc["image"].rsplit(":", 1)[0]] = (Path(b["context"]) / b["dockerfile"], b["target"])
    return builds


def dockerfiles() -> list[Path]:
    return sorted((ROOT / "docker").glob("Dockerfile*"))


# --- helpers: settings and commands -----------------------------------------------------------------------

def setting_path(name: str) -> list[str] | None:
    """``EXCB_EMBED__MAX_BATCH`` -> ["embed", "max_batch"] when that is a (nested) Settings field, else None."""
    from pydantic import BaseModel

    from services.settings import Settings

    if not name.startswith("EXCB_"):
        return None
    model: Any = Settings
    parts = name[len("EXCB_"):].lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return None
            model = ann
    return parts


def env_sets(compose: dict[str, Any], rendered: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, str]]:
    """Where -> the EXCB_* variables set there (compose services, containers + their ConfigMaps, Dockerfiles)."""
    sets: dict[str, dict[str, str]] = {}
    for name, svc in compose["services"].items():
        sets[f"compose:{name}"] = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
    docs = list(all_docs(rendered))
    cms = {d["metadata"]["name"]: d.get("data", {}) for _, d in docs if d["kind"] == "ConfigMap"}
    for where, doc in docs:
        for c in containers(doc):
            env: dict[str, str] = {}
            for src in c.get("envFrom", []):
                env.update(cms[src["configMapRef"]["name"]])
            env.update({e["name"]: str(e.get("value", "")) for e in c.get("env", [])})
            sets[f"{where}:{doc['metadata']['name']}/{c['name']}"] = env
        if doc["kind"] == "ConfigMap":
            sets[f"{where}:configmap/{doc['metadata']['name']}"] = dict(doc.get("data", {}))
    for df in dockerfiles():
        stages = parse_dockerfile(df)
        for target in stages:
            env: dict[str, str] = {}
            for st in reversed(chain(stages, target)):
                env.update(st.env)
            sets[f"{df.name}:{target}"] = env
    return {w: {k: v for k, v in env.items() if k.startswith("EXCB_")} for w, env in sets.items()}


def strip_init(argv: list[str], image_pkgs: set[str]) -> list[str]:
    if argv[:2] == ["tini", "--"]:
        assert "tini" in image_pkgs, "tini is PID 1 but the image does not install it"
        return argv[2:]
    return argv


def console_scripts() -> set[str]:
    from importlib.metadata import entry_points

    return {ep.name for ep in entry_points(group="console_scripts")}


def check_excb(args: list[str]) -> None:
    from excb.cli import _config_from_args, build_parser

    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert args[0] in verbs, f"`excb {args[0]}` is not a verb of `excb --help` ({sorted(verbs)})"
    if args[0] == "train":  # parsed by the CLI and resolved (preset + overrides) through the real config schema;
        # not --dry-run, which also inspects the data, and a manifest's data exists only in its cluster
        _config_from_args(parser.parse_args(args))
    else:
        parser.parse_args(args)


def _check_uvicorn(args: list[str]) -> None:
    import importlib

    from uvicorn.main import main as uvicorn_cli  # the click command (the package re-exports a function)

    ctx = uvicorn_cli.make_context("uvicorn", list(args))
    module, _, attr = ctx.params["app"].partition(":")
    target = getattr(importlib.import_module(module), attr)
    assert callable(target), ctx.params["app"]
    assert ctx.params["factory"], "the API is an app factory: uvicorn needs --factory"


_CELERY_HELP: dict[str, str] = {}


def _check_celery(args: list[str]) -> None:
    import importlib

    from celery import Celery

    app_name = args[args.index("--app") + 1]
    module, _, attr = app_name.partition(":")
    app = getattr(importlib.import_module(module), attr or "app")
    assert isinstance(app, Celery), app_name
    sub = args[args.index("--app") + 2]
    assert sub == "worker", args
    if sub not in _CELERY_HELP:
        res = subprocess.run([sys.executable, "-m", "celery", "--app", app_name, sub, "--help"],
                             capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        _CELERY_HELP[sub] = res.stdout
    for opt in (a for a in args[args.index(sub) + 1:] if a.startswith("--")):
        assert re.search(rf"{re.escape(opt)}\b", _CELERY_HELP[sub]), f"celery {sub} has no option {opt}"


def _check_torchrun(args: list[str]) -> None:
    from torch.distributed.run import get_args_parser

    ns = get_args_parser().parse_args([re.sub(r"\$\(\w+\)", "0", a) for a in args])
    assert ns.module and ns.training_script == "excb.cli", "torchrun must run -m excb.cli"
    check_excb(list(ns.training_script_args))


def check_command(argv: list[str], image: tuple[Path, str] | None) -> None:
    """Fail unless ``argv`` names something the image really has and its arguments parse."""
    stages = parse_dockerfile(image[0]) if image else {}
    pkgs = apt_packages(stages, image[1]) if image else set()
    argv = strip_init(list(argv), pkgs)
    exe, args = argv[0], argv[1:]
    if exe.startswith("excb-") or exe.startswith("/"):
        assert image is not None
        copied = files_in_image(stages, image[1])
        assert any(d == exe or d.endswith("/" + exe) for d in copied), f"{exe} is not copied into {image}"
        return
    if exe in ("python", "python3") and args[:1] == ["-c"]:
        compile(args[1], "<manifest>", "exec")
        return
    assert exe in console_scripts(), f"{exe}: no such console script in the installed packages"
    {"excb": check_excb, "uvicorn": _check_uvicorn, "celery": _check_celery,
     "torchrun": _check_torchrun}[exe](args)


def effective_cmd(stages: dict[str, Stage], target: str) -> list[str]:
    for st in chain(stages, target):
        if st.cmd is not None:
            ep = next((s.entrypoint for s in chain(stages, target) if s.entrypoint is not None), [])
            return [*ep, *st.cmd]
    raise AssertionError(f"{target}: no CMD")


def dockerignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for p in patterns:
            if fnmatch(prefix, p) or (p.startswith("**/") and fnmatch(parts[i - 1], p[3:])):
                return True
    return False
