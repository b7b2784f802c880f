"""``excb corpus index|search|dedup|subset`` as a user runs them, on a corpus written by the corpus jobs' own
local path (``excb corpus embed --local``): a folder of digits with two planted copies."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from excb.data.datasets import build_dataset
from support import HANG_GUARD_S
from support.corpus import curation_bundle, digits_folder


def _excb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "excb.cli", "corpus", *args], capture_output=True, text=True,
                          timeout=HANG_GUARD_S, check=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("cli")
    files = [p for p, _ in digits_folder(root / "data" / "d", [12] * 10)]
    for j, src in enumerate(files[:2]):
        shutil.copy(src, root / "data" / "d" / f"copy{j}.png")
    home = root / "home"
    shutil.copytree(curation_bundle(), home / "models" / "m-cur")
    out = root / "corpus"
    embed = _excb("embed", str(root / "data"), "--local", "--bundle", str(home / "models" / "m-cur"), "--out",
                  str(out), "--chunk-size", "50")
    assert embed.returncode == 0, embed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model_id"] = "m-cur"  # a local run names no served model; the search finds the bundle by this id
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, home, files


def test_index_search_dedup_subset(corpus: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    out, home, files = corpus
    built = _excb("index", str(out))
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["count"] == 122 and json.loads(built.stdout)["index_type"] == "IndexFlatIP"
    query = files[30]
    found = _excb("search", str(out), query, "--k", "3", "--home", str(home))
    assert found.returncode == 0, found.stderr
    top = found.stdout.splitlines()[0].split(maxsplit=1)
    assert Path(top[1]).resolve() == Path(query).resolve() and float(top[0]) == pytest.approx(1.0, abs=1e-3)
    dedup = _excb("dedup", str(out), "--threshold", "0.95", "--json")
    assert dedup.returncode == 0, dedup.stderr
    groups = [{Path(s["path"]).name for s in g["sample"]} for g in json.loads(dedup.stdout)["data"]]
    for j, src in enumerate(files[:2]):
        assert any({Path(src).name, f"copy{j}.png"} <= g for g in groups), groups
    listing = tmp_path / "subset.txt"
    sub = _excb("subset", str(out), "--n", "30", "--strategy", "diverse", "--out", str(listing))
    assert sub.returncode == 0, sub.stderr
    assert json.loads(sub.stdout)["images"] == 30
    ds = build_dataset(f"list:{listing}", split="all", labelled=False)
    assert len(ds) == 30 and all(Path(ds.path(i)).is_file() for i in range(30))


def test_cli_mistakes_exit_2_with_a_reason(corpus: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    out = corpus[0]
    missing = _excb("dedup", str(tmp_path / "nowhere"), "--home", str(tmp_path))
    assert missing.returncode == 2 and "not a corpus" in missing.stderr
    both = _excb("search", str(out), "x.png", "--row", "1")
    assert both.returncode == 2 and "one of them" in both.stderr
    bad_row = _excb("search", str(out), "--row", "100000")
    assert bad_row.returncode == 2 and "not an embedded row" in bad_row.stderr
    bad_threshold = _excb("dedup", str(out), "--threshold", "3")
    assert bad_threshold.returncode == 2 and "threshold" in bad_threshold.stderr
    bad_n = _excb("subset", str(out), "--n", "0", "--out", str(tmp_path / "x.txt"))
    assert bad_n.returncode == 2 and "n: at least 1" in bad_n.stderr
