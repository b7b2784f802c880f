"""Corpus embedding jobs (services/corpus) end to end: real Redis, real Celery worker processes, a real job store
and a real ONNX bundle (support/embed.py's second bundle: exported, parity-checked, untrained weights).

What must hold: every image of the source is in exactly one part exactly once after a worker is killed with
SIGKILL mid-chunk and every chunk message is delivered a second time; undecodable files are counted rows, not a
failure; cancel stops the job and a retry resumes it without embedding finished chunks again; bad input is a 4xx;
another key can neither use my model nor see my corpus job.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.common.auth import hash_key
from support import HANG_GUARD_S
from support.corpus import noise_images

pytestmark = [pytest.mark.integration, pytest.mark.slow]

A = {"Authorization": "Bearer alpha-secret"}
B = {"Authorization": "Bearer beta-secret"}
A_ID = "key-" + hash_key("alpha-secret")[:16]
BAD = 5  # undecodable files in every corpus


def _keys(tmp_path: Path) -> Path:
    keys = tmp_path / "keys.txt"
    keys.write_text("alpha-secret\nbeta-secret\n")
    return keys


def _images(folder: Path, n: int, bad: int = BAD) -> set[str]:
    """``n`` small PNGs in two sub-folders plus ``bad`` files that are not images; returns every path."""
    return noise_images(folder, n, bad)


def _model(stack: Any, owner: str) -> str:
    """Register the shared test bundle as ``owner``'s model ``m-a`` (what a finished training job would do)."""
    from services.db.tables import ModelRow
    from support import embed as es

    bundle = es.second_bundle()
    meta = json.loads((bundle / "model.json").read_text())
    with stack.app.state.plane.db.session() as s:
        s.add(ModelRow(id="m-a", job_id=None, owner=owner, status="READY", bundle_dir=str(bundle),
                       sha256=meta["sha256"], model_json=meta))
    return "m-a"


def _rows(root: Path) -> list[dict[str, Any]]:
    from services.corpus.parts import read_parts

    return [row for table in read_parts(root) for row in table.to_pylist()]


def _check_exactly_once(root: Path, expected: set[str]) -> None:
    rows = _rows(root)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "an image appears twice"
    assert set(paths) == expected
    bad = [r for r in rows if r["error"] is not None]
    assert len(bad) == BAD and all(r["embedding"] is None and "broken" in r["path"] for r in bad)
    good = [r for r in rows if r["error"] is None]
    norms = np.linalg.norm(np.array([r["embedding"] for r in good]), axis=1)
    # L2-normalised; the untrained test network maps a few noise images to the zero vector, which stays zero
    assert np.all(np.isclose(norms, 1.0, atol=1e-4) | (norms == 0)) and np.mean(norms > 0) > 0.9
    assert all(r["cluster"] is not None and r["balanced_cluster"] is not None for r in good)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["owner"] == A_ID
    assert all(c["status"] == "done" for c in manifest["chunks"])
    assert sum(c["items"] for c in manifest["chunks"]) == len(expected)
    # the job ends with its search index built over exactly those embeddings
    from services.corpus.index import CorpusIndex, current_version

    version = current_version(root)
    assert version is not None
    index = CorpusIndex(root, version)
    assert index.count == len(good) and not index.stale()


def _holder_pid(db: Any, job_id: str, root: Path, coordinator: bool) -> int:
    """The pid of a worker that holds a claim on an unfinished chunk: the job's coordinator (its lease owner)
    or a helper (any other worker)."""
    from services.db import jobs as store

    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        row = store.get_job(db, job_id)
        owner = row.lease_owner if row is not None else None
        for claim in (root / "claims").glob("0*") if (root / "claims").is_dir() else []:
            try:
                holder = claim.read_text().split()[0]
            except (OSError, IndexError):
                continue
            if owner and (holder == owner) == coordinator and not (root / "done" / f"{claim.name}.json").exists():
                return int(holder.rsplit(":", 1)[1])
        time.sleep(0.02)
    raise AssertionError(f"no {'coordinator' if coordinator else 'helper'} claim seen on {job_id}")


