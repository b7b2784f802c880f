"""OpenAI-compatible embeddings (issue 15, section 1): POST /v1/embeddings and GET /v1/models, driven by the
official ``openai`` client and by raw HTTP against a real uvicorn server on a bundle from a real training run."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from excb.data.decode import decode_image
from excb.inference.onnx_runtime import OrtEmbedder, load_bundle
from services.embed.app import create_app
from services.embed.manifest import record_model
from services.settings import EmbedSettings, Settings
from support import embed as es

openai = pytest.importorskip("openai")

KEY = "sk-test-openai-compat"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("openai-home")
    shutil.copytree(es.bundle(), home / "models" / "digits-a")
    # With API keys on, only bundles the control plane recorded are served (issue 13 item 5).
    record_model(home / "models", "digits-a", load_bundle(home / "models" / "digits-a").sha256, owner=None)
    data = home / "data"
    (data / "sub").mkdir(parents=True)
    for i in range(3):
        (data / f"d{i}.png").write_bytes(es.digit_png(i))
    (data / "sub" / "noext").write_bytes(es.digit_png(3))
    (home / "secret.png").write_bytes(es.digit_png(6))
    (home / "keys").write_text(KEY + "\n")
    return home


@pytest.fixture(scope="module")
def server(home: Path):
    settings = Settings(home=home, data_roots=[home / "data"], api_keys_file=home / "keys",
                        embed=EmbedSettings(max_delay_ms=2.0, max_images_per_request=4, max_request_bytes=200_000))
    with es.UvicornThread(create_app(settings)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: es.UvicornThread):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference() -> OrtEmbedder:
    return OrtEmbedder(load_bundle(es.bundle()), intra_op_threads=1)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _b64(i: int) -> str:
    return base64.b64encode(es.digit_png(i)).decode()


def test_openai_client_embeds_data_uri_base64_and_path(client, reference: OrtEmbedder) -> None:
    inputs = [f"data:image/png;base64,{_b64(0)}", _b64(1), "d2.png"]
    res = client.embeddings.create(model="digits-a", input=inputs, encoding_format="float",
                                   extra_body={"modality": "image"})
    assert res.object == "list" and res.model == "digits-a" and len(res.data) == 3
    assert res.usage.prompt_tokens == 0 and res.usage.total_tokens == 0
    x = np.stack([reference.preprocess(decode_image(es.digit_png(i))) for i in range(3)])
    emb, sims = reference.run(x)
    for i, item in enumerate(res.data):
        assert item.index == i and item.object == "embedding"
        assert np.allclose(item.embedding, _unit(emb[i]), atol=1e-5)
        extra = item.model_extra["assignment"]  # ours, ignored by OpenAI clients
        assert extra["cluster"]["id"] == int(sims[i].argmax()) and extra["cluster"]["top_k"]
        assert set(extra["balanced_cluster"]) == {"id", "similarity", "balanced_score"}


def test_openai_client_base64_default_and_models_list(client, reference: OrtEmbedder) -> None:
    res = client.embeddings.create(model="latest", input=_b64(4))  # the client asks for base64 and decodes it
    x = reference.preprocess(decode_image(es.digit_png(4)))[None]
    assert np.allclose(res.data[0].embedding, _unit(reference.run(x)[0][0]), atol=1e-5)
    models = client.models.list()
    assert [m.id for m in models.data] == ["digits-a"] and models.data[0].owned_by == "excb"
    assert models.data[0].model_extra["embed_dim"] == reference.bundle.embed_dim
    assert client.models.retrieve("digits-a").id == "digits-a"


def test_openai_client_sees_openai_shaped_errors(client) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="nope", input=_b64(0))
    assert e.value.body["code"] == "not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="digits-a", input=_b64(0), dimensions=8)
    assert e.value.body["code"] == "unsupported_dimensions" and e.value.body["param"] == "dimensions"
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="digits-a", input=_b64(0))


def _post(server: es.UvicornThread, body: object, key: str | None = KEY, **kw: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/embeddings", json=body, headers=headers, timeout=30, **kw)


def _assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_raw_http_shape_base64_and_dimensions(server: es.UvicornThread, reference: OrtEmbedder) -> None:
    dim = reference.bundle.embed_dim
    r = _post(server, {"model": "digits-a", "input": ["d0.png"], "modality": "image", "encoding_format": "base64",
                       "dimensions": dim, "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "digits-a" and r.headers["x-model-version"]
    assert set(body["usage"]) >= {"prompt_tokens", "total_tokens", "images"}
    item = body["data"][0]
    assert set(item) == {"object", "index", "embedding", "assignment"}
    vec = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
    assert vec.shape == (dim,) and np.isclose(np.linalg.norm(vec), 1.0, atol=1e-5)
    assert len(item["assignment"]["cluster"]["top_k"]) == 3


def test_raw_http_errors_are_openai_shaped_4xx(server: es.UvicornThread) -> None:
    assert _post(server, {"input": _b64(0)}, key=None).status_code == 401
    _assert_openai_error(_post(server, {"input": _b64(0)}, key=None), 401)
    _assert_openai_error(_post(server, {"input": _b64(0), "modality": "text"}), 400, "modality")
    _assert_openai_error(_post(server, {"input": _b64(0), "bogus": 1}), 400, "bogus")
    _assert_openai_error(_post(server, {"input": 5}), 400)
    _assert_openai_error(_post(server, {"input": []}), 422, "input")
    _assert_openai_error(_post(server, {"input": [_b64(0)] * 5}), 413, "input")  # count bound
    big = base64.b64encode(b"\0" * 300_000).decode()
    _assert_openai_error(_post(server, {"input": [big]}), 413)  # byte bound, before parsing
    _assert_openai_error(_post(server, {"input": ["not base64 at all!"]}), 404, "input[0]")
    _assert_openai_error(_post(server, {"input": [_b64(0), "!!!!"]}), 404, "input[1]")
    for bad in ("../secret.png", "sub/../../secret.png", "/etc/passwd"):
        _assert_openai_error(_post(server, {"input": [bad]}), 422, "input[0]")
    _assert_openai_error(_post(server, {"input": ["file:///etc/passwd"]}), 422, "input[0]")  # as on every image route
    err = _assert_openai_error(_post(server, {"input": ["http://127.0.0.1:1/x.png"]}), 403, "input[0]")
    assert err["code"] == "url_disabled"
    corrupt = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"junk" * 10).decode()
    assert 400 <= _post(server, {"input": [corrupt]}).status_code < 500
    r = httpx.post(server.url + "/v1/embeddings", content=b"{not json", timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    _assert_openai_error(r, 400)


def test_native_routes_unchanged_and_openapi_declares_bodies(server: es.UvicornThread) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/embed", json={"input": [_b64(0)]}, headers=auth, timeout=30)
    assert r.status_code == 200 and "cluster" in r.json()["data"][0]
    r = httpx.get(server.url + "/embed", params={"uri": "../secret.png"}, headers=auth, timeout=30)
    assert r.status_code == 422 and set(r.json()["error"]) == {"type", "message", "field"}
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]["bearerAuth"][
            "description"]}
    paths = spec["paths"]
    post_embed = paths["/v1/embed"]["post"]
    assert set(post_embed["requestBody"]["content"]) == {"application/json", "multipart/form-data", "image/*",
                                                         "application/octet-stream"}
    assert paths["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/EmbeddingsRequest")
    for path, item in paths.items():
        for method, op in item.items():
            assert "content" in op["responses"]["200"], (path, method)
            has_security = "security" in op
            assert has_security == (path not in ("/livez", "/health", "/readyz", "/metrics")), (path, method)


def test_excb_up_shape_models_list_coexists_with_control_plane(make_stack, tmp_path: Path) -> None:
    """In `excb up` the control plane owns GET /v1/models (its `items`); the OpenAI `object` + `data` ride
    beside them, so the official client lists models and embeds through the mounted embed app."""
    from services.api.app import create_app as create_plane
    from services.db import models as model_store
    from services.db.tables import ModelRow

    stack = make_stack(f"sqlite:///{tmp_path / 'up.sqlite'}", None)
    bundle_dir = stack.home / "models" / "digits-a"
    shutil.copytree(es.bundle(), bundle_dir)
    app = create_plane(stack.settings(), embedded=True, reaper=False)
    model_store.add_model(app.state.plane.db, ModelRow(id="digits-a", status="READY", bundle_dir=str(bundle_dir),
                                                       model_json={}))
    with es.UvicornThread(app) as srv:
        raw = httpx.get(srv.url + "/v1/models", timeout=30).json()
        assert [m["id"] for m in raw["items"]] == ["digits-a"] and raw["object"] == "list"
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        listed = c.models.list().data
        assert [m.id for m in listed] == ["digits-a"] and listed[0].object == "model" and listed[0].created > 0
        res = c.embeddings.create(model="digits-a", input=[_b64(0)], encoding_format="float")
        assert len(res.data[0].embedding) == es_dim() and "assignment" in res.data[0].model_extra
    app.state.plane.db.dispose()


def es_dim() -> int:
    return load_bundle(es.bundle()).embed_dim
