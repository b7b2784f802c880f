"""Issue 20: the image index of a model and the routes that read it (POST /v1/search, GET .../clusters...).

A real bundle (the shared 6-step digits run of support/embed.py) indexes the 1797 sklearn digits with the real
build (`excb index build` code path, faiss); the embed app then answers searches and cluster pages, including
bad input (unknown ids, another key's model, a decompression bomb as the query) with 4xx, never 5xx.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from excb.inference.onnx_runtime import load_bundle
from services.common.auth import hash_key
from services.embed.app import create_app
from services.embed.manifest import record_model
from services.index.build import build_index, sample_indices
from services.index.store import IndexCache, index_root
from services.settings import EmbedSettings, Settings
from support import embed as es
from support.embed import png_bomb

A = {"Authorization": "Bearer alpha-secret"}
B = {"Authorization": "Bearer beta-secret"}
A_ID = "key-" + hash_key("alpha-secret")[:16]
B_ID = "key-" + hash_key("beta-secret")[:16]
FAST = EmbedSettings(max_delay_ms=1.0, warmup=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """m-a (indexed: all 1797 digits, and a 300-image sample named 'small'), m-b (no index)."""
    d = tmp_path_factory.mktemp("ix") / "models"
    shutil.copytree(es.bundle(), d / "m-a")
    shutil.copytree(es.second_bundle(), d / "m-b")
    build_index(d / "m-a", "digits", index_root(d, "m-a"), model_id="m-a", split="all")
    build_index(d / "m-a", "digits", index_root(d, "m-a", "small"), model_id="m-a", split="all", sample=300, seed=3)
    return d


@pytest.fixture(scope="module")
def client(models: Path, tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    s = Settings(home=tmp_path_factory.mktemp("h"), models_dir=models, embed=FAST)
    with TestClient(create_app(s)) as c:
        yield c


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_index_holds_every_image_with_its_clusters(models: Path) -> None:
    idx = IndexCache(models).get("m-a")
    bundle = load_bundle(models / "m-a")
    assert idx.count == 1797 and idx.meta["index_type"] == "IndexFlatIP" and idx.meta["sample_cap"] == 10_000
    assert idx.meta["model_sha256"] == bundle.sha256 and idx.faiss.ntotal == 1797
    assert set(np.unique(idx.cluster)) <= set(range(bundle.num_clusters))
    assert idx.label(0) == "0" and idx.source(5) == "digits:all:5"
    assert idx.thumbnail(0)[:3] == b"\xff\xd8\xff"  # a JPEG
    v = idx.vector(0)
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-4)
    small = IndexCache(models).get("m-a", "small")
    assert small.count == 300 and [small.source(i) for i in range(3)] == \
        [f"digits:all:{i}" for i in sample_indices(1797, 300, 3)[:3]]


def test_rebuild_is_atomic_and_replaces_the_version(models: Path, tmp_path: Path) -> None:
    d = tmp_path / "models"
    shutil.copytree(models / "m-a", d / "m-a")
    root = index_root(d, "m-a")
    build_index(d / "m-a", "digits", root, model_id="m-a", split="test", sample=50)
    first = IndexCache(d).get("m-a")
    build_index(d / "m-a", "digits", root, model_id="m-a", split="test", sample=40)
    cache = IndexCache(d)
    second = cache.get("m-a")
    assert (first.count, second.count) == (50, 40) and first.version != second.version
    versions = [p.name for p in root.iterdir() if p.is_dir()]
    assert versions == [second.version]  # the old version is gone, no temp directory is left
    assert first.thumbnail(3)  # a reader that loaded the old version keeps working


def test_search_by_upload_data_uri_and_image_id(client: TestClient) -> None:
    png = es.digit_png(3)
    by_json = client.post("/v1/search", json={"model": "m-a", "image": _b64(png), "k": 7, "thumbs": True})
    assert by_json.status_code == 200, by_json.text
    body = by_json.json()
    assert body["model"] == "m-a" and body["indexed"] == 1797 and len(body["data"]) == 7
    scores = [r["score"] for r in body["data"]]
    assert scores == sorted(scores, reverse=True) and all(-1.001 <= s <= 1.001 for s in scores)
    assert body["data"][0]["thumbnail"].startswith("data:image/jpeg;base64,")
    assert 0 <= body["query"]["cluster"] < 32
    emb = client.post("/v1/embed", json={"input": _b64(png), "model": "m-a"}).json()["data"][0]
    assert body["query"]["cluster"] == emb["balanced_cluster"]["id"]  # the service's own assignment
    multipart = client.post("/v1/search", files={"file": ("q.png", png, "image/png")}, data={"model": "m-a", "k": "7"})
    assert multipart.status_code == 200
    assert [r["id"] for r in multipart.json()["data"]] == [r["id"] for r in body["data"]]
    by_id = client.post("/v1/search", json={"model": "m-a", "image_id": 10, "k": 5}).json()
    assert by_id["query"]["image_id"] == 10 and 10 not in [r["id"] for r in by_id["data"]]
    with_self = client.post("/v1/search", json={"model": "m-a", "image_id": 10, "k": 5, "exclude_self": False}).json()
    assert with_self["data"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # itself (or an identical vector)
    assert with_self["data"][0]["score"] >= by_id["data"][0]["score"]
    latest = client.post("/v1/search", json={"image_id": 10, "index": "small", "model": "m-a"})
    assert latest.status_code == 200 and latest.json()["indexed"] == 300


def test_cluster_routes_agree_with_the_index(client: TestClient, models: Path) -> None:
    idx = IndexCache(models).get("m-a")
    listing = client.get("/v1/models/m-a/clusters", params={"typical": 4, "thumbs": True}).json()
    assert listing["num_clusters"] == 32 and len(listing["data"]) == 32
    sizes = [c["size"] for c in listing["data"]]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == 1797
    assert listing["empty"] == sizes.count(0)
    for entry in listing["data"]:
        assert entry["size"] == int((idx.cluster == entry["id"]).sum())
        assert entry["relative_size"] == pytest.approx(entry["size"] * 32 / 1797, abs=1e-3)
        assert len(entry["typical"]) == min(4, entry["size"])
        assert all(t["cluster"] == entry["id"] and t["thumbnail"].startswith("data:") for t in entry["typical"])
        assert entry["status"] == ("empty" if entry["size"] == 0 else
                                   "over-full" if entry["relative_size"] >= 2 else "ok")
    big = listing["data"][0]
    one = client.get(f"/v1/models/m-a/clusters/{big['id']}", params={"nearest": 10, "edge": 3}).json()
    assert one["size"] == big["size"] and len(one["nearest"]) == min(10, big["size"])
    assert all(m["cluster"] == big["id"] for m in one["nearest"] + one["edge"])
    sims = [m["similarity"] for m in one["nearest"]]
    assert sims == sorted(sims, reverse=True)
    assert all(e["similarity"] <= sims[-1] for e in one["edge"])  # the edge is the far end
    raw = client.get(f"/v1/models/m-a/clusters/{big['id']}", params={"assignment": "raw"}).json()
    assert all(m["raw_cluster"] == big["id"] for m in raw["nearest"])
    img = client.get("/v1/models/m-a/index/images/7/thumbnail")
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg" and img.content == idx.thumbnail(7)
    info = client.get("/v1/models/m-a/index").json()
    assert info["ready"] and info["meta"]["count"] == 1797 and info["status"]["state"] == "succeeded"


@pytest.mark.parametrize("method,path,body,status,etype", [
    ("post", "/v1/search", {"model": "nope", "image_id": 1}, 404, "not_found"),
    ("post", "/v1/search", {"model": "m-b", "image_id": 1}, 404, "index_not_found"),
    ("post", "/v1/search", {"model": "m-a", "image_id": 1797}, 404, "not_found"),
    ("post", "/v1/search", {"model": "m-a", "image_id": 1, "index": "../x"}, 422, "validation_error"),
    ("post", "/v1/search", {"model": "m-a", "image_id": 1, "index": "missing"}, 404, "index_not_found"),
    ("post", "/v1/search", {"model": "m-a", "image_id": 1, "k": 101}, 422, "validation_error"),
    ("post", "/v1/search", {"model": "m-a", "image_id": -1}, 422, "validation_error"),
    ("post", "/v1/search", {"model": "m-a"}, 422, "validation_error"),
    ("post", "/v1/search", {"model": "m-a", "image_id": 1, "image": "AAAA"}, 422, "validation_error"),
    ("post", "/v1/search", {"model": "m-a", "image": "abcde"}, 422, "invalid_input"),
    ("post", "/v1/search", {"model": "m-a", "image": "not base64!"}, 422, "path_not_allowed"),  # names a path
    ("post", "/v1/search", {"model": "m-a", "image": base64.b64encode(b"plain text").decode()}, 415, None),
    ("post", "/v1/search", {"model": "m-a", "image": _b64(png_bomb())}, 413, "too_many_pixels"),
    ("get", "/v1/models/m-a/clusters/32", None, 404, "not_found"),
    ("get", "/v1/models/m-a/clusters/-1", None, 404, "not_found"),
    ("get", "/v1/models/nope/clusters/0", None, 404, "not_found"),
    ("get", "/v1/models/m-b/clusters", None, 404, "index_not_found"),
    ("get", "/v1/models/m-a/clusters?limit=100000", None, 422, "validation_error"),
    ("get", "/v1/models/m-a/index/images/99999/thumbnail", None, 404, "not_found"),
])
def test_bad_input_is_4xx(client: TestClient, method: str, path: str, body: dict | None, status: int,
                          etype: str | None) -> None:
    r = client.post(path, json=body) if method == "post" else client.get(path)
    assert r.status_code == status, r.text
    if etype:
        assert r.json()["error"]["type"] == etype


def test_bomb_upload_and_bad_bodies_are_4xx(client: TestClient) -> None:
    r = client.post("/v1/search", files={"file": ("b.png", png_bomb(), "image/png")}, data={"model": "m-a"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "too_many_pixels"
    two = client.post("/v1/search", files=[("file", ("a.png", es.digit_png(), "image/png")),
                                           ("file", ("b.png", es.digit_png(), "image/png"))], data={"model": "m-a"})
    assert two.status_code in (400, 413)
    assert client.post("/v1/search", content=b"{", headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/v1/search", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/v1/search", content=json.dumps([1]), headers={"content-type": "application/json"}
                       ).status_code == 422


def test_one_key_never_sees_another_keys_index(models: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("alpha-secret\nbeta-secret\n")
    record_model(models, "m-a", load_bundle(models / "m-a").sha256, owner=A_ID)
    record_model(models, "m-b", load_bundle(models / "m-b").sha256, owner=B_ID)
    s = Settings(home=tmp_path, models_dir=models, api_keys_file=keys, embed=FAST)
    try:
        with TestClient(create_app(s)) as c:
            assert c.post("/v1/search", json={"model": "m-a", "image_id": 1}, headers=A).status_code == 200
            for method, path, body in [("post", "/v1/search", {"model": "m-a", "image_id": 1}),
                                       ("get", "/v1/models/m-a/clusters", None),
                                       ("get", "/v1/models/m-a/clusters/0", None),
                                       ("get", "/v1/models/m-a/index", None),
                                       ("get", "/v1/models/m-a/index/images/1/thumbnail", None)]:
                r = c.post(path, json=body, headers=B) if method == "post" else c.get(path, headers=B)
                assert r.status_code == 404, (path, r.text)  # like a model that does not exist
                r = c.post(path, json=body) if method == "post" else c.get(path)
                assert r.status_code == 401, path
            # B's default model is m-b, which has no index: a search without a model says so, never shows m-a's
            r = c.post("/v1/search", json={"image_id": 1}, headers=B)
            assert r.status_code == 404 and r.json()["error"]["type"] == "index_not_found"
    finally:
        (models / "manifest.json").unlink()


def _control_plane(models: Path, tmp_path: Path, home: Path, data: Path) -> TestClient:
    """The compose-shaped control plane (two keys, one data root) over the shared models folder, with A's m-a."""
    from services.api.app import create_app as create_plane
    from services.db import models as model_store
    from services.db.session import Database
    from services.db.tables import ModelRow

    keys = tmp_path / "keys"
    keys.write_text("alpha-secret\nbeta-secret\n")
    s = Settings(home=home, models_dir=models, api_keys_file=keys, data_roots=[data], embed=FAST)
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    meta = json.loads((models / "m-a" / "model.json").read_text())
    model_store.add_model(db, ModelRow(id="m-a", job_id=None, owner=A_ID, status="READY",
                                             bundle_dir=str(models / "m-a"), sha256=meta["sha256"], model_json=meta))
    return TestClient(create_plane(s, db=db, reaper=False))


