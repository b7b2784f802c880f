"""Issue 13 items 5 and 6: the embed service serves only bundles whose bytes match the control plane's record
(manifest.json / DB), and with API keys each key sees only its own (or shared) models."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from excb.inference.onnx_runtime import BundleError, load_bundle
from services.common.auth import hash_key
from services.embed.app import create_app
from services.embed.manifest import read_manifest, record_model, update_manifest
from services.embed.registry import ModelRegistry
from services.settings import EmbedSettings, Settings
from support import embed as es

A = {"Authorization": "Bearer alpha-secret"}
B = {"Authorization": "Bearer beta-secret"}
A_ID = "key-" + hash_key("alpha-secret")[:16]
B_ID = "key-" + hash_key("beta-secret")[:16]
FAST = EmbedSettings(max_delay_ms=1.0, warmup=False)


def _sha(bundle: Path) -> str:
    return load_bundle(bundle).sha256


def _tamper(bundle: Path, other: Path) -> None:
    """What the attacker did: another model's file, and its hash edited into model.json."""
    shutil.copy(other / "model.onnx", bundle / "model.onnx")
    meta = json.loads((bundle / "model.json").read_text())
    meta["sha256"] = _sha(other)
    (bundle / "model.json").write_text(json.dumps(meta))


@pytest.fixture
def models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    shutil.copytree(es.bundle(), d / "m-a")
    shutil.copytree(es.second_bundle(), d / "m-b")
    return d


def test_swapped_model_file_is_refused(models: Path) -> None:
    """Before: model.onnx replaced and the hash in model.json edited -> served under the old id."""
    record_model(models, "m-a", _sha(models / "m-a"), owner=None)
    record_model(models, "m-b", _sha(models / "m-b"), owner=None)
    _tamper(models / "m-a", models / "m-b")
    reg = ModelRegistry(FAST, models)
    try:
        assert reg.rescan() == ["m-b"]
        assert "recorded" in reg.errors["m-a"]
        assert [m.id for m in reg.models()] == ["m-b"]
    finally:
        reg.close()


def test_swap_after_load_keeps_the_good_model(models: Path) -> None:
    record_model(models, "m-a", _sha(models / "m-a"), owner=None)
    shutil.rmtree(models / "m-b")
    reg = ModelRegistry(FAST, models)
    try:
        reg.rescan()
        good = reg.get("m-a").bundle.sha256
        _tamper(models / "m-a", es.second_bundle())
        assert reg.rescan() == []
        assert reg.get("m-a").bundle.sha256 == good  # still serving the recorded bytes
    finally:
        reg.close()


def test_unrecorded_folder_is_refused(models: Path) -> None:
    """Before: a folder copied into models/ with no DB row was served."""
    record_model(models, "m-a", _sha(models / "m-a"), owner=None)
    reg = ModelRegistry(FAST, models)
    try:
        assert reg.rescan() == ["m-a"]
        assert "no control-plane record" in reg.errors["m-b"]
        record_model(models, "m-b", _sha(models / "m-b"), owner=None)  # the record arrives later: picked up
        assert reg.rescan() == ["m-b"]
    finally:
        reg.close()
    (models / "manifest.json").unlink()
    strict = ModelRegistry(FAST, models, require_record=True)  # API keys on: a record is required anyway
    try:
        assert strict.rescan() == [] and not strict.models()
    finally:
        strict.close()


def test_register_checks_the_recorded_hash(models: Path) -> None:
    """The embedded control plane loads the DB's active model with the DB's sha256."""
    record_model(models, "m-a", _sha(models / "m-b"), owner=None)
    reg = ModelRegistry(FAST)
    try:
        with pytest.raises(BundleError, match="recorded"):
            reg.register(models / "m-a", "m-a", record=read_manifest(models)["m-a"])
    finally:
        reg.close()


@pytest.fixture
def two_tenants(models: Path, tmp_path: Path) -> TestClient:
    keys = tmp_path / "keys"
    keys.write_text("alpha-secret\nbeta-secret\n")
    record_model(models, "m-a", _sha(models / "m-a"), owner=A_ID)
    record_model(models, "m-b", _sha(models / "m-b"), owner=B_ID)
    s = Settings(home=tmp_path, models_dir=models, api_keys_file=keys, embed=FAST)
    with TestClient(create_app(s)) as c:
        yield c


def test_each_key_has_its_own_default_model(two_tenants: TestClient) -> None:
    """Before: every finished job became the one global default, so A was answered by B's model."""
    c = two_tenants
    body = {"input": base64.b64encode(es.digit_png()).decode()}
    assert c.post("/v1/embed", json=body, headers=A).json()["model_version"].startswith("m-a@")
    assert c.post("/v1/embed", json=body, headers=B).json()["model_version"].startswith("m-b@")
    assert [m["id"] for m in c.get("/v1/info", headers=A).json()["models"]] == ["m-a"]


def test_info_shows_no_server_paths_with_keys(two_tenants: TestClient, models: Path) -> None:
    """Before: the standalone embed service's /v1/info named the bundle's absolute path (and model.json's run
    dir) with keys configured, where the control plane shows paths relative to models/."""
    info = two_tenants.get("/v1/info", headers=A).json()
    assert info["models"][0]["bundle_dir"] == "models/m-a"
    assert str(models.parent) not in json.dumps(info), json.dumps(info)[:2000]


def test_other_keys_models_are_404(two_tenants: TestClient) -> None:
    """Before: B could embed with A's model and read its live balance."""
    c = two_tenants
    body = {"input": base64.b64encode(es.digit_png()).decode(), "model": "m-a"}
    r = c.post("/v1/embed", json=body, headers=B)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert c.get("/v1/models/m-a/balance", headers=B).status_code == 404
    assert c.get("/v1/models/m-a/balance", headers=A).status_code == 200
    assert c.get("/v1/models/m-a", headers=B).status_code == 404  # the OpenAI-shaped routes too
    assert [m["id"] for m in c.get("/v1/models", headers=B).json()["data"]] == ["m-b"]


def test_shared_model_is_visible_to_every_key(two_tenants: TestClient, models: Path) -> None:
    c = two_tenants
    update_manifest(models, "m-a", shared=True)
    c.app.state.embed.registry.rescan()
    body = {"input": base64.b64encode(es.digit_png()).decode(), "model": "m-a"}
    assert c.post("/v1/embed", json=body, headers=B).status_code == 200
    del body["model"]  # B's default stays B's own model
    assert c.post("/v1/embed", json=body, headers=B).json()["model_version"].startswith("m-b@")


def test_worker_records_hash_and_owner(tmp_path: Path) -> None:
    """register_bundle writes the trusted record (hash of the bytes, the job's key) that the embed side checks."""
    from services.db import jobs as store
    from services.db.session import Database
    from services.worker.pipeline import register_bundle, staging_dir

    s = Settings(home=tmp_path)
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_job(db, job_id="j1", owner=A_ID, idempotency_key=None, name=None, config={}, request={},
                     run_dir=str(tmp_path / "run"), max_attempts=1)
    shutil.copytree(es.bundle(), staging_dir(s, "m-new"))
    model_id, artifacts = register_bundle(db, s, "j1", tmp_path / "run", "m-new", 0)
    rec = read_manifest(s.resolved_models_dir.resolve())["m-new"]
    assert (rec.owner, rec.sha256) == (A_ID, artifacts["onnx_sha256"]) and rec.activated_at > 0
    reg = ModelRegistry(FAST, s.resolved_models_dir, require_record=True)
    try:
        assert reg.rescan() == ["m-new"] and reg.get("m-new").record.owner == A_ID
    finally:
        reg.close()
