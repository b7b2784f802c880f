"""``excb embed FOLDER --model BUNDLE --out FILE``: same vectors as the runtime, bad files skipped, npy + parquet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from excb.cli import main as excb_main
from excb.data.decode import decode_image
from excb.inference.onnx_runtime import OrtEmbedder, l2_normalize, load_bundle
from support import embed as es


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "nested").mkdir()
    for i in range(5):
        (root / f"img{i}.png").write_bytes(es.digit_png(i))
    (root / "nested" / "img5.jpg").write_bytes(es.encode(es.digit_images()[5], "JPEG"))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    return root


def test_embed_folder_to_npy_matches_runtime(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "emb.npy"
    assert excb_main(["embed", str(folder), "--model", str(es.bundle()), "--out", str(out), "--batch-size", "4",
                      "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 6 and summary["skipped"] == 1
    emb = np.load(out)
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert emb.shape == (6, 64) and len(meta["paths"]) == 6 and meta["skipped"][0]["path"].endswith("broken.png")
    e = OrtEmbedder(load_bundle(es.bundle()), intra_op_threads=1)
    first = Path(meta["paths"][0])
    want_emb, want_sims = e.run(e.preprocess(decode_image(first.read_bytes()))[None])
    assert np.allclose(emb[0], l2_normalize(want_emb)[0], atol=1e-5)
    assert meta["cluster"][0] == int(want_sims.argmax())


def test_embed_folder_to_parquet(folder: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "emb.parquet"
    assert excb_main(["embed", str(folder), "--model", str(es.bundle()), "--out", str(out), "--no-progress"]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 6 and set(table.column_names) >= {"path", "embedding", "cluster", "balanced_cluster"}
    vecs = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_embed_folder_errors(tmp_path: Path, folder: Path) -> None:
    assert excb_main(["embed", str(tmp_path / "none"), "--model", str(es.bundle()),
                      "--out", str(tmp_path / "a.npy")]) == 2
    assert excb_main(["embed", str(folder), "--model", str(es.bundle()), "--out", str(tmp_path / "a.csv")]) == 2
    assert excb_main(["embed", str(folder), "--model", str(tmp_path), "--out", str(tmp_path / "a.npy")]) == 2
