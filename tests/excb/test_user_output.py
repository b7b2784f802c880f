"""What a person reads (issue 27 items 3 and 5): bad data, a unit-less budget, a mistyped key and a budget too short
for its own set-up are one clear line each, never a traceback; a run without a terminal logs plain progress lines
instead of a carriage-return tqdm bar; an export logs no third-party INFO chatter. The CLI runs as a subprocess, as
a user (or a job's worker) runs it, with stdout and stderr going to pipes, not a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from excb.cli import main
from excb.data.datasets import MIN_DECODABLE_IMAGES
from support import embed as es
from support.training import TINY


def _excb(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "excb.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def _one_line_exit_2(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stderr.strip().splitlines()[-1]


def _random_bytes_folder(root: Path, n: int) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"{i:03d}.jpg").write_bytes(rng.bytes(2000))
    return root


def test_a_folder_where_nothing_decodes_is_one_line(tmp_path: Path) -> None:
    bad = _random_bytes_folder(tmp_path / "bad", 50)
    expected = f"excb: data source '{bad}': 0 of 50 files decode as images (first error: {bad}/000.jpg: "
    for args in (["--dry-run"], ["max_steps=2", "device=cpu"], ["--preset", "cpu-small", "--dry-run"]):
        last = _one_line_exit_2(_excb("train", f"data={bad}", f"out={tmp_path / 'run'}", *args, cwd=tmp_path))
        assert last.startswith(expected), (args, last)
    # one bad JPEG and a text file: the same line, not an error about model.num_clusters
    mixed = _random_bytes_folder(tmp_path / "mixed", 1)
    (mixed / "notes.txt").write_text("not an image")
    last = _one_line_exit_2(_excb("train", f"data={mixed}", f"out={tmp_path / 'm'}", "max_steps=2", "device=cpu",
                                  cwd=tmp_path))
    assert last.startswith(f"excb: data source '{mixed}': 0 of 1 file decodes as images (first error: "), last


def test_fewer_decodable_images_than_a_run_needs_is_one_line(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    few = tmp_path / "few"
    few.mkdir()
    for i in range(MIN_DECODABLE_IMAGES - 1):
        Image.new("RGB", (24, 24), (16 * i, 0, 0)).save(few / f"{i}.png")
    (few / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert main(["train", f"data={few}", f"out={tmp_path / 'run'}", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"excb: data source '{few}': {MIN_DECODABLE_IMAGES - 1} of {MIN_DECODABLE_IMAGES} files decode as images, "
        f"fewer than the {MIN_DECODABLE_IMAGES} images a run needs (first error: {few}/broken.jpg: "
        "unsupported_format: not a recognised image of an allowed format (JPEG, PNG, WEBP, BMP, TIFF, GIF))")


def test_a_batch_larger_than_the_data_is_one_line(tmp_path: Path) -> None:
    """Enough decodable images for a run, but fewer than the preset's batch of 128: a config error, not a trace."""
    folder = tmp_path / "twenty"
    folder.mkdir()
    for i in range(20):
        Image.new("RGB", (28, 28), (12 * i, 40, 0)).save(folder / f"{i}.png")
    last = _one_line_exit_2(_excb("train", "--preset", "cpu-small", f"data={folder}", f"out={tmp_path / 'run'}",
                                  cwd=tmp_path))
    assert last == (f"excb: config error: batch_size: 128 is larger than the data set (20 images from '{folder}'); "
                    "set a smaller batch_size"), last


def test_budget_without_a_unit_and_a_mistyped_key_say_what_to_write(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for budget in ("10", "'90'"):
        assert main(["train", f"budget={budget}", "data=digits", "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("excb: config error: budget: ") and "has no unit" in err, err
        assert "600s" in err and "10m" in err and "2h" in err, err
    assert main(["train", "optim.lrr=0.1", "data=digits", "--dry-run"]) == 2
    assert "optim.lrr: not a config field; did you mean optim.lr?" in capsys.readouterr().err
    assert main(["train", "bugdet=10m", "data=digits", "--dry-run"]) == 2
    assert "did you mean budget?" in capsys.readouterr().err


def test_a_run_without_a_terminal_logs_progress_lines_and_warns_of_a_too_short_budget(tmp_path: Path) -> None:
    """budget=1s: the set-up alone takes longer, so the run trains the floor of 10 steps and says so in one line
    with the budget that would give the recipe's warm-up; progress (on by default) comes as plain lines."""
    over = [a for a in TINY if not a.startswith(("progress=", "histogram_every_steps="))]
    r = _excb("train", "--preset", "cpu-small", *over, "budget=1s", f"out={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "\r" not in out
    warnings = [ln for ln in out.splitlines() if "WARNING" in ln and "budget 1s is too short" in ln]
    assert len(warnings) == 1, out[-3000:]
    assert "trains 10 steps" in warnings[0] and "warm-up needs; budget=" in warnings[0], warnings[0]
    progress = [ln for ln in out.splitlines() if "progress: step" in ln]
    assert progress and "progress: step 10/10 (100%)" in progress[-1], out[-3000:]
    assert max(len(ln) for ln in out.splitlines()) < 1000


def test_export_logs_no_third_party_info_lines(tmp_path: Path) -> None:
    r = _excb("export", str(es.trained_run()), "--out", str(tmp_path / "bundle"), "--parity-images", "16",
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    chatter = [ln for ln in r.stderr.splitlines() if " INFO onnx" in ln]
    assert chatter == [], chatter[:5]