def _submit(c: Any, **body: Any) -> dict[str, Any]:
    r = c.post("/v1/jobs", json={"kind": "embed", "model": "m-a", "source": "imgs", **body}, headers=A)
    assert r.status_code == 201, r.text
    return r.json()


def _wait(stack: Any, job_id: str, check: Any) -> dict[str, Any]:
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        job = stack.client.get(f"/v1/jobs/{job_id}", headers=A).json()
        if check(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"{job_id}: condition not met; last {job}\n{stack.logs(job_id)}")


def _two_workers_on_one_job(redis_url: str, make_stack: Any,
                            tmp_path: Path) -> tuple[Any, dict[str, Any], Path, dict[int, Any], set[str]]:
    """A stack with two workers embedding 1,200 images (plus the broken ones) in 49 chunks: (stack, the job, its
    corpus dir, workers by pid, every path)."""
    stack = make_stack(f"sqlite:///{tmp_path / 'c.sqlite'}", redis_url, api_keys_file=_keys(tmp_path))
    c = stack.start_api()
    _model(stack, A_ID)
    expected = _images(stack.data_root / "imgs", 1200)
    workers = {w.pid: w for w in (stack.start_worker(), stack.start_worker())}
    job = _submit(c, chunk_size=25, batch_size=4)
    return stack, job, stack.home / "runs" / job["id"] / "corpus", workers, expected


def test_exactly_once_through_sigkill_and_redelivery(redis_url: str, make_stack: Any, tmp_path: Path) -> None:
    """Two workers; the coordinator's worker is killed with SIGKILL while it holds a chunk, and every chunk message
    is sent a second time: the surviving worker finishes the job and every image is in exactly one part once."""
    from services.corpus.runner import TASK_EMBED_CHUNK

    stack, job, root, workers, expected = _two_workers_on_one_job(redis_url, make_stack, tmp_path)
    db = stack.app.state.plane.db
    victim = _holder_pid(db, job["id"], root, coordinator=True)
    assert victim in workers, stack.logs(job["id"])
    os.kill(victim, signal.SIGKILL)
    workers[victim].wait()
    manifest = json.loads((root / "manifest.json").read_text())
    for _ in range(2):  # the same chunk task delivered again (twice), whatever state its chunk is in
        for chunk in manifest["chunks"]:
            stack.app.state.plane.celery.send_task(TASK_EMBED_CHUNK, args=[job["id"], chunk["index"]],
                                                   queue=stack.env["EXCB_CELERY_QUEUE"])
    done = _wait(stack, job["id"], lambda j: j["status"] in ("SUCCEEDED", "FAILED"))
    assert done["status"] == "SUCCEEDED", done["error"]
    outcomes = [a["outcome"] for a in done["attempts"]]
    assert outcomes[0] == "worker_lost" and outcomes[-1] == "succeeded", outcomes
    p = done["progress"]
    assert p["chunks_done"] == p["chunks_total"] == len(manifest["chunks"]) == 49
    assert p["images"] == len(expected) and p["errors"] == BAD and p["percent"] == 100.0
    _check_exactly_once(root, expected)


def test_helper_killed_mid_chunk_is_taken_over(redis_url: str, make_stack: Any, tmp_path: Path) -> None:
    """A helper (not the coordinator) dies with SIGKILL holding a chunk: its claim goes stale and the coordinator
    embeds that chunk itself; the job succeeds in its first attempt with every image once."""
    stack, job, root, workers, expected = _two_workers_on_one_job(redis_url, make_stack, tmp_path)
    victim = _holder_pid(stack.app.state.plane.db, job["id"], root, coordinator=False)
    assert victim in workers
    os.kill(victim, signal.SIGKILL)
    workers[victim].wait()
    done = _wait(stack, job["id"], lambda j: j["status"] in ("SUCCEEDED", "FAILED"))
    assert done["status"] == "SUCCEEDED", done["error"]
    assert [a["outcome"] for a in done["attempts"]] == ["succeeded"]
    _check_exactly_once(root, expected)


