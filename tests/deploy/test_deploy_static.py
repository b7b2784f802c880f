"""Static checks of docker/, docker-compose.yml and deploy/ (no Docker engine or cluster runs here).

What is checked, and with what:
- the compose file through Debian's ``docker-compose config`` (v1.29: the compose-spec JSON schema it bundles),
  default and ``--profile cpu``; a broken copy must fail, so the validator is known to bite;
- every Kubernetes manifest, rendered with ``kubectl kustomize`` where kubectl exists and file by file
  always, against the Kubernetes OpenAPI schemas bundled in ``kubernetes-validate`` (strict: unknown fields
  fail); the PyTorchJob's pod templates against the PodTemplateSpec schema;
- every ``EXCB_*`` variable that compose, the manifests and the Dockerfiles set is a field of
  ``services.settings.Settings`` (``__`` nesting) and the values parse;
- every command they run exists and its arguments parse (``excb`` verbs via the real parser, ``excb train``
  via ``--dry-run``, uvicorn/celery/torchrun via their own parsers, image scripts via the Dockerfile);
- every Dockerfile, build target and COPY source they name exists and is not hidden by .dockerignore;
- the Redis flags, run by the real ``redis-server``, give AOF everysec + noeviction;
- the healthcheck and secret-init scripts that the images carry.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from support import HANG_GUARD_S
from support import REPO_ROOT as ROOT
from support.deploy_parse import (
    all_docs,
    by_kind,
    chain,
    check_command,
    containers,
    dockerfiles,
    dockerignored,
    effective_cmd,
    env_sets,
    image_builds,
    parse_dockerfile,
    pod_specs,
    setting_path,
    yaml_docs,
)

COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = ["deploy/base", "deploy/overlays/cpu", "deploy/training"]
THIRD_PARTY_IMAGES = ("redis:", "postgres:")
GRACE_MIN_S = 120


# --- helpers: tools ---------------------------------------------------------------------------------------

def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (Debian package docker-compose; scripts/system-deps.sh)")
    return exe


def _compose_config(*profiles: str, file: Path = COMPOSE) -> subprocess.CompletedProcess[str]:
    args = [_docker_compose(), "-f", str(file), "--project-directory", str(ROOT)]
    for p in profiles:
        args += ["--profile", p]
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "BIND_ADDR", "COMPOSE_PROFILES")}
    return subprocess.run([*args, "config"], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The resolved compose model (anchors merged, every profile on)."""
    out = _compose_config("cpu")
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def _kv():  # the schema validator; CI installs it with the test extra
    return pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """``kubectl kustomize`` output per kustomization; raw files (kustomize-free) when kubectl is absent."""
    kubectl = shutil.which("kubectl")
    out: dict[str, list[dict[str, Any]]] = {}
    for k in KUSTOMIZATIONS:
        if kubectl:
            res = subprocess.run([kubectl, "kustomize", str(ROOT / k)], capture_output=True, text=True,
                                 timeout=HANG_GUARD_S)
            assert res.returncode == 0, f"{k}: {res.stderr}"
            out[k] = yaml_docs(res.stdout)
        else:
            kust = yaml.safe_load((ROOT / k / "kustomization.yaml").read_text())
            out[k] = [d for r in kust.get("resources", []) if not r.startswith("..")
                      for d in yaml_docs((ROOT / k / r).read_text())]
    return out


# --- compose ----------------------------------------------------------------------------------------------

def test_compose_validates_default_and_cpu_profile() -> None:
    for profiles in ((), ("cpu",)):
        res = _compose_config(*profiles)
        assert res.returncode == 0, res.stderr
        services = set(yaml.safe_load(res.stdout)["services"])
        assert {"redis", "postgres", "api", "worker", "embed", "secrets-init"} <= services


def test_compose_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    doc["services"]["api"]["stop_grace_periodd"] = "30s"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(doc))
    res = _compose_config(file=broken)
    assert res.returncode != 0 and "stop_grace_periodd" in res.stderr


def _seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", text))


