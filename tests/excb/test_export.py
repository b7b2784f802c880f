"""ONNX export: a real training run -> bundle with parity check; ResNet and ViT; tamper/external-data refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from excb.cli import main as excb_main
from excb.fileio import sha256_file
from excb.inference import export as export_mod
from excb.inference.onnx_runtime import BundleError, OrtEmbedder, balance_paper, load_bundle
from excb.method.balancing import balance
from support import embed as es

torch.set_num_threads(1)


def test_bundle_from_training_run_has_contract_fields_and_passes_parity() -> None:
    b = es.bundle()
    meta = json.loads((b / "model.json").read_text())
    for key in ("arch", "input", "embed_dim", "num_clusters", "sizes", "opset", "source", "sha256", "parity"):
        assert key in meta, key
    assert meta["sha256"] == sha256_file(b / "model.onnx")
    assert meta["opset"] >= 17 and meta["num_clusters"] == 32 and len(meta["sizes"]) == 32
    assert meta["input"]["size"] == 16 and meta["input"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["source"]["step"] == 6 and Path(meta["source"]["run_dir"]) == es.trained_run().resolve()
    p = meta["parity"]
    assert p["passed"] is True and p["images"] == 128 and p["data"] == "digits"
    assert p["min_cosine"] >= 0.9999 and p["top1_agreement"] >= 0.999
    # the final size estimate is the trainer's, not a placeholder
    ckpt = torch.load(es.trained_run() / "checkpoints" / "last.pt", weights_only=True)
    assert np.allclose(meta["sizes"], ckpt["balancer"]["sizes"].numpy())
    # single file, no external data
    model = onnx.load_model_from_string((b / "model.onnx").read_bytes())
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_ort_session_matches_torch_teacher_for_any_batch_size() -> None:
    from excb.config import validate
    from excb.models import ExportWrapper, build_model
    from excb.training.checkpoint import load_checkpoint

    bundle = load_bundle(es.bundle())
    emb = OrtEmbedder(bundle, intra_op_threads=1)
    ckpt = load_checkpoint(es.trained_run() / "checkpoints" / "last.pt")
    teacher = build_model(validate(ckpt["config"]), teacher=True)
    teacher.load_state_dict(ckpt["teacher"])
    wrapper = ExportWrapper(teacher).eval()
    x = np.stack([emb.preprocess(im) for im in es.digit_images()[:7]])
    with torch.no_grad():
        t_emb, t_sim = (o.numpy() for o in wrapper(torch.from_numpy(x)))
    for n in (1, 3, 7):
        o_emb, o_sim = emb.run(x[:n])
        assert o_emb.shape == (n, bundle.embed_dim) and o_sim.shape == (n, 32)
        assert np.allclose(o_emb, t_emb[:n], atol=1e-4) and np.allclose(o_sim, t_sim[:n], atol=1e-5)


@pytest.mark.slow
def test_vit_exports_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = es.handmade_checkpoint(tmp_path / "vit.pt", backbone="vit_tiny")
    rc = excb_main(["export", str(ckpt), "--out", str(tmp_path / "vit"), "--parity-data", "digits",
                    "--parity-images", "32"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["parity"]["passed"] is True and out["embed_dim"] == 192
    meta = json.loads((tmp_path / "vit" / "model.json").read_text())
    assert meta["arch"]["backbone"] == "vit_tiny"
    bundle = load_bundle(tmp_path / "vit")
    e, s = OrtEmbedder(bundle, intra_op_threads=1).run(np.zeros((3, 3, 16, 16), np.float32))
    assert e.shape == (3, 192) and s.shape == (3, 32)


def test_multiscale_embedding_exports_with_parity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = es.handmade_checkpoint(tmp_path / "ms.pt", overrides=("model.embedding=multiscale",))
    rc = excb_main(["export", str(ckpt), "--out", str(tmp_path / "ms"), "--parity-data", "digits",
                    "--parity-images", "32"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    width = json.loads((tmp_path / "ms" / "model.json").read_text())["arch"]["width"]
    assert out["parity"]["passed"] is True and out["embed_dim"] == width * (2 + 4 + 8)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    e, s = OrtEmbedder(load_bundle(tmp_path / "ms"), intra_op_threads=1).run(x)
    assert e.shape == (2, width * 14) and s.shape == (2, 32)
    assert np.allclose(np.linalg.norm(e, axis=1), 3 ** 0.5, atol=1e-4)  # three unit-length stage blocks


def test_failed_parity_exits_nonzero_and_bundle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from services.embed.registry import ModelRegistry

    monkeypatch.setattr(export_mod, "COSINE_THRESHOLD", 1.5)  # unreachable: the check must fail, and say so
    ckpt = es.handmade_checkpoint(tmp_path / "c.pt")
    rc = excb_main(["export", str(ckpt), "--out", str(tmp_path / "b"), "--parity-data", "digits",
                    "--parity-images", "8"])
    assert rc == 1
    assert "parity check failed" in capsys.readouterr().err
    meta = json.loads((tmp_path / "b" / "model.json").read_text())
    assert meta["parity"]["passed"] is False
    reg = ModelRegistry()
    with pytest.raises(BundleError, match="parity"):
        reg.register(tmp_path / "b")
    assert reg.models() == []


def test_export_of_missing_source_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert excb_main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_numpy_balance_equals_torch_balance() -> None:
    g = torch.Generator().manual_seed(0)
    for k in (5, 32, 1000):
        z = torch.rand(64, k, generator=g) * 2 - 1
        s = torch.rand(k, generator=g) ** 3
        s[0] = 0.0  # a dead cluster
        s = s / s.sum()
        ref = balance(z, s, mode="paper").numpy()
        got = balance_paper(z.numpy(), s.numpy())
        assert np.allclose(got, ref, atol=1e-6)
        assert (got.argmax(1) == ref.argmax(1)).all()


def _copy_bundle(tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(es.bundle(), dst)
    return dst


def test_tampered_model_is_rejected(tmp_path: Path) -> None:
    b = _copy_bundle(tmp_path)
    data = bytearray((b / "model.onnx").read_bytes())
    data[-100] ^= 0xFF
    (b / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(b)


def test_external_data_path_is_rejected_even_with_matching_hash(tmp_path: Path) -> None:
    b = _copy_bundle(tmp_path)
    model = onnx.load(str(b / "model.onnx"))
    big = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    big.ClearField("raw_data")
    big.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../../../../etc/passwd"), ("offset", "0"), ("length", "64")):
        entry = big.external_data.add()
        entry.key, entry.value = key, value
    (b / "model.onnx").write_bytes(model.SerializeToString())
    meta = json.loads((b / "model.json").read_text())
    meta["sha256"] = sha256_file(b / "model.onnx")  # an attacker who can write both files
    (b / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="external data"):
        load_bundle(b)


def test_symlinked_model_file_is_rejected(tmp_path: Path) -> None:
    b = _copy_bundle(tmp_path)
    real = tmp_path / "elsewhere.onnx"
    shutil.move(b / "model.onnx", real)
    (b / "model.onnx").symlink_to(real)
    with pytest.raises(BundleError, match="symlink"):
        load_bundle(b)
