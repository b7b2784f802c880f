"""The embed service against a real ONNX Runtime session on a bundle exported from a real training run."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from excb.data.decode import decode_image
from excb.inference.onnx_runtime import OrtEmbedder, available_providers, load_bundle
from excb.method.balancing import balance
from excb.method.stats import balance_stats
from services.common.active_model import ACTIVE_FILE
from services.embed.app import create_app
from services.embed.manifest import record_model
from services.embed.registry import ModelRegistry
from services.settings import EmbedSettings, Settings
from support import HANG_GUARD_S
from support import REPO_ROOT as ROOT
from support import embed as es


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("embed-home")
    shutil.copytree(es.bundle(), home / "models" / "digits-a")
    data = home / "data"
    (data / "sub").mkdir(parents=True)
    for i in range(4):
        (data / f"d{i}.png").write_bytes(es.digit_png(i))
    (data / "sub" / "d5.png").write_bytes(es.digit_png(5))
    secret = home / "secret.png"
    secret.write_bytes(es.digit_png(6))
    (data / "escape.png").symlink_to(secret)
    return home


def settings_for(home: Path, **embed: object) -> Settings:
    return Settings(home=home, data_roots=[home / "data"], embed=EmbedSettings(**{"max_delay_ms": 2.0, **embed}))


@pytest.fixture(scope="module")
def client(home: Path):
    with TestClient(create_app(settings_for(home))) as c:
        yield c


@pytest.fixture(scope="module")
def reference() -> OrtEmbedder:
    return OrtEmbedder(load_bundle(es.bundle()), intra_op_threads=1)


def expected(ref: OrtEmbedder, pngs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([ref.preprocess(decode_image(p)) for p in pngs])
    return ref.run(x)


def test_multipart_upload_matches_direct_ort_and_torch_balancing(client: TestClient, reference: OrtEmbedder) -> None:
    pngs = [es.digit_png(i) for i in range(3)]
    r = client.post("/v1/embed", files=[("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)],
                    data={"top_k": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "digits-a" and body["usage"]["images"] == 3
    assert r.headers["x-model-version"] == body["model_version"] == f"digits-a@{reference.bundle.sha256[:12]}"
    emb, sims = expected(reference, pngs)
    s = torch.from_numpy(reference.bundle.sizes)
    bal = balance(torch.from_numpy(sims), s, mode="paper").numpy()
    for i, item in enumerate(body["data"]):
        assert item["index"] == i and item["object"] == "embedding"
        vec = np.asarray(item["embedding"], dtype=np.float32)
        assert np.isclose(np.linalg.norm(vec), 1.0, atol=1e-5)
        assert np.allclose(vec, emb[i] / np.linalg.norm(emb[i]), atol=1e-5)
        c = item["cluster"]
        assert c["id"] == int(sims[i].argmax()) and np.isclose(c["similarity"], sims[i].max(), atol=1e-6)
        assert [t["id"] for t in c["top_k"]] == list(np.argsort(-sims[i])[:4])
        assert item["balanced_cluster"]["id"] == int(bal[i].argmax())


def test_json_data_uri_and_base64_encoding(client: TestClient, reference: OrtEmbedder) -> None:
    png = es.digit_png(7)
    b64 = base64.b64encode(png).decode()
    r = client.post("/v1/embed", json={"input": [f"data:image/png;base64,{b64}", b64], "encoding_format": "base64",
                                       "normalize": False, "return_clusters": False, "model": "digits-a"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    emb, _ = expected(reference, [png])
    for item in data:
        vec = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        assert np.allclose(vec, emb[0], atol=1e-5)
        assert "cluster" not in item
    single = client.post("/v1/embed", json={"input": b64})
    assert single.status_code == 200 and len(single.json()["data"]) == 1


def _photo_jpeg(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, ((xx // 40 + yy // 40) % 2) * 200], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def test_a_large_jpeg_is_decoded_drafted_unless_jpeg_draft_is_off(home: Path, reference: OrtEmbedder) -> None:
    """The service preprocesses a large JPEG from the drafted decode (an embedding close to the full decode's);
    ``jpeg_draft=false`` preprocesses the full decode, pixel for pixel."""
    jpeg = _photo_jpeg(1600, 1200)
    side = reference.decode_min_side
    assert side == 4 * reference.bundle.input_size and 1200 // side >= 2  # this photo is drafted
    full = reference.preprocess(decode_image(jpeg))
    drafted = reference.preprocess(decode_image(jpeg, min_side=side))
    assert np.abs(full - drafted).max() > 1e-3  # the two ways are told apart
    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v)

    emb = reference.run(np.stack([full, drafted]))[0]
    assert float(unit(emb[0]) @ unit(emb[1])) > 0.99
    for draft, want in ((True, drafted), (False, full)):
        with TestClient(create_app(settings_for(home, jpeg_draft=draft))) as c:
            svc = c.app.state.embed
            batch = svc.decoder.decode_all([("files", jpeg)], svc.registry.get())
            assert np.array_equal(batch[0], want), draft
            # the decode budget reserves what the decode allocates: 1/8 of each side when drafted
            min_side = svc.decoder.min_side(svc.registry.get())
            assert svc.decoder.cost(jpeg, min_side) == (200 * 150 if draft else 1600 * 1200)
            r = c.post("/v1/embed", files=[("files", ("photo.jpg", jpeg, "image/jpeg"))],
                       data={"return_clusters": "false"})
            assert r.status_code == 200, r.text
            assert np.allclose(r.json()["data"][0]["embedding"], unit(reference.run(want[None])[0][0]), atol=1e-5)


def test_get_embed_by_path_inside_data_roots_only(client: TestClient) -> None:
    assert client.get("/embed", params={"uri": "d1.png"}).status_code == 200
    assert client.get("/embed", params={"uri": "sub/d5.png", "top_k": 2}).json()["data"][0]["cluster"]["top_k"]
    for bad in ("../secret.png", "sub/../../secret.png", "escape.png", str(Path("/etc/passwd")), "sub",
                "file:///etc/passwd"):
        r = client.get("/embed", params={"uri": bad})
        assert r.status_code == 422, (bad, r.text)
        assert set(r.json()["error"]) == {"type", "message", "field"} and r.json()["error"]["field"] == "uri"
    assert client.get("/embed", params={"uri": "missing.png"}).status_code == 404
    r = client.get("/embed", params={"uri": "http://example.com/a.png"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "url_disabled"


def test_info_health_and_providers(client: TestClient) -> None:
    info = client.get("/v1/info").json()
    assert info["providers"]["order"] == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                          "CPUExecutionProvider"]
    assert info["models"][0]["providers"]["active"][-1] == "CPUExecutionProvider"
    assert info["threads"]["intra_op"] >= 1 and info["threads"]["inter_op"] == 1
    assert info["latest"] == "digits-a" and info["models"][0]["parity"]["passed"] is True
    assert client.get("/livez").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["latest"] == "digits-a"


@pytest.mark.skipif("CUDAExecutionProvider" in available_providers(), reason="needs a CPU-only ONNX Runtime")
def test_readiness_fails_when_requested_gpu_fell_back_to_cpu(home: Path) -> None:
    reg = ModelRegistry(EmbedSettings(providers=["cuda", "cpu"]))
    reg.register(es.bundle(), "digits-a")
    with TestClient(create_app(settings_for(home), reg)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "CUDAExecutionProvider" in r.json()["error"]["message"]
        m = c.get("/v1/info").json()["models"][0]
        assert m["providers"]["missing_required"] == ["CUDAExecutionProvider"]
        assert c.post("/v1/embed", json={"input": base64.b64encode(es.digit_png()).decode()}).status_code == 200
    reg.close()


def test_live_balance_uses_excb_stats_and_metrics_have_no_cluster_labels(home: Path) -> None:
    with TestClient(create_app(settings_for(home, balance_window=10))) as c:
        ids = []
        for i in range(3):  # 12 images into a window of 10
            r = c.post("/v1/embed", files=[("files", (f"{j}.png", es.digit_png(4 * i + j), "image/png"))
                                           for j in range(4)])
            ids += [d["balanced_cluster"]["id"] for d in r.json()["data"]]
        b = c.get("/v1/models/latest/balance").json()
        assert b["model_id"] == "digits-a" and b["window"] == 10 and b["assignments"] == 10
        assert b["served"] == balance_stats(np.bincount(ids[-10:], minlength=32), kind="counts")
        assert set(b["drift"]) == {"kl", "js", "tv"}
        assert set(b["served_curve"]) == {"rank", "relative_size"} and len(b["training_curve"]["rank"]) == 32
        assert c.get("/v1/models/nope/balance").status_code == 404
        text = c.get("/metrics").text
        lines = [x for x in text.splitlines() if x.startswith("excb_serve_balance_normalized_entropy{")]
        assert len(lines) == 1 and lines[0].startswith('excb_serve_balance_normalized_entropy{model="digits-a"} ')
        assert np.isclose(float(lines[0].split()[-1]), b["served"]["normalized_entropy"])
        assert "excb_serve_drift_js" in text and "excb_embed_batch_size_count" in text
        assert "cluster=" not in text


def test_queue_full_answers_503_with_retry_after_then_recovers(home: Path) -> None:
    s = settings_for(home, queue_size=4, max_batch=64, max_delay_ms=800.0, retry_after_seconds=2)
    files = [("files", (f"{j}.png", es.digit_png(j), "image/png")) for j in range(2)]
    with TestClient(create_app(s)) as c:
        batcher = c.app.state.embed.registry.get().batcher
        batcher.announce()  # as if another request were still decoding: batches are held open for 800 ms
        results: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: results.append(c.post("/v1/embed", files=files)))
                   for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batcher.withdraw()
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 2 and 503 in codes, codes
        busy = next(r for r in results if r.status_code == 503)
        assert busy.headers["retry-after"] == "2" and busy.json()["error"]["type"] == "overloaded"
        assert c.post("/v1/embed", files=files).status_code == 200


def test_bearer_api_keys(home: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# one key\ns3cret-key\n")
    models = tmp_path / "models"
    shutil.copytree(home / "models" / "digits-a", models / "digits-a")
    # With keys on, a bundle is served only with the control plane's record (issue 13 item 5).
    record_model(models, "digits-a", load_bundle(models / "digits-a").sha256, owner=None)
    s = settings_for(home).model_copy(update={"api_keys_file": keys, "models_dir": models})
    body = {"input": base64.b64encode(es.digit_png()).decode()}
    with TestClient(create_app(s)) as c:
        assert c.post("/v1/embed", json=body).status_code == 401
        assert c.post("/v1/embed", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/v1/embed", json=body, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert c.get("/embed", params={"uri": "d0.png"}).status_code == 401
        assert c.get("/livez").status_code == 200 and c.get("/readyz").status_code == 200


def test_registry_rescan_latest_and_model_selection(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(es.bundle(), models / "digits-a")
    shutil.copytree(es.second_bundle(), models / "digits-b")
    (models / "broken").mkdir()
    (models / "broken" / "model.json").write_text("{}")
    s = Settings(home=tmp_path, embed=EmbedSettings(max_delay_ms=1.0))
    with TestClient(create_app(s)) as c:
        info = c.get("/v1/info").json()
        assert sorted(m["id"] for m in info["models"]) == ["digits-a", "digits-b"]
        assert "broken" in info["errors"]
        b64 = base64.b64encode(es.digit_png()).decode()
        va = c.post("/v1/embed", json={"input": b64, "model": "digits-a"}).json()["model_version"]
        vb = c.post("/v1/embed", json={"input": b64, "model": "digits-b"}).json()["model_version"]
        assert va.startswith("digits-a@") and vb.startswith("digits-b@")
        latest = c.post("/v1/embed", json={"input": b64}).json()["model_version"]
        assert latest in (va, vb)
        registry = c.app.state.embed.registry
        registry.activate("digits-a")
        assert c.post("/v1/embed", json={"input": b64}).json()["model_version"] == va
        assert c.post("/v1/embed", json={"input": b64, "model": "nope"}).status_code == 404
        assert registry.rescan() == []  # nothing changed, nothing reloaded
        # A separate replica follows active.json, the pointer the worker and /v1/models/{id}/activate write.
        (models / ACTIVE_FILE).write_text(json.dumps({"model_id": "digits-b"}))
        assert registry.rescan() == []
        assert c.post("/v1/embed", json={"input": b64}).json()["model_version"] == vb
        (models / ACTIVE_FILE).write_text(json.dumps({"model_id": "not-loaded"}))
        registry.rescan()
        assert c.post("/v1/embed", json={"input": b64}).json()["model_version"] == vb


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_excb_serve_runs_the_service_alone(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "EXCB_HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "EXCB_LOG_JSON": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "excb.cli", "serve", "--model", str(es.bundle()), "--port",
                             str(port), "--threads", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "excb serve did not become ready"
            time.sleep(0.3)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embed", files={"files": ("a.png", es.digit_png(), "image/png")})
        assert r.status_code == 200 and r.json()["model"] == es.bundle().name
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.slow
def test_excb_serve_starts_empty_and_waits_for_first_bundle(tmp_path: Path) -> None:
    """With rescanning on, an empty models dir means not-ready (503), not a crash loop; a bundle makes it ready."""
    import shutil

    port = _free_port()
    models = tmp_path / "models"
    models.mkdir()
    env = {**os.environ, "EXCB_HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "EXCB_LOG_JSON": "false",
           "EXCB_EMBED__RESCAN_SECONDS": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "excb.cli", "serve", "--models-dir", str(models), "--port",
                             str(port), "--threads", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        status = None
        while status is None:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code
            except httpx.TransportError:
                assert time.monotonic() < deadline, "excb serve did not start"
                time.sleep(0.3)
        assert status == 503
        shutil.copytree(es.bundle(), models / "first")
        while httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code != 200:
            assert proc.poll() is None and time.monotonic() < deadline, "the first bundle was never picked up"
            time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(20)
    with pytest.raises(subprocess.CalledProcessError):  # without rescanning an empty dir is still an error
        subprocess.run([sys.executable, "-m", "excb.cli", "serve", "--models-dir", str(models / "none")],
                       cwd=ROOT, env={**env, "EXCB_EMBED__RESCAN_SECONDS": "0"}, check=True, capture_output=True,
                       timeout=HANG_GUARD_S)