def test_compose_keeps_the_reliability_promises(compose: dict[str, Any]) -> None:
    s = compose["services"]
    published = {name for name, svc in s.items() if svc.get("ports")}
    assert published == {"api", "embed"}, "only the API (+dashboard) and embed may publish ports"
    for name in ("redis", "postgres"):
        assert s[name]["networks"] == {"backend": None}
    assert compose["networks"]["backend"]["internal"] is True
    redis = s["redis"]["command"]
    assert _flag(redis, "--appendonly") == "yes" and _flag(redis, "--appendfsync") == "everysec"
    assert _flag(redis, "--maxmemory-policy") == "noeviction"
    assert any(v.startswith("redis-data:" + _flag(redis, "--dir")) for v in s["redis"]["volumes"])
    assert any(v.startswith("postgres-data:/var/lib/postgresql/data") for v in s["postgres"]["volumes"])
    assert s["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/secrets/")
    gpu = s["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert s["worker-cpu"]["profiles"] == ["cpu"] and "deploy" not in s["worker-cpu"]
    for name in ("worker", "worker-cpu"):
        grace = _seconds(s[name]["stop_grace_period"])
        child_grace = float(s[name]["environment"]["EXCB_CANCEL_GRACE_SECONDS"])
        assert grace >= GRACE_MIN_S and grace >= 1.2 * child_grace, (name, grace, child_grace)
        assert any(v.startswith("excb-home:/var/lib/excb") for v in s[name]["volumes"])
    assert s["embed"]["deploy"]["replicas"] >= 2
    assert any(v.startswith("excb-home:/var/lib/excb:ro") for v in s["embed"]["volumes"])
    for name, svc in s.items():  # secrets only as files
        for k in svc.get("environment") or {}:
            assert not re.search(r"PASSWORD|SECRET|TOKEN|API_KEYS$", k) or k.endswith("_FILE"), (name, k)


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_flags_do_what_they_claim(compose: dict[str, Any], rendered: dict[str, Any],
                                        tmp_path: Path) -> None:
    """Run the real redis-server with the compose flags and read its live configuration back."""
    argv = list(compose["services"]["redis"]["command"])
    k8s = by_kind(rendered["deploy/base"], "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert k8s["args"] == argv, "compose and Kubernetes must run Redis the same way"
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed (Debian package redis-server)")
    import redis

    port = _free_port()
    argv[argv.index("--dir") + 1] = str(tmp_path)
    proc = subprocess.Popen([exe, *argv[1:], "--port", str(port), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
                time.sleep(0.05)
        cfg = client.config_get("*")
        assert (cfg["appendonly"], cfg["appendfsync"], cfg["maxmemory-policy"]) == ("yes", "everysec", "noeviction")
        assert int(cfg["maxmemory"]) > 0, "noeviction needs a maxmemory to refuse writes before the OOM killer"
        client.set("excb-probe-key", "v")
        deadline = time.monotonic() + HANG_GUARD_S  # everysec: on disk within about a second (longer on a busy box)
        while not any(b"excb-probe-key" in p.read_bytes() for p in tmp_path.rglob("*.aof")):
            assert time.monotonic() < deadline, "the write never reached the AOF"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- Kubernetes -------------------------------------------------------------------------------------------

def _validate_k8s(doc: dict[str, Any]) -> None:
    kv = _kv()
    kv.validate(doc, kv.utils.latest_version(), strict=True)


def test_manifests_validate_against_kubernetes_schemas(rendered: dict[str, Any]) -> None:
    checked = 0
    for where, doc in all_docs(rendered):
        if doc["apiVersion"].startswith("kubeflow.org/"):
            continue  # a CRD: its pod templates are checked below
        try:
            _validate_k8s(doc)
        except Exception as exc:  # noqa: BLE001 - name the failing document
            raise AssertionError(f"{where}: {doc['kind']}/{doc['metadata']['name']}: {exc}") from exc
        checked += 1
    assert checked >= 25


def test_schema_validator_rejects_unknown_fields(rendered: dict[str, Any]) -> None:
    kv = _kv()
    bad = json.loads(json.dumps(by_kind(rendered["deploy/base"], "Deployment", "worker")))
    bad["spec"]["template"]["spec"]["containers"][0]["terminationGracePeriod"] = 120
    with pytest.raises(kv.ValidationError):
        _validate_k8s(bad)


def test_pytorchjob_pod_templates_validate() -> None:
    """No CRD schema ships with the validator, so check the part that matters: each replica's pod template."""
    kv = _kv()
    import jsonschema
    from referencing import Registry, Resource

    version = f"v{kv.utils.latest_version()}-local-strict"
    load = kv.utils.schema_contents
    schema = load(f"kubernetes-json-schema/{version}/podtemplatespec-v1.json", kv.utils.latest_version())
    defs = load(f"kubernetes-json-schema/{version}/_definitions.json", kv.utils.latest_version())
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    job = yaml.safe_load((DEPLOY / "training" / "pytorchjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    for spec in replicas.values():
        validator.validate(spec["template"])
        assert spec["template"]["spec"]["containers"][0]["name"] == "pytorch", "the operator needs `pytorch`"
    bad = json.loads(json.dumps(replicas["Master"]["template"]))
    bad["spec"]["containers"][0]["cmd"] = ["x"]
    assert not validator.is_valid(bad)


def test_kubernetes_keeps_the_reliability_promises(rendered: dict[str, Any]) -> None:
    base, cpu = rendered["deploy/base"], rendered["deploy/overlays/cpu"]
    worker = by_kind(base, "Deployment", "worker")["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= GRACE_MIN_S
    env = {e["name"]: e["value"] for e in worker["containers"][0]["env"]}
    assert worker["terminationGracePeriodSeconds"] >= 1.2 * float(env["EXCB_CANCEL_GRACE_SECONDS"])
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    cpu_worker = by_kind(cpu, "Deployment", "worker")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu_worker["resources"]["limits"]
    assert cpu_worker["image"].startswith("excb/worker-cpu:")
    hpa = by_kind(base, "HorizontalPodAutoscaler", "embed")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "embed" and hpa["minReplicas"] >= 2
    for name in ("api", "embed"):
        by_kind(base, "Service", name)
        by_kind(base, "Deployment", name)
    assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "excb-home"
               and d["spec"]["accessModes"] == ["ReadWriteMany"] for d in base)
    deny = by_kind(base, "NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny["podSelector"] == {} and "ingress" not in deny
    redis = by_kind(base, "StatefulSet", "redis")
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    for doc in base:
        assert doc["kind"] != "Service" or doc["spec"].get("type", "ClusterIP") == "ClusterIP"
        for spec in pod_specs(doc):
            assert spec["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        for c in containers(doc):
            for e in c.get("env", []):
                assert "secretKeyRef" not in e.get("valueFrom", {}), "secrets are mounted as files"


def test_multinode_job_is_a_real_torchrun_launch(rendered: dict[str, Any]) -> None:
    docs = rendered["deploy/training"]
    job = by_kind(docs, "Job", "excb-train")
    svc = by_kind(docs, "Service", "excb-train")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert svc["spec"]["clusterIP"] == "None" and job["spec"]["template"]["spec"]["subdomain"] == "excb-train"
    c = job["spec"]["template"]["spec"]["containers"][0]
    from torch.distributed.run import get_args_parser

    ns = get_args_parser().parse_args([re.sub(r"\$\(\w+\)", "0", a) for a in c["args"]])
    assert int(ns.nnodes) == spec["completions"]
    assert int(ns.nproc_per_node) == c["resources"]["limits"]["nvidia.com/gpu"]
    assert ns.master_addr == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    rank_env = next(e for e in c["env"] if f"$({e['name']})" in " ".join(c["args"]))
    assert rank_env["valueFrom"]["fieldRef"]["fieldPath"].endswith("['batch.kubernetes.io/job-completion-index']")


# --- cross-checks: settings, commands, Dockerfile paths ---------------------------------------------------

def test_every_excb_variable_is_a_real_setting(compose: dict[str, Any], rendered: dict[str, Any],
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.settings import Settings

    assert setting_path("EXCB_EMBED__MAX_BATCH") == ["embed", "max_batch"]
    assert setting_path("EXCB_EMBED__NO_SUCH_KNOB") is None and setting_path("EXCB_HOME__X") is None
    sets = env_sets(compose, rendered)
    names = {k for env in sets.values() for k in env}
    assert len(names) >= 10
    unknown = {f"{where}: {k}" for where, env in sets.items() for k in env if setting_path(k) is None}
    assert not unknown, sorted(unknown)
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    for where, env in sets.items():  # the values must parse too (JSON lists, numbers, bools)
        for k in list(os.environ):
            if k.startswith("EXCB_"):
                monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, str(password) if k == "EXCB_DATABASE_PASSWORD_FILE" else v)
        s = Settings()
        if "EXCB_DATABASE_PASSWORD_FILE" in env:
            assert ":s3cret@" in (s.database_url or ""), where


def _compose_commands(compose: dict[str, Any]) -> Iterator[tuple[str, list[str], tuple[Path, str]]]:
    builds = image_builds(compose)
    for name, svc in compose["services"].items():
        image = builds.get(svc["image"].rsplit(":", 1)[0])
        if image is None:
            assert svc["image"].startswith(THIRD_PARTY_IMAGES), f"{name}: unknown image {svc['image']}"
            continue
        stages = parse_dockerfile(image[0])
        ep = next((s.entrypoint for s in chain(stages, image[1]) if s.entrypoint is not None), [])
        yield f"compose:{name}", [*ep, *(svc.get("command") or effective_cmd(stages, image[1])[len(ep):])], image
        test = (svc.get("healthcheck") or {}).get("test")
        if test:
            yield f"compose:{name}:healthcheck", test[1:], image


def test_every_command_exists_and_parses(compose: dict[str, Any], rendered: dict[str, Any]) -> None:
    builds = image_builds(compose)
    checked: set[tuple[str, ...]] = set()
    todo: list[tuple[str, list[str], tuple[Path, str] | None]] = list(_compose_commands(compose))
    for where, doc in all_docs(rendered):
        for c in containers(doc):
            image = builds.get(c["image"].rsplit(":", 1)[0])
            if image is None:
                assert c["image"].startswith(THIRD_PARTY_IMAGES), f"{where}: unknown image {c['image']}"
                continue
            todo.append((f"{where}:{c['name']}", [*c.get("command", []), *c.get("args", [])], image))
    for df in dockerfiles():
        stages = parse_dockerfile(df)
        for target, st in stages.items():
            if st.cmd is not None:
                todo.append((f"{df.name}:{target}", effective_cmd(stages, target), (df, target)))
            if st.healthcheck:
                todo.append((f"{df.name}:{target}:HEALTHCHECK", st.healthcheck, (df, target)))
    for where, argv, image in todo:
        key = (str(image), *argv)
        if key in checked:
            continue
        checked.add(key)
        try:
            check_command(argv, image)
        except (AssertionError, SystemExit, Exception) as exc:  # noqa: BLE001 - report which command
            raise AssertionError(f"{where}: {argv}: {exc!r}") from exc
    assert len(checked) >= 10
    with pytest.raises(AssertionError):
        check_command(["excb", "no-such-verb"], None)
    with pytest.raises(AssertionError):
        check_command(["excb-not-copied"], (ROOT / "docker" / "Dockerfile.slim", "api"))


def test_dockerfile_paths_targets_and_images_exist(compose: dict[str, Any], rendered: dict[str, Any]) -> None:
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    builds = image_builds(compose)
    assert set(builds) >= {"excb/api", "excb/embed", "excb/worker", "excb/worker-cpu"}
    for dockerfile, target in builds.values():
        assert dockerfile.is_file(), dockerfile
        assert target in parse_dockerfile(dockerfile), f"{dockerfile.name} has no stage {target}"
    extras = set(__import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]
                 ["optional-dependencies"])
    for df in dockerfiles():
        stages = parse_dockerfile(df)
        for st in stages.values():
            for sources, _, from_stage in st.copies:
                for src in sources if not from_stage else []:
                    assert (ROOT / src).exists(), f"{df.name}: COPY {src}: no such path"
                    assert not dockerignored(src, ignore), f"{df.name}: COPY {src} is excluded by .dockerignore"
            for run in st.runs:
                for m in re.finditer(r'pip install "/src\[([\w,]+)\]"', run):
                    assert set(m.group(1).split(",")) <= extras, m.group(0)
        for target in stages:
            stage_chain = chain(stages, target)
            if any(s.cmd for s in stage_chain):  # a final image: non-root, tini as PID 1, a health story
                user = next(s.user for s in stage_chain if s.user)
                assert user.split(":")[0] not in ("0", "root"), (df.name, target)
                assert next(s.entrypoint for s in stage_chain if s.entrypoint) == ["tini", "--"]
                assert next(s.healthcheck for s in stage_chain if s.healthcheck is not None) is not None
    for _, doc in all_docs(rendered):  # every image a manifest names is one compose builds (or Redis/PG)
        for c in containers(doc):
            name = c["image"].rsplit(":", 1)[0]
            assert name in builds or c["image"].startswith(THIRD_PARTY_IMAGES), c["image"]
    for f in ("excb/__init__.py", "services/settings.py", "pyproject.toml"):
        assert not dockerignored(f, ignore)
    assert dockerignored("tests/test_x.py", ignore) and dockerignored("excb/__pycache__/a.pyc", ignore)


# --- the scripts the images carry -------------------------------------------------------------------------

class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.send_response(200 if self.path == "/livez" else 503)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def test_healthcheck_script_follows_the_http_status() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = [sys.executable, str(ROOT / "docker" / "healthcheck.py")]
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert subprocess.run([*script, f"{base}/livez"], timeout=HANG_GUARD_S).returncode == 0
        assert subprocess.run([*script, f"{base}/readyz"], capture_output=True, timeout=HANG_GUARD_S).returncode == 1
    finally:
        server.shutdown()
    assert subprocess.run([*script, f"http://127.0.0.1:{_free_port()}/livez", "1"],
                          capture_output=True, timeout=HANG_GUARD_S).returncode == 1


def test_init_secrets_creates_private_files_once(tmp_path: Path) -> None:
    script = ROOT / "docker" / "init-secrets.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["sh", str(script), str(tmp_path)], check=True, capture_output=True, env=env, timeout=HANG_GUARD_S)
    first = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert set(first) == {"postgres_password", "api_keys"}
    for name, text in first.items():
        assert len(text.strip()) >= 32
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o400
    assert first["postgres_password"] != first["api_keys"]
    subprocess.run(["sh", str(script), str(tmp_path)], check=True, capture_output=True, env=env, timeout=HANG_GUARD_S)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == first, "existing secrets must be kept"
