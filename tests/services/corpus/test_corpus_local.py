"""The corpus pipeline without a control plane (``excb corpus embed --local``, services/corpus/local.py): the same
plan, parts and completion records the workers write, on a real ONNX bundle. Covers the crash windows a worker
can die in (after the part, before its record; before the part) and the ``shards:`` plan."""

from __future__ import annotations

import json
from pathlib import Path

from excb.cli import main
from services.corpus.local import embed_local
from services.corpus.parts import read_manifest, read_parts
from support import embed as es
from support.corpus import noise_images


def _folder(root: Path, n: int, bad: int) -> set[str]:
    return noise_images(root, n, bad, classes=3, shape=(20, 14), suffix=".jpg", seed=1)


def _paths(root: Path) -> list[str]:
    return [p for t in read_parts(root, ["path"]) for p in t.column("path").to_pylist()]


def test_local_run_is_exactly_once_and_resumes_after_each_crash_window(tmp_path: Path) -> None:
    expected = _folder(tmp_path / "imgs", 50, bad=2)
    out = tmp_path / "corpus"
    manifest = embed_local(str(tmp_path / "imgs"), es.second_bundle(), out, chunk_size=7, batch_size=3)
    assert manifest["status"] == "succeeded" and len(manifest["chunks"]) == 8
    assert manifest["images"] == 52 and manifest["errors"] == 2
    paths = _paths(out)
    assert sorted(paths) == sorted(expected)
    first = {p.name: p.stat().st_mtime_ns for p in (out / "done").iterdir()}
    table = next(read_parts(out))
    assert table.schema.field("embedding").type.list_size == manifest["embed_dim"]
    # crash windows: chunk 2's worker died after committing its part but before its record; chunk 5's before
    # committing anything (no part either); the re-run redoes exactly those two chunks
    (out / "done" / "00002.json").unlink()
    (out / "done" / "00005.json").unlink()
    (out / "parts" / "part-00005.parquet").unlink()
    again = embed_local(str(tmp_path / "imgs"), es.second_bundle(), out, chunk_size=7, batch_size=3)
    assert again["status"] == "succeeded"
    assert sorted(_paths(out)) == sorted(expected)
    now = {p.name: p.stat().st_mtime_ns for p in (out / "done").iterdir()}
    assert {k for k in now if now[k] != first.get(k)} == {"00002.json", "00005.json"}
    assert not list((out / "parts").glob(".*"))  # no temporary file left behind


def test_shards_plan_one_chunk_per_shard_and_cli(tmp_path: Path, capsys: object) -> None:
    from excb.data.pack import pack

    _folder(tmp_path / "imgs", 23, bad=0)
    pack(str(tmp_path / "imgs"), str(tmp_path / "shards"), shard_size=10, progress=False)
    out = tmp_path / "corpus"
    rc = main(["corpus", "embed", f"shards:{tmp_path / 'shards'}", "--local", "--bundle", str(es.second_bundle()),
               "--out", str(out), "--chunk-size", "4"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # type: ignore[attr-defined]
    assert summary["images"] == 23 and summary["parts"] == 3 and summary["errors"] == 0
    manifest = read_manifest(out)
    assert manifest is not None and [c["items"] for c in manifest["chunks"]] == [10, 10, 3]
    paths = _paths(out)
    assert len(set(paths)) == 23 and paths[0].endswith("shard-000000.tar#0")
    assert main(["corpus", "embed", str(tmp_path / "missing"), "--local", "--bundle", str(es.second_bundle()),
                 "--out", str(tmp_path / "x")]) == 2