def test_cancel_then_retry_resumes_without_redoing_chunks(redis_url: str, make_stack: Any, tmp_path: Path) -> None:
    stack = make_stack(f"sqlite:///{tmp_path / 'c.sqlite'}", redis_url, api_keys_file=_keys(tmp_path))
    c = stack.start_api()
    _model(stack, A_ID)
    # enough work that the cancel lands mid-job on a fast idle machine too (a clean-clone CI run embedded 1,500
    # images at batch 2 before its cancel arrived): 301 chunks of single-image batches, seconds even there
    expected = _images(stack.data_root / "imgs", 9000)
    stack.start_worker()
    job = _submit(c, chunk_size=30, batch_size=1)
    root = stack.home / "runs" / job["id"] / "corpus"
    running = _wait(stack, job["id"], lambda j: (j["progress"]["chunks_done"] or 0) >= 2 or j["status"] in
                    ("SUCCEEDED", "FAILED"))
    assert running["status"] == "RUNNING", running
    assert running["progress"]["images_per_second"] > 0 and running["progress"]["chunks_total"] == 301
    assert running["progress"]["eta_seconds"] > 0 and 0 < running["progress"]["percent"] < 100
    assert c.post(f"/v1/jobs/{job['id']}/cancel", headers=B).status_code == 404  # not B's job
    assert c.post(f"/v1/jobs/{job['id']}/cancel", headers=A).status_code == 202
    cancelled = _wait(stack, job["id"], lambda j: j["status"] in ("CANCELLED", "SUCCEEDED", "FAILED"))
    assert cancelled["status"] == "CANCELLED"
    manifest = json.loads((root / "manifest.json").read_text())
    finished = {int(p.stem): p.stat().st_mtime_ns for p in (root / "done").glob("*.json")}
    assert manifest["status"] == "cancelled" and 2 <= len(finished) < 301
    assert sorted(c["index"] for c in manifest["chunks"] if c["status"] == "done") == sorted(finished)
    assert c.post(f"/v1/jobs/{job['id']}/retry", headers=A).status_code == 202
    done = _wait(stack, job["id"], lambda j: j["status"] in ("SUCCEEDED", "FAILED"))
    assert done["status"] == "SUCCEEDED", done["error"]
    again = {int(p.stem): p.stat().st_mtime_ns for p in (root / "done").glob("*.json")}
    assert {i: again[i] for i in finished} == finished  # finished chunks were not embedded again
    assert "already done" in (root.parent / "job.log").read_text()
    _check_exactly_once(root, expected)


def test_worker_shutdown_hands_the_job_back_uncounted(redis_url: str, make_stack: Any, tmp_path: Path) -> None:
    """SIGTERM (a rollout, `docker stop`) to the only worker mid-job: the coordinator stops between batches and
    requeues the job without counting a failure; the next worker resumes it from the committed chunks."""
    stack = make_stack(f"sqlite:///{tmp_path / 'c.sqlite'}", redis_url, api_keys_file=_keys(tmp_path))
    c = stack.start_api()
    _model(stack, A_ID)
    expected = _images(stack.data_root / "imgs", 1500)
    first = stack.start_worker()
    job = _submit(c, chunk_size=30, batch_size=2)
    _wait(stack, job["id"], lambda j: (j["progress"]["chunks_done"] or 0) >= 2)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=HANG_GUARD_S) is not None
    handed = _wait(stack, job["id"], lambda j: j["status"] != "RUNNING")
    assert handed["status"] == "QUEUED" and handed["failures"] == 0, handed
    assert handed["attempts"][0]["outcome"] == "preempted"
    stack.start_worker()
    done = _wait(stack, job["id"], lambda j: j["status"] in ("SUCCEEDED", "FAILED"))
    assert done["status"] == "SUCCEEDED" and done["failures"] == 0, done["error"]
    _check_exactly_once(stack.home / "runs" / job["id"] / "corpus", expected)


