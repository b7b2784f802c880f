"""Corpus embedding jobs (services/corpus) on 1 vs 2 worker processes, and the workers' memory against corpus size.

Everything is the real stack on this machine: the control plane app (in process, with its reaper), Redis, a SQLite
job store and `celery worker --pool=solo` processes exactly as `excb up` / compose start them. One job embeds a
folder of synthetic small JPEGs with an exported ResNet-18 bundle (untrained weights: the cost is the network's,
not its quality); every worker's ONNX Runtime gets one thread (EXCB_CORPUS_THREADS=1), so N workers use N cores.

Reported per run: wall time of the job (started_at -> finished_at: listing, planning, embedding, commits), images/s,
images and images/s of each worker (from the chunks' completion records), and each worker's peak RSS (VmHWM)
against its RSS when idle before the job. The memory claim: peak RSS depends on the chunk size, not on the
corpus: the same chunk size on a 10x larger corpus must not raise it.

    python benchmarks/corpus_scaleout.py                           # 100k + 10k images, 1 and 2 workers
    python benchmarks/corpus_scaleout.py --images 20000 --small 2000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` 32x32 JPEGs (noise plus a random rectangle), 100 per sub-folder; reused when already there."""
    from PIL import Image

    marker = folder / ".complete"
    if marker.exists() and int(marker.read_text()) == n:
        return
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        x, y = rng.integers(0, 24, 2)
        arr[y:y + 8, x:x + 8] = rng.integers(0, 255, 3, dtype=np.uint8)
        path = folder / f"{i // 100:04d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path, quality=90)
    marker.write_text(str(n))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Plane:
    """Settings env + control plane (TestClient) + worker processes for one run."""

    def __init__(self, work: Path, data: Path, redis_url: str, models: Path) -> None:
        self.home = work / "home"
        self.env = dict(os.environ)
        self.env.update({
            "EXCB_HOME": str(self.home), "EXCB_DATABASE_URL": f"sqlite:///{work / 'jobs.sqlite'}",
            "EXCB_REDIS_URL": redis_url, "EXCB_CELERY_QUEUE": f"excb.bench.{uuid.uuid4().hex[:8]}",
            "EXCB_DATA_ROOTS": json.dumps([str(data)]), "EXCB_MODELS_DIR": str(models),
            "EXCB_LOG_JSON": "false", "EXCB_INDEX__AFTER_JOB": "false", "OMP_NUM_THREADS": "1",
            "EXCB_CORPUS_THREADS": "1", "PYTHONPATH": str(REPO),
        })
        self.workers: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> "Plane":
        from fastapi.testclient import TestClient

        from services.api.app import create_app
        from services.settings import Settings

        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            self.settings = Settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.app = create_app(self.settings)
        self._cm = TestClient(self.app)
        self.client = self._cm.__enter__()
        return self

    def start_workers(self, n: int) -> None:
        from services.api.embedded import worker_command

        for i in range(n):
            log = open(self.home.parent / f"worker{i}.log", "wb")
            self.workers.append(subprocess.Popen(worker_command(self.env["EXCB_CELERY_QUEUE"], f"bench{i}@localhost"),
                                                 env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # every worker heartbeating = consuming
            rows = self.client.get("/v1/workers").json().get("items", [])
            if sum(bool(r.get("live")) for r in rows) >= n:
                return
            time.sleep(0.5)
        raise RuntimeError("workers did not come up")

    def __exit__(self, *exc: object) -> None:
        for proc in self.workers:
            proc.kill()
            proc.wait()
        self._cm.__exit__(None, None, None)


def register(plane: Plane, bundle: Path) -> str:
    from services.db.tables import ModelRow

    meta = json.loads((bundle / "model.json").read_text())
    with plane.app.state.plane.db.session() as s:
        s.add(ModelRow(id="m-bench", job_id=None, owner=None, status="READY", bundle_dir=str(bundle),
                       sha256=meta["sha256"], model_json=meta))
    return "m-bench"


def run(bundle: Path, data: Path, folder: str, workers: int, chunk: int, batch: int, redis_url: str) -> dict[str, Any]:
    from services.db import jobs as store

    with tempfile.TemporaryDirectory(prefix="corpus-bench-") as tmp, \
            Plane(Path(tmp), data, redis_url, bundle.parent) as plane:
        model = register(plane, bundle)
        plane.start_workers(workers)
        idle = {p.pid: kib(p.pid, "VmRSS") for p in plane.workers}
        cpu0 = {p.pid: cpu_seconds(p.pid) for p in plane.workers}
        load0 = os.getloadavg()[0]
        r = plane.client.post("/v1/jobs", json={"kind": "embed", "model": model, "source": folder,
                                                "chunk_size": chunk, "batch_size": batch})
        r.raise_for_status()
        job_id = r.json()["id"]
        while True:
            job = plane.client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                break
            time.sleep(0.5)
        peaks = {p.pid: kib(p.pid, "VmHWM") for p in plane.workers}
        cpu = sum(cpu_seconds(p.pid) - cpu0[p.pid] for p in plane.workers)
        if job["status"] != "SUCCEEDED":
            raise RuntimeError(f"job {job['status']}: {job['error']}")
        row = store.get_job(plane.app.state.plane.db, job_id)
        assert row is not None and row.started_at and row.finished_at
        wall = (row.finished_at - row.started_at).total_seconds()
        root = plane.home / "runs" / job_id / "corpus"
        per: dict[str, dict[str, float]] = {}
        for rec in (json.loads(p.read_text()) for p in (root / "done").glob("*.json")):
            w = per.setdefault(rec["worker"], {"images": 0, "seconds": 0.0, "chunks": 0})
            w["images"] += rec["items"]
            w["seconds"] += rec["seconds"]
            w["chunks"] += 1
        images = job["progress"]["images"]
        return {"workers": workers, "images": images, "errors": job["progress"]["errors"], "chunk_size": chunk,
                "batch_size": batch, "wall_s": round(wall, 2), "images_per_s": round(images / wall, 1),
                "per_worker": {k: {**v, "images_per_s": round(v["images"] / max(v["seconds"], 1e-9), 1)}
                               for k, v in per.items()},
                "worker_cpu_s": round(cpu, 1), "cpu_ms_per_image": round(1000 * cpu / images, 3),
                "load_avg_1min_at_start": round(load0, 2),
                "rss_idle_mib": [round(v / 1024, 1) for v in idle.values()],
                "rss_peak_mib": [round(v / 1024, 1) for v in peaks.values()]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100_000, help="the large corpus (default 100k)")
    p.add_argument("--small", type=int, default=10_000, help="the small corpus, for the memory comparison")
    p.add_argument("--chunk-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=16, help="ResNet-18 width of the bench bundle")
    p.add_argument("--size", type=int, default=32, help="input size of the bench bundle")
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "excb-corpus-bench",
                   help="where the synthetic images are kept (reused across runs)")
    p.add_argument("--redis", default=os.environ.get("EXCB_REDIS_URL", "redis://127.0.0.1:6379/14"))
    p.add_argument("--runs", default="large:1,large:2,small:1,small:2",
                   help="corpus:workers pairs, in order (the summary compares the first two and large vs small)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    from embed_load import build_bundle

    t0 = time.perf_counter()
    make_images(args.data / "large", args.images)
    make_images(args.data / "small", args.small, seed=1)
    made = time.perf_counter() - t0
    models = args.data / "models"
    bundle = models / "bench-model"
    if not (bundle / "model.onnx").exists():
        models.mkdir(parents=True, exist_ok=True)
        bundle = build_bundle(models, args.width, args.size, 256)
    results = []
    for folder, workers in ((f, int(w)) for f, w in (r.split(":") for r in args.runs.split(","))):
        res = run(bundle, args.data, folder, workers, args.chunk_size, args.batch_size, args.redis)
        res["corpus"] = folder
        results.append(res)
        print(json.dumps(res), flush=True)
    one, two = results[0], results[1]
    summary = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_avg_at_end": os.getloadavg(), "images_made_s": round(made, 1), "results": results,
        "scaleout_ratio_2_vs_1": round(two["images_per_s"] / one["images_per_s"], 2),
        "peak_rss_mib": {f"{r['corpus']}:{r['workers']}": max(r["rss_peak_mib"]) for r in results},
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