def test_control_plane_serves_the_index_without_an_embed_service(models: Path, tmp_path: Path) -> None:
    """The compose shape: the API (dashboard origin) is not embedded, embed replicas run elsewhere, all share the
    models volume. The API answers the gallery's routes from the index and its DB rows (ownership as for models),
    refuses upload searches with a 503 that names the embed service, and queues folder builds."""
    data = tmp_path / "data"
    (data / "sevens").mkdir(parents=True)
    with _control_plane(models, tmp_path, tmp_path / "home", data) as c:
        listing = c.get("/v1/models/m-a/clusters", params={"typical": 2, "thumbs": True}, headers=A)
        assert listing.status_code == 200 and listing.json()["indexed"] == 1797
        assert listing.json()["served_assignments"] == 0
        assert c.get("/v1/models/m-a/clusters/0", headers=A).status_code == 200
        hits = c.post("/v1/search", json={"model": "m-a", "image_id": 4, "k": 3}, headers=A)
        assert hits.status_code == 200 and len(hits.json()["data"]) == 3
        assert c.get("/v1/models/m-a/index/images/4/thumbnail", headers=A).content[:3] == b"\xff\xd8\xff"
        upload = c.post("/v1/search", json={"model": "m-a", "image": _b64(es.digit_png())}, headers=A)
        assert upload.status_code == 503 and "embed service" in upload.json()["error"]["message"]
        for path in ("/v1/models/m-a/clusters", "/v1/models/m-a/index/images/4/thumbnail"):
            assert c.get(path, headers=B).status_code == 404
        assert c.post("/v1/search", json={"model": "m-a", "image_id": 4}, headers=B).status_code == 404
        # POST /v1/models/{id}/index: the owner queues a folder under the data roots; nothing else is accepted
        build = c.post("/v1/models/m-a/index", json={"source": "sevens", "name": "sevens", "sample": 50}, headers=A)
        assert build.status_code == 202, build.text
        queued = c.get("/v1/models/m-a/index", params={"index": "sevens"}, headers=A).json()["status"]
        assert queued["state"] == "queued"
        again = c.post("/v1/models/m-a/index", json={"source": "sevens", "name": "sevens"}, headers=A)
        assert again.status_code == 409
        for body, status in [({"source": "../../etc"}, 422), ({"source": "/etc"}, 422),
                             ({"source": "sevens", "sample": 10**7}, 422), ({"source": "sevens", "name": "../x"}, 422)]:
            assert c.post("/v1/models/m-a/index", json=body, headers=A).status_code == status, body
        assert c.post("/v1/models/m-a/index", json={"source": "sevens"}, headers=B).status_code == 404
        assert c.post("/v1/models/nope/index", json={"source": "sevens"}, headers=A).status_code == 404