def test_a_counted_failure_waits_its_back_off(redis_url: str, make_stack: Any, tmp_path: Path) -> None:
    """A corpus directory the worker cannot write parts into (``parts`` is not a directory) fails every attempt
    in the coordinator (a counted worker_error): the retries wait the same back-off as a trainer's
    (services/worker/retry.py), not milliseconds."""
    from services.db import jobs as store
    from services.db.jobs import CLOCK_SKEW_SECONDS

    base, cap = 2.0, 3.0
    stack = make_stack(f"sqlite:///{tmp_path / 'c.sqlite'}", redis_url, api_keys_file=_keys(tmp_path), max_attempts=3,
                       retry_backoff_seconds=base, retry_backoff_max_seconds=cap)
    c = stack.start_api()
    _model(stack, A_ID)
    _images(stack.data_root / "imgs", 20, bad=0)
    job = _submit(c)
    root = stack.home / "runs" / job["id"] / "corpus"
    root.mkdir(parents=True)
    os.symlink("/dev/null", root / "parts")  # every part write: NotADirectoryError
    stack.start_worker()
    done = _wait(stack, job["id"], lambda j: j["status"] in ("SUCCEEDED", "FAILED"))
    assert done["status"] == "FAILED" and done["error"]["type"] == "worker_error", done["error"]
    attempts = store.attempts(stack.app.state.plane.db, job["id"])
    assert [a.outcome for a in attempts] == ["worker_error"] * 3, [(a.attempt, a.outcome) for a in attempts]
    gaps = [(b.started_at - a.ended_at).total_seconds() for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= base - CLOCK_SKEW_SECONDS and gaps[1] >= cap - CLOCK_SKEW_SECONDS, gaps


def test_a_damaged_model_fails_at_once_naming_the_model(redis_url: str, make_stack: Any, tmp_path: Path) -> None:
    """A model whose ONNX file changed after registration (sha256 no longer matches model.json) is not a bad data
    source and no retry mends it: FAILED on the first attempt as model_unusable."""
    import shutil

    from services.db.tables import ModelRow
    from support import embed as es

    stack = make_stack(f"sqlite:///{tmp_path / 'c.sqlite'}", redis_url, api_keys_file=_keys(tmp_path))
    c = stack.start_api()
    bundle = tmp_path / "damaged-bundle"
    shutil.copytree(es.second_bundle(), bundle)
    (bundle / "model.onnx").write_bytes(b"not an onnx graph")
    meta = json.loads((bundle / "model.json").read_text())
    with stack.app.state.plane.db.session() as s:
        s.add(ModelRow(id="m-a", job_id=None, owner=A_ID, status="READY", bundle_dir=str(bundle),
                       sha256=meta["sha256"], model_json=meta))
    _images(stack.data_root / "imgs", 20, bad=0)
    stack.start_worker()
    job = _submit(c)
    done = _wait(stack, job["id"], lambda j: j["status"] in ("SUCCEEDED", "FAILED"))
    assert done["status"] == "FAILED" and done["error"]["type"] == "model_unusable", done["error"]
    assert "'m-a'" in done["error"]["message"] and "sha256 mismatch" in done["error"]["message"]
    assert done["attempt"] == 1


def test_bad_input_and_other_keys(make_stack: Any, tmp_path: Path) -> None:
    """4xx for bad bodies; another key can neither embed with my model, nor read my run dirs as data, nor see
    or cancel my corpus job. No worker: the jobs stay queued."""
    stack = make_stack(f"sqlite:///{tmp_path / 'c.sqlite'}", None, api_keys_file=_keys(tmp_path),
                       data_roots=json.dumps([str(tmp_path)]), server_paths_in_responses="on")
    c = stack.start_api()
    _model(stack, A_ID)
    _images(stack.data_root / "imgs", 3)
    ok = {"kind": "embed", "model": "m-a", "source": str(stack.data_root / "imgs")}
    for bad, status in [({"chunk_size": 0}, 422), ({"chunk_size": 10**9}, 422), ({"batch_size": "x"}, 422),
                        ({"source": None}, 422), ({"sauce": "x"}, 422), ({"gpus": 1}, 422),
                        ({"overrides": ["a=b"]}, 422), ({"source": "/etc"}, 422), ({"source": "nope"}, 422),
                        ({"model": "m-missing"}, 404), ({"model": ""}, 422), ({"kind": "embedding"}, 422)]:
        r = c.post("/v1/jobs", json={**ok, **bad}, headers=A)
        assert r.status_code == status, (bad, r.text)
        assert r.json()["error"]["type"] in ("validation_error", "path_not_allowed", "not_found"), r.text
    assert c.post("/v1/jobs", json=ok, headers=B).status_code == 404  # A's model
    job = c.post("/v1/jobs", json=ok, headers=A)
    assert job.status_code == 201, job.text
    body = job.json()
    assert body["requested"]["kind"] == "embed" and body["status"] == "QUEUED"
    run = stack.home / "runs" / body["id"]
    (run / "corpus").mkdir(parents=True)
    _images(run / "corpus" / "stolen", 2, bad=0)
    other = c.post("/v1/jobs", json={**ok, "source": str(run / "corpus" / "stolen")}, headers=B)
    assert other.status_code == 404, other.text  # a run dir of A's is no data of B's
    assert c.get(f"/v1/jobs/{body['id']}", headers=B).status_code == 404
    assert c.post(f"/v1/jobs/{body['id']}/cancel", headers=B).status_code == 404
    assert body["id"] not in [j["id"] for j in c.get("/v1/jobs", headers=B).json()["items"]]
    assert c.post(f"/v1/jobs/{body['id']}/cancel", headers=A).json()["status"] == "CANCELLED"
    idem = {"Idempotency-Key": "k1", **A}
    first, second = (c.post("/v1/jobs", json=ok, headers=idem) for _ in range(2))
    assert (first.status_code, second.status_code) == (201, 200) and first.json()["id"] == second.json()["id"]


def test_cli_submits_through_the_control_plane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`excb corpus embed SOURCE --model ID` and `excb corpus status` against a real HTTP control plane (uvicorn;
    no worker, so the job stays queued), with the key as `excb jobs` reads it."""
    from excb.cli import main
    from services.api.app import create_app
    from services.db.session import Database
    from services.db.tables import ModelRow
    from services.settings import Settings, get_settings
    from support import embed as es

    data = tmp_path / "data"
    _images(data / "imgs", 4)
    s = Settings(home=tmp_path / "home", api_keys_file=_keys(tmp_path), data_roots=[data])
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    meta = json.loads((es.second_bundle() / "model.json").read_text())
    with db.session() as session:
        session.add(ModelRow(id="m-a", job_id=None, owner=A_ID, status="READY", bundle_dir=str(es.second_bundle()),
                             sha256=meta["sha256"], model_json=meta))
    with es.UvicornThread(create_app(s, db=db, reaper=False)) as server:
        monkeypatch.setenv("EXCB_API_URL", server.url)
        monkeypatch.setenv("EXCB_API_TOKEN", "alpha-secret")
        get_settings.cache_clear()
        try:
            assert main(["corpus", "embed", "imgs", "--model", "m-a", "--chunk-size", "2"]) == 0
            job_id, status = capsys.readouterr().out.split()[:2]
            assert status == "QUEUED" and job_id.startswith("j-")
            assert main(["corpus", "status", job_id]) == 0
            assert f"{job_id}  QUEUED  not started" in capsys.readouterr().out
            assert main(["corpus", "embed", "imgs", "--model", "m-other"]) == 2
            assert "404 not_found" in capsys.readouterr().err
            monkeypatch.setenv("EXCB_API_TOKEN", "beta-secret")
            get_settings.cache_clear()
            assert main(["corpus", "status", job_id]) == 2  # another key's job: not found
        finally:
            get_settings.cache_clear()
