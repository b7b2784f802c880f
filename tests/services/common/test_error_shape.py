"""Issue 27 item 4 (errors, OpenAPI): one error envelope on every route but the OpenAI ones, and a spec that
says so; the raw image bodies, the search and cluster answers and a job's training fields are declared.

Before: a malformed JSON body was reported against ``field: "1"`` (a character offset), model checks leaked
pydantic's ``Value error,`` prefix, every 422 in the spec was FastAPI's ``{"detail": [...]}`` (which no route
returns), ``/v1/search`` and ``/v1/embed`` declared no raw image body, the search and cluster routes declared
a bare object, and ``POST /v1/jobs`` showed only its wrapper fields.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient

OPENAI_PATHS = {"/v1/embeddings"}


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The `excb up` shape: control plane + embed app in one process (no worker, no model)."""
    from services.api.app import create_app
    from services.settings import Settings

    tmp = tmp_path_factory.mktemp("errors")
    (tmp / "data").mkdir()
    settings = Settings(home=tmp / "home", data_roots=[tmp / "data"], database_url=f"sqlite:///{tmp / 'e.sqlite'}")
    app = create_app(settings, embedded=True, reaper=False)
    with TestClient(app) as client:
        yield client
    app.state.plane.db.dispose()


def _native(r: Any, status: int, etype: str, field: str | None) -> None:
    assert r.status_code == status, r.text
    assert r.json() == {"error": {"type": etype, "message": r.json()["error"]["message"], "field": field}}, r.text


def test_malformed_json_and_model_checks_read_cleanly(up: TestClient) -> None:
    bad = up.post("/v1/jobs", content=b'{"data": ', headers={"Content-Type": "application/json"})
    _native(bad, 422, "invalid_json", None)  # before: validation_error on field "10"
    assert bad.json()["error"]["message"].startswith("the body is not valid JSON")
    both = up.post("/v1/search", json={"image": "abcd", "image_id": 1})
    _native(both, 422, "validation_error", None)
    assert both.json()["error"]["message"] == "give exactly one of image and image_id"  # no "Value error, "
    _native(up.get("/v1/jobs", params={"limit": "x"}), 422, "validation_error", "limit")
    _native(up.get("/embed", params={"uri": "../x.png"}), 422, "path_not_allowed", "uri")
    openai = up.post("/v1/embeddings", json={"input": ["../x.png"]})
    assert openai.status_code == 422 and set(openai.json()["error"]) == {"message", "type", "param", "code"}


def _spec(up: TestClient) -> dict[str, Any]:
    r = up.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def test_the_spec_declares_one_error_shape_and_the_openai_one_where_it_answers(up: TestClient) -> None:
    spec = _spec(up)
    assert "HTTPValidationError" not in json.dumps(spec)
    checked = 0
    for path, item in spec["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                if not status.startswith(("4", "5")) or "content" not in response:
                    continue
                ref = response["content"]["application/json"]["schema"]["$ref"]
                want = "OpenAIError" if path in OPENAI_PATHS else "Error"
                assert ref.endswith("/" + want), (path, method, status, ref)
                checked += 1
    assert checked > 40
    error = spec["components"]["schemas"]["Error"]
    assert set(error["properties"]) == {"error"}


def test_the_spec_declares_raw_image_bodies_search_clusters_and_training_fields(up: TestClient) -> None:
    spec = _spec(up)
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    for path in ("/v1/embed", "/v1/search"):
        content = paths[path]["post"]["requestBody"]["content"]
        assert {"application/json", "multipart/form-data", "image/*", "application/octet-stream"} <= set(content)
        assert content["image/*"]["schema"] == {"type": "string", "format": "binary"}
        assert "model" in {p["name"] for p in paths[path]["post"]["parameters"]}  # options of a raw body
    for path, method, model in (("/v1/search", "post", "SearchResponse"),
                                ("/v1/models/{model_id}/clusters", "get", "ClusterList"),
                                ("/v1/models/{model_id}/clusters/{cluster}", "get", "ClusterDetail"),
                                ("/v1/models/{model_id}/index", "get", "IndexInfo")):
        ref = paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/" + model), (path, ref)
    assert {"query", "data", "indexed"} <= set(schemas["SearchResponse"]["properties"])
    assert {"typical", "relative_size", "status"} <= set(schemas["ClusterEntry"]["properties"])
    body = paths["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    job = schemas[body.rsplit("/", 1)[1]]["properties"]
    assert {"job_id", "gpus", "memory_limit_mb"} <= set(job)  # the wrapper, as before
    assert {"preset", "budget", "max_steps", "batch_size", "model", "optim", "data", "augment"} <= set(job)
    assert "out" not in job  # the server owns it
    assert "lr" in job["optim"]["properties"] and "num_clusters" in job["model"]["properties"]
    assert {"type": "string", "description": "short for data.source"} in job["data"]["anyOf"]
