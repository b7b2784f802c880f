"""/v1/models on the control plane: which model is active is read from ``<models_dir>/active.json`` (the one place
that says it), the activate route replaces that pointer, and a key sees and activates only its own models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fastapi.testclient import TestClient

from services.api.app import create_app as create_plane
from services.common.active_model import read_active_id, write_active
from services.common.auth import hash_key
from services.db import models as model_store
from services.db.session import Database
from services.db.tables import ModelRow
from services.settings import Settings
from support import embed as es

A = {"Authorization": "Bearer alpha-secret"}
B = {"Authorization": "Bearer beta-secret"}
A_ID, B_ID = ("key-" + hash_key(k)[:16] for k in ("alpha-secret", "beta-secret"))


def _bundle(models: Path, model_id: str) -> Path:
    """A servable bundle (activate refuses what the embed service would: issue 33 item 4)."""
    bundle = models / model_id
    shutil.copytree(es.bundle(), bundle)
    return bundle


def _sha(bundle: Path) -> str:
    return str(json.loads((bundle / "model.json").read_text())["sha256"])


def _active(listing: dict) -> dict[str, bool]:
    assert {m["id"]: m["active"] for m in listing["items"]} == {m["id"]: m["latest"] for m in listing["data"]}
    return {m["id"]: m["active"] for m in listing["items"]}


def test_active_follows_the_pointer_and_activate_replaces_it(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("alpha-secret\nbeta-secret\n")
    models = tmp_path / "models"
    settings = Settings(home=tmp_path / "home", models_dir=models, api_keys_file=keys)
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    for model_id, owner in (("m-a1", A_ID), ("m-a2", A_ID), ("m-b1", B_ID)):
        bundle = _bundle(models, model_id)
        model_store.add_model(db, ModelRow(id=model_id, owner=owner, status="READY", bundle_dir=str(bundle),
                                           sha256=_sha(bundle), model_json={}))
    with TestClient(create_plane(settings, db=db, reaper=False)) as c:
        assert _active(c.get("/v1/models", headers=A).json()) == {"m-a1": False, "m-a2": False}  # no pointer yet
        write_active(models, "m-a1", models / "m-a1", "0" * 64)  # what the worker does after a verified export
        assert _active(c.get("/v1/models", headers=A).json()) == {"m-a1": True, "m-a2": False}
        assert c.get("/v1/models/m-a1", headers=A).json()["active"] is True

        r = c.post("/v1/models/m-a2/activate", headers=A)
        assert r.status_code == 200 and r.json()["active"] is True
        assert read_active_id(models) == "m-a2"
        assert _active(c.get("/v1/models", headers=A).json()) == {"m-a1": False, "m-a2": True}
        assert _active(c.get("/v1/models", headers=B).json()) == {"m-b1": False}

        assert c.post("/v1/models/m-a1/activate", headers=B).status_code == 404  # another key's model
        assert read_active_id(models) == "m-a2"
        (models / "m-b1" / "model.onnx").unlink()
        assert c.post("/v1/models/m-b1/activate", headers=B).status_code == 409  # bundle gone: pointer untouched
        assert read_active_id(models) == "m-a2"
    db.dispose()
