"""Issue 30 items 2-3 on the control plane: /v1/corpora/{id}/index, /dedup, /subset and /subsets/{name}, and
``POST /v1/search`` with ``corpus`` from the compose-shaped plane (no embed service: search by corpus row), with
two API keys: the owner's key works, the other key gets 404s, no key a 401, bad bodies 422s."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from excb.data.datasets import build_dataset
from services.common.auth import hash_key
from services.corpus.parts import corpus_dir
from services.settings import EmbedSettings, Settings
from support.corpus import curation_bundle, digits_folder, embed_corpus, planted_copies

A = {"Authorization": "Bearer alpha-secret"}
B = {"Authorization": "Bearer beta-secret"}
A_ID = "key-" + hash_key("alpha-secret")[:16]
COPIES = 6


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, Path, list[tuple[str, str]]]:
    from services.api.app import create_app as create_plane
    from services.db import models as model_store
    from services.db.session import Database
    from services.db.tables import ModelRow

    root = tmp_path_factory.mktemp("cr")
    data = root / "data"
    files = [p for p, _ in digits_folder(data / "digits", [15] * 10)]
    copies = planted_copies(files, data / "copies", COPIES, stride=20)
    keys = root / "keys"
    keys.write_text("alpha-secret\nbeta-secret\n")
    models = root / "models"
    shutil.copytree(curation_bundle(), models / "m-cur")
    settings = Settings(home=root / "home", models_dir=models, api_keys_file=keys, data_roots=[data],
                        embed=EmbedSettings(max_delay_ms=1.0, warmup=False))
    embed_corpus(models / "m-cur", files + [d for _, d in copies], corpus_dir(settings, "c1"), job_id="c1",
                 model_id="m-cur", owner=A_ID)
    db = Database(f"sqlite:///{root / 'db.sqlite'}")
    meta = json.loads((models / "m-cur" / "model.json").read_text())
    model_store.add_model(db, ModelRow(id="m-cur", job_id=None, owner=A_ID, status="READY",
                                       bundle_dir=str(models / "m-cur"), sha256=meta["sha256"], model_json=meta))
    from services.db import jobs as job_store

    job_store.create_job(db, job_id="c1", client_id="my-corpus", owner=A_ID, idempotency_key=None, name=None,
                         config={"kind": "embed"}, request={}, run_dir=str(corpus_dir(settings, "c1").parent),
                         max_attempts=1)
    with TestClient(create_plane(settings, db=db, reaper=False)) as c:
        yield c, corpus_dir(settings, "c1"), copies


def test_index_dedup_and_subset_for_the_owner(plane: tuple[TestClient, Path, list[tuple[str, str]]]) -> None:
    c, root, copies = plane
    before = c.get("/v1/corpora/c1/index", headers=A)
    assert before.status_code == 200 and before.json()["ready"] is False
    built = c.post("/v1/corpora/c1/index", headers=A)
    assert built.status_code == 200, built.text
    assert built.json()["meta"]["index_type"] == "IndexFlatIP" and built.json()["meta"]["count"] == 150 + COPIES
    assert c.get("/v1/corpora/c1/index", headers=A).json()["ready"] is True

    dup = c.post("/v1/corpora/c1/dedup", json={"threshold": 0.95, "sample": 3, "thumbs": True}, headers=A)
    assert dup.status_code == 200, dup.text
    body = dup.json()
    groups = [{s["path"] for s in g["sample"]} for g in body["data"]]
    data_root = Path(copies[0][1]).parents[1]
    planted = [{Path(a).relative_to(data_root).as_posix(), Path(b).relative_to(data_root).as_posix()}
               for a, b in copies]
    assert all(any(p <= g for g in groups) for p in planted), (groups, planted)  # every copy with its original
    assert body["groups"] <= COPIES + 1 and body["removable"] >= COPIES
    assert all(s["thumbnail"].startswith("data:image/jpeg;base64,") for g in body["data"] for s in g["sample"])

    sub = c.post("/v1/corpora/c1/subset", json={"n": 40, "strategy": "diverse", "name": "forty", "preview": 5},
                 headers=A)
    assert sub.status_code == 200, sub.text
    s = sub.json()
    assert s["count"] == 40 and len(s["preview"]) == 5 and s["per_cluster_max"] - s["per_cluster_min"] <= 1 or \
        any(cl["taken"] == cl["size"] for cl in s["clusters"])
    assert sum(cl["taken"] for cl in s["clusters"]) == 40
    assert s["source"] == "list:runs/c1/corpus/subsets/forty.txt"  # the server path hidden with keys
    listing = root / "subsets" / "forty.txt"
    ds = build_dataset(f"list:{listing}", split="all", labelled=False)
    assert len(ds) == 40 and all(Path(ds.path(i)).is_file() for i in range(40))
    download = c.get("/v1/corpora/c1/subsets/forty", headers=A)
    assert download.status_code == 200
    lines = [ln for ln in download.text.splitlines() if not ln.startswith("#")]
    assert len(lines) == 40 and all(not ln.startswith("/") for ln in lines)  # relative to the data root

    by_row = c.post("/v1/search", json={"corpus": "c1", "image_id": 3, "k": 3, "exclude_self": False}, headers=A)
    assert by_row.status_code == 200, by_row.text
    assert by_row.json()["data"][0]["row"] == 3
    png = "data:image/png;base64," + base64.b64encode(Path(copies[0][0]).read_bytes()).decode()
    upload = c.post("/v1/search", json={"corpus": "c1", "image": png}, headers=A)
    assert upload.status_code == 503 and "embed service" in upload.json()["error"]["message"]  # no session here


@pytest.mark.parametrize("method,path,body", [
    ("get", "/v1/corpora/c1/index", None),
    ("post", "/v1/corpora/c1/index", None),
    ("post", "/v1/corpora/c1/dedup", {}),
    ("post", "/v1/corpora/c1/subset", {"n": 5}),
    ("get", "/v1/corpora/c1/subsets/forty", None),
    ("post", "/v1/search", {"corpus": "c1", "image_id": 1}),
])
def test_another_key_gets_404_and_no_key_401(plane: tuple[TestClient, Path, list[tuple[str, str]]], method: str,
                                             path: str, body: dict | None) -> None:
    c = plane[0]
    other = c.request(method.upper(), path, json=body, headers=B)
    assert other.status_code == 404 and other.json()["error"]["type"] == "not_found", other.text
    assert c.request(method.upper(), path, json=body).status_code == 401


@pytest.mark.parametrize("method,path,body,status", [
    ("post", "/v1/corpora/c1/dedup", {"threshold": 1.5}, 422),
    ("post", "/v1/corpora/c1/dedup", {"threshold": 0.9, "extra": 1}, 422),
    ("post", "/v1/corpora/c1/dedup", {"neighbours": 0}, 422),
    ("post", "/v1/corpora/c1/subset", {"n": 0}, 422),
    ("post", "/v1/corpora/c1/subset", {}, 422),
    ("post", "/v1/corpora/c1/subset", {"n": 5, "strategy": "random"}, 422),
    ("post", "/v1/corpora/c1/subset", {"n": 5, "name": "../x"}, 422),
    ("get", "/v1/corpora/c1/subsets/nope", None, 404),
    ("get", "/v1/corpora/c1/subsets/-x", None, 422),
    ("post", "/v1/corpora/nope/dedup", {}, 404),
    ("post", "/v1/corpora/bad%20id/dedup", {}, 422),
])
def test_bad_curation_input_is_4xx(plane: tuple[TestClient, Path, list[tuple[str, str]]], method: str, path: str,
                                   body: dict | None, status: int) -> None:
    r = plane[0].request(method.upper(), path, json=body, headers=A)
    assert r.status_code == status, r.text


def test_the_owner_may_name_the_corpus_by_its_client_job_id(
        plane: tuple[TestClient, Path, list[tuple[str, str]]]) -> None:
    c = plane[0]
    info = c.get("/v1/corpora/my-corpus/index", headers=A)
    assert info.status_code == 200 and info.json()["server_id"] == "c1" and info.json()["corpus"] == "my-corpus"
    hits = c.post("/v1/search", json={"corpus": "my-corpus", "image_id": 2, "k": 2, "exclude_self": False}, headers=A)
    assert hits.status_code == 200 and hits.json()["data"][0]["row"] == 2, hits.text
    assert c.post("/v1/corpora/my-corpus/subset", json={"n": 3}, headers=A).json()["count"] == 3
    for method, path, body in [("get", "/v1/corpora/my-corpus/index", None),
                               ("post", "/v1/search", {"corpus": "my-corpus", "image_id": 2})]:
        other = c.request(method.upper(), path, json=body, headers=B)  # B's namespace of client ids has none
        assert other.status_code == 404, other.text