def test_worker_indexes_a_jobs_training_images(models: Path, tmp_path: Path) -> None:
    """After a job: the data section of the run's config.yaml (split, limit) decides what is indexed, capped by
    EXCB_INDEX__SAMPLE; the build runs as `excb index build` in a child and logs into the job's log."""
    import yaml

    from services.index.jobs import index_after_job
    from services.settings import IndexSettings

    d = tmp_path / "models"
    shutil.copytree(models / "m-a", d / "m-a")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"data": {"source": "digits", "split": "test", "limit": 60}}))
    s = Settings(home=tmp_path, models_dir=d, index=IndexSettings(sample=40, seed=5))
    assert index_after_job(s, "m-a", run_dir)
    idx = IndexCache(d).get("m-a")
    assert idx.count == 40 and idx.meta["origin"] == "job" and idx.meta["available"] == 60
    assert idx.meta["split"] == "test" and idx.meta["seed"] == 5
    assert "--- index of m-a (up to 40 images of digits)" in (run_dir / "job.log").read_text()
    off = Settings(home=tmp_path, models_dir=d, index=IndexSettings(after_job=False))
    assert not index_after_job(off, "m-a", run_dir)


def test_an_index_of_photos_decodes_large_jpegs_drafted_like_the_queries(tmp_path: Path) -> None:
    from PIL import Image

    from excb.inference.onnx_runtime import OrtEmbedder
    from services.index.build import _Source

    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    Image.new("RGB", (800, 600), (200, 30, 30)).save(folder / "cats" / "big.jpg", "JPEG")
    Image.new("RGB", (800, 600), (30, 200, 30)).save(folder / "cats" / "big.png")
    side = OrtEmbedder(load_bundle(es.bundle()), intra_op_threads=1).decode_min_side  # 4 x 16 px
    drafted = _Source(str(folder), "all", None, side)
    sizes = {drafted.name(i): drafted.image(i).size for i in range(len(drafted))}
    assert sizes == {"cats/big.jpg": (100, 75), "cats/big.png": (800, 600)}  # 1/8 keeps 75 >= 64; PNG whole
    whole = _Source(str(folder), "all", None)
    assert {whole.image(i).size for i in range(len(whole))} == {(800, 600)}
    meta = build_index(es.bundle(), str(folder), tmp_path / "ix", model_id="m-a")
    assert meta["count"] == 2


