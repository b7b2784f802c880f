"""Issue 30 item 2: ``POST /v1/search`` with ``corpus`` on the embed service (real bundle, real ONNX Runtime
session, a corpus embedded with the same bundle): an image finds its own path first, bad input is a 4xx, and
another API key cannot search the corpus."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from excb.inference.onnx_runtime import load_bundle
from services.common.auth import hash_key
from services.corpus.parts import corpus_dir
from services.embed.app import create_app
from services.embed.manifest import record_model
from services.settings import EmbedSettings, Settings
from support.corpus import curation_bundle, digits_folder, embed_corpus

A = {"Authorization": "Bearer alpha-secret"}
B = {"Authorization": "Bearer beta-secret"}
A_ID = "key-" + hash_key("alpha-secret")[:16]
FAST = EmbedSettings(max_delay_ms=1.0, warmup=False)


class Setup:
    def __init__(self, root: Path) -> None:
        self.models = root / "models"
        shutil.copytree(curation_bundle(), self.models / "m-cur")
        self.files = [p for p, _ in digits_folder(root / "data", [20] * 10)]
        (root / "data" / "broken.png").write_bytes(b"\x89PNG but not")
        self.paths = self.files + [str(root / "data" / "broken.png")]
        self.home = root / "home"
        self.settings = Settings(home=self.home, models_dir=self.models, embed=FAST)
        self.corpus = embed_corpus(self.models / "m-cur", self.paths, corpus_dir(self.settings, "c1"), job_id="c1",
                                   model_id="m-cur", owner=None, chunk=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("cs"))


@pytest.fixture(scope="module")
def client(setup: Setup) -> TestClient:
    with TestClient(create_app(setup.settings)) as c:
        yield c


def _uri(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def test_an_image_finds_its_own_path_first(client: TestClient, setup: Setup) -> None:
    for path in setup.files[::23]:
        r = client.post("/v1/search", json={"corpus": "c1", "image": _uri(path), "k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["corpus"] == "c1" and body["model"] == "m-cur" and body["indexed"] == len(setup.files)
        assert body["data"][0]["path"] == path and body["data"][0]["score"] == pytest.approx(1.0, abs=1e-3)
        assert body["data"][0]["row"] == setup.paths.index(path)
        scores = [d["score"] for d in body["data"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 5
    path = setup.files[7]
    multipart = client.post("/v1/search", files={"file": ("q.png", Path(path).read_bytes(), "image/png")},
                            data={"corpus": "c1", "k": "3", "thumbs": "true"})
    assert multipart.status_code == 200, multipart.text
    first = multipart.json()["data"][0]
    assert first["path"] == path and first["thumbnail"].startswith("data:image/jpeg;base64,")


def test_search_by_corpus_row(client: TestClient, setup: Setup) -> None:
    by_row = client.post("/v1/search", json={"corpus": "c1", "image_id": 12, "k": 4}).json()
    assert by_row["query"]["row"] == 12 and 12 not in [d["row"] for d in by_row["data"]] and len(by_row["data"]) == 4
    with_self = client.post("/v1/search", json={"corpus": "c1", "image_id": 12, "k": 4, "exclude_self": False}).json()
    assert with_self["data"][0]["row"] == 12 and with_self["data"][0]["path"] == setup.paths[12]


@pytest.mark.parametrize("body,status,etype", [
    ({"corpus": "nope", "image_id": 1}, 404, "not_found"),
    ({"corpus": "../c1", "image_id": 1}, 422, "validation_error"),
    ({"corpus": "c1", "image_id": 1, "model": "m-cur"}, 422, "validation_error"),
    ({"corpus": "c1", "image_id": 1, "index": "small"}, 422, "validation_error"),
    ({"corpus": "c1", "image_id": 200}, 404, "not_found"),   # the broken file: a row without an embedding
    ({"corpus": "c1", "image_id": 999}, 404, "not_found"),
    ({"corpus": "c1", "image_id": 1, "k": 101}, 422, "validation_error"),
    ({"corpus": "c1"}, 422, "validation_error"),
    ({"corpus": "c1", "image": "abcde"}, 422, "invalid_input"),
    ({"corpus": "x" * 65, "image_id": 1}, 422, "validation_error"),
])
def test_bad_corpus_searches_are_4xx(client: TestClient, body: dict, status: int, etype: str) -> None:
    r = client.post("/v1/search", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == etype


def test_a_large_corpus_without_an_index_is_a_409(setup: Setup, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import services.corpus.search as search

    monkeypatch.setattr(search, "EXACT_MAX", 50)  # this corpus (201 rows) counts as large: no build in a request
    settings = Settings(home=tmp_path / "home", models_dir=setup.models, embed=FAST)
    shutil.copytree(setup.corpus, corpus_dir(settings, "c2"), ignore=shutil.ignore_patterns("index"))
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/search", json={"corpus": "c2", "image_id": 1})
    assert r.status_code == 409 and r.json()["error"]["type"] == "index_not_built"
    assert "excb corpus index c2" in r.json()["error"]["message"]


def test_another_key_cannot_search_my_corpus(setup: Setup, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("alpha-secret\nbeta-secret\n")
    models = tmp_path / "models"
    shutil.copytree(setup.models / "m-cur", models / "m-cur")
    record_model(models, "m-cur", load_bundle(models / "m-cur").sha256, owner=A_ID)
    settings = Settings(home=tmp_path / "home", models_dir=models, api_keys_file=keys, embed=FAST,
                        data_roots=[Path(setup.files[0]).parents[1]])
    outside = tmp_path / "outside" / "x.png"  # a row whose file no longer lies in a data root (a swapped link)
    outside.parent.mkdir()
    shutil.copy(setup.files[5], outside)
    embed_corpus(models / "m-cur", setup.paths[:40] + [str(outside)], corpus_dir(settings, "mine"), job_id="mine",
                 model_id="m-cur", owner=A_ID)
    with TestClient(create_app(settings)) as c:
        mine = c.post("/v1/search", json={"corpus": "mine", "image": _uri(setup.files[3])}, headers=A)
        assert mine.status_code == 200, mine.text
        root = Path(setup.files[0]).parents[1]
        assert mine.json()["data"][0]["path"] == Path(setup.files[3]).relative_to(root).as_posix()  # not absolute
        hits = c.post("/v1/search", json={"corpus": "mine", "image_id": 40, "k": 3, "exclude_self": False,
                                          "thumbs": True}, headers=A).json()["data"]
        by_row = {h["row"]: h for h in hits}
        assert by_row[40]["thumbnail"] is None and by_row[40]["path"] == "x.png"  # not read, name only
        assert by_row[5]["thumbnail"].startswith("data:image/jpeg;base64,")  # the same image inside the root
        for body in ({"corpus": "mine", "image": _uri(setup.files[3])}, {"corpus": "mine", "image_id": 1}):
            other = c.post("/v1/search", json=body, headers=B)
            assert other.status_code == 404 and other.json()["error"]["type"] == "not_found", other.text
            assert "mine" in other.json()["error"]["message"]  # the same answer as for a corpus that is not there
            assert c.post("/v1/search", json=body).status_code == 401
