#!/usr/bin/env python3
"""The checks of scripts/compose-e2e.sh, against a compose stack through its published ports (standard library only).

Run by the shell script after it has built the images; the compose command line (project, files, profile) comes
after ``--``. Steps, each timed:
  up           ``up -d`` until the API's /readyz (a live worker) and every embed replica's /livez answer 200
  job          a real digits job (examples/digits-job.yaml) through ``POST /jobs`` until SUCCEEDED
  embed        the job's model answers ``GET /embed?uri=`` and ``POST /v1/embed`` on every embed replica
  dashboard    ``GET /dashboard`` is the dashboard page
  redis        the worker stopped, a job queued, Redis restarted: the message is still in the queue (AOF on the
               volume), and the job runs to SUCCEEDED once the worker is back
  sigkill      the worker container's init SIGKILLed mid-job (after checkpoints): Docker restarts it, the API's
               reaper requeues the job, it resumes from its checkpoint and ends SUCCEEDED on attempt 2
  down/up      ``down`` then ``up``: jobs, metrics, models and the API key are still there (volumes)
  corpus       ``up --scale worker-cpu=2``: one corpus embedding job (kind embed) over 480 images in chunks of 16,
               committed by both worker containers, every image once
  down -v      nothing of the project is left: no container, network or volume
Timings go to OUT/timings.json and OUT/timings.md (with the shell's: engine, base image, build).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from pathlib import Path

# examples/digits-job.yaml, shorter: the steps are what a 2-core machine shared with other work can afford
DIGITS_JOB = {"preset": "cpu-small", "data": "digits", "max_steps": int(os.environ.get("EXCB_E2E_STEPS", "20")),
              "batch_size": 64, "num_clusters": 256, "kmeans": {"samples": 1400}}
# the corpus step: small chunks, so that both worker containers get some while the coordinator embeds its own
CORPUS_IMAGES, CORPUS_CHUNK = 480, 16
QUEUE = "excb.jobs"  # services/settings.py celery_queue
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def log(msg: str) -> None:
    print(f"[compose-e2e {time.strftime('%H:%M:%S', time.gmtime())}] {msg}", file=sys.stderr, flush=True)


class Failed(Exception):
    pass


class Stack:
    def __init__(self, compose: list[str], out: Path) -> None:
        self.compose, self.out = compose, out
        self.key = ""
        self.api = ""
        self.timings: dict[str, float] = {}

    # --- compose and docker ---------------------------------------------------------------------------------
    def dc(self, *args: str, timeout: float = 900, check: bool = True) -> str:
        res = subprocess.run([*self.compose, *args], capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise Failed(f"{' '.join(args)}: exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return res.stdout

    def containers(self, service: str) -> list[str]:
        return [c for c in self.dc("ps", "-q", service).split() if c]

    def host_port(self, service: str, port: int, index: int) -> str:
        out = self.dc("port", "--index", str(index), service, str(port)).strip()
        if not out:
            raise Failed(f"{service} #{index}: port {port} is not published")
        return out.replace("0.0.0.0", "127.0.0.1")

    def embed_urls(self) -> list[str]:
        n = len(self.containers("embed"))
        return [f"http://{self.host_port('embed', 8080, i)}" for i in range(1, n + 1)]

    def save_logs(self, name: str) -> None:
        (self.out / name).write_text(self.dc("logs", "--no-color", "--timestamps", check=False, timeout=120))

    # --- HTTP ---------------------------------------------------------------------------------------------------
    def http(self, method: str, url: str, body: bytes | None = None, ctype: str | None = None,
             auth: bool = True, timeout: float = 30) -> tuple[int, bytes]:
        req = urllib.request.Request(url, data=body, method=method)
        if auth and self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        if ctype:
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            return 0, str(exc).encode()

    def json(self, method: str, path: str, payload: object | None = None, expect: tuple[int, ...] = (200,)) -> dict:
        body = json.dumps(payload).encode() if payload is not None else None
        status, data = self.http(method, self.api + path, body, "application/json" if body else None)
        if status not in expect:
            raise Failed(f"{method} {path}: {status} {data[:500]!r}")
        return json.loads(data)

    def wait(self, what: str, predicate, timeout: float, every: float = 2.0):  # noqa: ANN001
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
            except Failed as exc:
                last = exc
            if last and not isinstance(last, Failed):
                return last
            time.sleep(every)
        raise Failed(f"timed out after {timeout:.0f} s waiting for {what} (last: {last})")

    # --- steps ----------------------------------------------------------------------------------------------------
    def up(self, name: str) -> None:
        t0 = time.monotonic()
        self.dc("up", "-d", timeout=1200)
        self.api = f"http://{self.host_port('api', 8000, 1)}"
        self.key = self.dc("exec", "-T", "api", "cat", "/secrets/api_keys").split()[0]
        self.wait("the API's /readyz (database, broker, a live worker)",
                  lambda: self.http("GET", self.api + "/readyz", auth=False)[0] == 200, 300)
        urls = self.embed_urls()
        if len(urls) < 2:
            raise Failed(f"{len(urls)} embed replica(s) running; docker-compose.yml asks for 2")
        for url in urls:
            self.wait(f"{url}/livez", lambda u=url: self.http("GET", u + "/livez", auth=False)[0] == 200, 300)
        self.timings[name] = time.monotonic() - t0
        log(f"{name}: stack healthy in {self.timings[name]:.1f} s (API {self.api}, embed {', '.join(urls)})")

    def submit(self, job: dict, name: str) -> str:
        out = self.json("POST", "/jobs", {**job, "name": name}, expect=(201,))
        return out["id"]

    def job(self, job_id: str) -> dict:
        return self.json("GET", f"/jobs/{job_id}")

    def wait_job(self, job_id: str, timeout: float = 1200) -> dict:
        def done():  # noqa: ANN202
            j = self.job(job_id)
            return j if j["status"] in TERMINAL else None
        j = self.wait(f"job {job_id} to finish", done, timeout)
        if j["status"] != "SUCCEEDED":
            raise Failed(f"job {job_id} ended {j['status']}: {j.get('error')}")
        return j

    def first_job(self) -> str:
        t0 = time.monotonic()
        job_id = self.submit(DIGITS_JOB, "e2e-digits")
        j = self.wait_job(job_id)
        self.timings["job_digits"] = time.monotonic() - t0
        log(f"job {job_id} ({DIGITS_JOB['max_steps']} steps): SUCCEEDED in {self.timings['job_digits']:.1f} s "
            f"(attempt {j['attempt']})")
        return job_id

    def embed(self, data_dir: Path) -> None:
        write_png(data_dir / "digit.png")
        png = (data_dir / "digit.png").read_bytes()
        t0 = time.monotonic()
        for url in self.embed_urls():
            q = urllib.parse.urlencode({"uri": "digit.png"})

            def get(u=url, q=q):  # noqa: ANN001, ANN202
                status, data = self.http("GET", f"{u}/embed?{q}")
                if status == 200:
                    return json.loads(data)
                if status in (503, 404):  # no model loaded yet (rescan every 10 s)
                    return None
                raise Failed(f"GET {u}/embed: {status} {data[:300]!r}")
            out = self.wait(f"{url} to serve the job's model", get, 120)
            vec = out["data"][0]["embedding"]
            boundary = uuid.uuid4().hex
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"digit.png\"\r\n"
                    f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
            status, data = self.http("POST", f"{url}/v1/embed", body, f"multipart/form-data; boundary={boundary}")
            if status != 200:
                raise Failed(f"POST {url}/v1/embed: {status} {data[:300]!r}")
            post = json.loads(data)["data"][0]
            if len(post["embedding"]) != len(vec) or abs(sum(a - b for a, b in zip(post["embedding"], vec))) > 1e-3:
                raise Failed("GET /embed and POST /v1/embed disagree on the same image")
            log(f"{url}: GET /embed and POST /v1/embed -> {len(vec)}-d embedding, cluster {post['cluster']['id']}")
        self.timings["embed_model_served"] = time.monotonic() - t0

    def dashboard(self) -> None:
        status, data = self.http("GET", self.api + "/dashboard", auth=False)
        if status != 200 or b"<html" not in data.lower():
            raise Failed(f"GET /dashboard: {status} {data[:200]!r}")
        log(f"/dashboard: 200, {len(data)} bytes of HTML")

    def redis_llen(self) -> int:
        return int(self.dc("exec", "-T", "redis", "redis-cli", "LLEN", QUEUE).strip() or 0)

    def redis_restart(self) -> str:
        self.dc("stop", "worker-cpu", timeout=300)
        job_id = self.submit(DIGITS_JOB, "e2e-redis-restart")
        self.wait("the message in Redis", lambda: self.redis_llen() >= 1, 30, 1)
        aof = self.dc("exec", "-T", "redis", "redis-cli", "CONFIG", "GET", "appendonly").split()
        if aof[-1:] != ["yes"]:
            raise Failed(f"Redis AOF is off: {aof}")
        t0 = time.monotonic()
        self.dc("restart", "redis", timeout=120)
        n = self.wait("Redis back with the queued message",
                      lambda: self.redis_llen() if self.redis_llen() >= 1 else None, 60, 1)
        log(f"redis restarted: {n} message(s) still in {QUEUE} (AOF on the redis-data volume)")
        if self.job(job_id)["status"] != "QUEUED":
            raise Failed("the job left QUEUED with no worker running")
        self.dc("start", "worker-cpu", timeout=300)
        j = self.wait_job(job_id)
        self.timings["fault_redis_restart_to_succeeded"] = time.monotonic() - t0
        log(f"job {job_id}: SUCCEEDED {self.timings['fault_redis_restart_to_succeeded']:.1f} s after the Redis "
            f"restart (attempt {j['attempt']})")
        return job_id

    def sigkill_worker(self) -> str:
        ckpt = 8
        job = {**DIGITS_JOB, "max_steps": 40, "checkpoint_every_steps": ckpt}
        job_id = self.submit(job, "e2e-sigkill")
        self.wait(f"job {job_id} past two checkpoints",
                  lambda: ((self.job(job_id)["progress"] or {}).get("step") or 0) >= 2 * ckpt + 2, 1800, 1)
        step = self.job(job_id)["progress"]["step"]
        (cid,) = self.containers("worker-cpu")
        info = json.loads(subprocess.run(["docker", "inspect", cid], capture_output=True, text=True,
                                         check=True).stdout)[0]
        pid, started = info["State"]["Pid"], info["State"]["StartedAt"]
        log(f"SIGKILL to the worker container's init (host pid {pid}) at step {step}")
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)

        def restarted():  # noqa: ANN202
            st = json.loads(subprocess.run(["docker", "inspect", cid], capture_output=True, text=True,
                                           check=True).stdout)[0]["State"]
            return st["Running"] and st["StartedAt"] != started
        self.wait("Docker to restart the worker (restart: unless-stopped)", restarted, 120, 1)
        self.timings["fault_sigkill_worker_restarted"] = time.monotonic() - t0
        j = self.wait_job(job_id)
        self.timings["fault_sigkill_to_succeeded"] = time.monotonic() - t0
        if j["attempt"] != 2:
            raise Failed(f"job {job_id} ended on attempt {j['attempt']}, expected 2")
        text = "".join(self.json("GET", f"/jobs/{job_id}/logs?offset=0&limit=1048576&source={src}")["text"]
                       for src in ("job", "train"))
        if "resumed from the checkpoint at step" not in text:
            raise Failed("the job's log does not say it resumed from a checkpoint")
        at = text.split("resumed from the checkpoint at step", 1)[1].split()[0].strip(".,;")
        log(f"job {job_id}: resumed from the checkpoint at step {at}, SUCCEEDED on attempt 2, "
            f"{self.timings['fault_sigkill_to_succeeded']:.1f} s after the kill")
        return job_id

    def down_up(self, jobs: list[str]) -> None:
        before_models = self.json("GET", "/v1/models")
        key = self.key
        t0 = time.monotonic()
        self.dc("down", timeout=600)
        self.timings["down"] = time.monotonic() - t0
        self.up("up_again")
        if self.key != key:
            raise Failed("the API key changed across down/up (secrets volume lost)")
        for job_id in jobs:
            j = self.job(job_id)
            if j["status"] != "SUCCEEDED":
                raise Failed(f"after down/up job {job_id} is {j['status']}")
        metrics = self.json("GET", f"/jobs/{jobs[0]}/metrics")
        rows = metrics["items"]
        if not rows:
            raise Failed(f"after down/up job {jobs[0]} has no metrics: {str(metrics)[:300]}")
        models = self.json("GET", "/v1/models")
        n_before, n_after = len(_items(before_models)), len(_items(models))
        if n_after < max(1, n_before):
            raise Failed(f"models before down/up: {n_before}, after: {n_after}")
        log(f"after down/up: {len(jobs)} jobs SUCCEEDED, {len(rows)} metric rows for the first, {n_after} models")

    def corpus_scaled(self, model_id: str, data_dir: Path) -> None:
        """``up --scale worker-cpu=2``, then one corpus embedding job (issue 30): its chunks are committed by
        both worker containers, and every image is in the corpus once."""
        folder = data_dir / "e2e-corpus"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(CORPUS_IMAGES):
            write_png(folder / f"img-{i:04d}.png", size=20 + i % 17)
        t0 = time.monotonic()
        self.dc("up", "-d", "--no-recreate", "--scale", "worker-cpu=2", timeout=1200)
        self.wait("two live workers", lambda: self.json("GET", "/v1/workers")["live"] >= 2, 600)
        self.timings["scale_worker_to_2"] = time.monotonic() - t0
        t0 = time.monotonic()
        out = self.json("POST", "/v1/jobs", {"kind": "embed", "model": model_id, "source": "e2e-corpus",
                                             "chunk_size": CORPUS_CHUNK, "name": "e2e-corpus"}, expect=(201,))
        j = self.wait_job(out["id"])
        self.timings["corpus_job_2_workers"] = time.monotonic() - t0
        progress = j["progress"] or {}
        if progress.get("images") != CORPUS_IMAGES or progress.get("errors"):
            raise Failed(f"corpus job {out['id']}: progress {progress}, expected {CORPUS_IMAGES} images, 0 errors")
        # the chunks' completion records (services/corpus/claims.py) on the shared excb-home volume
        records = json.loads(self.dc(
            "exec", "-T", "api", "python", "-c", "import glob, json, sys; print(json.dumps([json.load(open(f)) "
            "for f in sorted(glob.glob(sys.argv[1]))]))", f"/var/lib/excb/runs/{out['id']}/corpus/done/*.json"))
        hosts = {r["worker"].split(":")[0] for r in records}
        if sum(r["items"] for r in records) != CORPUS_IMAGES or len(hosts) < 2:
            raise Failed(f"corpus job {out['id']}: {len(records)} chunks by {sorted(hosts)}; expected "
                         f"{CORPUS_IMAGES} images over both worker containers")
        by_host = {h: sum(r["items"] for r in records if r["worker"].startswith(h + ":")) for h in sorted(hosts)}
        log(f"corpus job {out['id']}: {CORPUS_IMAGES} images in {len(records)} chunks, by container {by_host}, "
            f"{self.timings['corpus_job_2_workers']:.1f} s")

    def down_v(self, project: str) -> None:
        t0 = time.monotonic()
        self.dc("down", "-v", "--remove-orphans", timeout=600)
        self.timings["down_v"] = time.monotonic() - t0
        label = f"label=com.docker.compose.project={project}"
        left = {kind: subprocess.run(["docker", kind, "ls", "-q", "--filter", label] if kind != "container"
                                     else ["docker", "ps", "-aq", "--filter", label],
                                     capture_output=True, text=True, check=True).stdout.split()
                for kind in ("container", "network", "volume")}
        if any(left.values()):
            raise Failed(f"left behind by down -v: {left}")
        log("down -v: no container, network or volume of the project is left")


def _items(listing: dict) -> list:
    for k in ("items", "data", "models"):
        if isinstance(listing.get(k), list):
            return listing[k]
    return []


def write_png(path: Path, size: int = 28) -> None:
    """A grey 28x28 '0'-like ring, written by hand (zlib + struct): no imaging library on the host."""
    rows = []
    c = (size - 1) / 2
    for y in range(size):
        row = bytearray([0])  # filter: none
        for x in range(size):
            r = ((x - c) ** 2 / 0.45 + (y - c) ** 2) ** 0.5
            row.append(255 if 7 <= r <= 11 else 0)
        rows.append(bytes(row))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    path.write_bytes(png)


def write_timings(out: Path, timings: dict[str, float], shell_tsv: Path | None) -> None:
    rows: list[tuple[str, float]] = []
    if shell_tsv and shell_tsv.exists():
        for line in shell_tsv.read_text().splitlines():
            k, _, v = line.partition("\t")
            rows.append((k, float(v)))
    rows += list(timings.items())
    (out / "timings.json").write_text(json.dumps(dict(rows), indent=2) + "\n")
    md = ["| step | seconds |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in rows]
    (out / "timings.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--project", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--shell-timings", type=Path)
    ap.add_argument("compose", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    compose = args.compose[1:] if args.compose[:1] == ["--"] else args.compose
    st = Stack(compose, args.out)
    try:
        st.up("up")
        jobs = [st.first_job()]
        st.embed(args.data_dir)
        st.dashboard()
        jobs.append(st.redis_restart())
        jobs.append(st.sigkill_worker())
        st.save_logs("stack-before-down.log")
        st.down_up(jobs)
        st.corpus_scaled(st.job(jobs[0])["model_id"], args.data_dir)
        st.save_logs("stack.log")
        st.down_v(args.project)
    except Exception as exc:  # noqa: BLE001 (a bug here fails the run the same way, with the logs kept)
        log(f"FAILED: {type(exc).__name__}: {exc}")
        try:
            st.save_logs("stack.log")
            log(f"compose logs: {args.out / 'stack.log'}")
        except Exception:  # noqa: BLE001
            pass
        write_timings(args.out, st.timings, args.shell_timings)
        return 1
    write_timings(args.out, st.timings, args.shell_timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