def test_an_index_source_in_the_servers_home_must_be_the_callers_own_run(models: Path, tmp_path: Path) -> None:
    """``excb up --data-root .``: the home lies inside the data root. An index build may read the caller's own
    run dirs, never another key's run or the models folder (issue 33 item 1: any field naming a run)."""
    data = tmp_path / "data"
    theirs = data / ".excb" / "runs" / "j-0123456789abcdef" / "imgs" / "c0"
    theirs.mkdir(parents=True)
    (theirs / "a.png").write_bytes(es.digit_png())
    (data / "sevens").mkdir(parents=True)
    with _control_plane(models, tmp_path, data / ".excb", data) as c:
        for source in (".excb/runs/j-0123456789abcdef/imgs", str(theirs.parent)):
            r = c.post("/v1/models/m-a/index", json={"source": source, "name": "stolen"}, headers=A)
            assert r.status_code == 404 and r.json()["error"]["field"] == "data.source", r.text
        r = c.post("/v1/models/m-a/index", json={"source": "sevens", "name": "own-folder"}, headers=A)
        assert r.status_code == 202, r.text


def test_current_names_only_a_version_directory(tmp_path: Path) -> None:
    """Both indexes (a model's sample index, a corpus index) open only what ``CURRENT`` names as a version: a
    missing or unreadable file, or one naming a path outside, reads as no index."""
    from services.index.store import CURRENT_FILE, read_current

    assert read_current(tmp_path) is None
    for text, expected in (('{"version": "v-20261206T000000-ab12cd34"}', "v-20261206T000000-ab12cd34"),
                           ('{"version": "../../etc"}', None), ('{"version": "v-a/b"}', None),
                           ('{"version": ".v-tmp"}', None), ('{"version": 3}', None), ("not json", None), ("{}", None)):
        (tmp_path / CURRENT_FILE).write_text(text)
        assert read_current(tmp_path) == expected, text
