"""Issue 27 item 4: one way to name data and images, on every route and command.

Before: `excb index build mixed` read ``mixed`` from the current directory (a job reads it from the data root);
``GET /embed?uri=`` refused an absolute path inside the data root and a ``data:`` URI that ``/v1/embeddings``
accepted; ``POST /v1/search`` refused the raw ``image/*`` body ``/v1/embed`` accepted. Now data sets go through
``services.common.paths.resolve_source`` and images through ``services.embed.sources``, whoever asks.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from support import embed as es
from support.services import REPO


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A data root with a folder ``mixed`` of digit images, a file outside it, and a models dir with an index."""
    from services.index.build import build_index
    from services.index.store import index_root

    tmp = tmp_path_factory.mktemp("names")
    root, models = tmp / "data", tmp / "home" / "models"
    for i in range(12):
        (root / "mixed" / str(i % 3)).mkdir(parents=True, exist_ok=True)
        (root / "mixed" / str(i % 3) / f"{i}.png").write_bytes(es.digit_png(i))
    (tmp / "outside.png").write_bytes(es.digit_png(0))
    shutil.copytree(es.bundle(), models / "m")
    build_index(models / "m", "digits", index_root(models, "m"), model_id="m", split="test", sample=60)
    return {"tmp": tmp, "root": root, "models": models, "home": tmp / "home"}


@pytest.fixture(scope="module")
def client(layout: dict[str, Path]) -> TestClient:
    from services.embed.app import create_app
    from services.settings import EmbedSettings, Settings

    settings = Settings(home=layout["home"], data_roots=[layout["root"]], embed=EmbedSettings(max_delay_ms=1))
    with TestClient(create_app(settings)) as c:
        yield c


def _vec(body: dict) -> np.ndarray:
    return np.asarray(body["data"][0]["embedding"], dtype=np.float32)


def test_every_image_route_reads_the_same_names(client: TestClient, layout: dict[str, Path]) -> None:
    png = es.digit_png(4)
    rel = "mixed/1/4.png"
    absolute = str(layout["root"] / rel)
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    reference = client.post("/v1/embed", content=png, headers={"Content-Type": "image/png"})
    assert reference.status_code == 200, reference.text
    ref = _vec(reference.json())
    for name in (rel, absolute, data_uri):  # before: the absolute path and the data URI were 422 here
        r = client.get("/embed", params={"uri": name})
        assert r.status_code == 200, (name, r.text)
        assert np.allclose(_vec(r.json()), ref, atol=1e-5), name
        for route, body in (("/v1/embed", {"input": [name]}), ("/v1/embeddings", {"input": [name]})):
            r = client.post(route, json=body)
            assert r.status_code == 200, (route, name, r.text)
            assert np.allclose(_vec(r.json()), ref, atol=1e-5), (route, name)
    outside = str(layout["tmp"] / "outside.png")
    for name in ("../outside.png", outside):  # the same refusal, with the same type, on every route
        assert client.get("/embed", params={"uri": name}).json()["error"]["type"] == "path_not_allowed"
        assert client.post("/v1/embed", json={"input": [name]}).json()["error"]["type"] == "path_not_allowed"
        assert client.post("/v1/embeddings", json={"input": [name]}).json()["error"]["code"] == "path_not_allowed"
        r = client.post("/v1/search", json={"model": "m", "image": name})
        assert r.status_code == 422 and r.json()["error"]["type"] == "path_not_allowed"


def test_search_takes_the_raw_image_body_as_embed_does(client: TestClient, layout: dict[str, Path]) -> None:
    png = es.digit_png(5)
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    by_json = client.post("/v1/search", json={"model": "m", "image": data_uri, "k": 5})
    assert by_json.status_code == 200, by_json.text
    raw = client.post("/v1/search", params={"model": "m", "k": 5}, content=png, headers={"Content-Type": "image/png"})
    assert raw.status_code == 200, raw.text  # before: 415
    by_path = client.post("/v1/search", json={"model": "m", "image": "mixed/2/5.png", "k": 5})
    assert by_path.status_code == 200, by_path.text
    ids = [[d["id"] for d in r.json()["data"]] for r in (by_json, raw, by_path)]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 5
    assert raw.json()["query"] == by_json.json()["query"]
    empty = client.post("/v1/search", params={"model": "m"}, content=b"", headers={"Content-Type": "image/png"})
    assert empty.status_code == 422 and set(empty.json()["error"]) == {"type", "message", "field"}


def _index_build(layout: dict[str, Path], *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, EXCB_LOG_JSON="false", OMP_NUM_THREADS="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("EXCB_HOME", "EXCB_DATA_ROOTS", "EXCB_MODELS_DIR"):
        full.pop(key, None)
    full.update(env)
    elsewhere = layout["tmp"] / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "excb.cli", "index", "build", *args], cwd=elsewhere, env=full,
                          capture_output=True, text=True, timeout=600)


def test_index_build_resolves_a_name_as_a_job_does(layout: dict[str, Path]) -> None:
    """`excb index build mixed` run from any directory reads the data root's `mixed`, like a job's data=mixed;
    --home finds the models like `excb up --home` (no EXCB_HOME needed)."""
    roots = {"EXCB_DATA_ROOTS": json.dumps([str(layout["root"])])}
    done = _index_build(layout, "mixed", "--model", "m", "--name", "mixed", "--home", str(layout["home"]),
                        env=roots)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["count"] == 12
    refused = _index_build(layout, "../outside.png", "--model", "m", "--home", str(layout["home"]), env=roots)
    assert refused.returncode == 2 and "outside the configured data roots" in refused.stderr


def test_a_job_and_the_index_command_resolve_the_same_name(layout: dict[str, Path]) -> None:
    from services.api.submit import safe_source
    from services.common.paths import resolve_source
    from services.settings import Settings

    settings = Settings(home=layout["home"], data_roots=[layout["root"]])
    expected = str((layout["root"] / "mixed").resolve())
    assert safe_source("mixed", settings) == resolve_source("mixed", settings.data_roots) == expected
    listing = layout["root"] / "files.txt"
    listing.write_text("mixed/0/0.png\nmixed/1/1.png\n")
    assert resolve_source("list:files.txt", settings.data_roots) == f"list:{listing.resolve()}"
    assert resolve_source("digits", settings.data_roots) == "digits"
