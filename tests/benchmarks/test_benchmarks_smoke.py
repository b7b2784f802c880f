"""Smoke test for benchmarks/train_throughput.py: the real CLI, tiny settings, both figures and a ratio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import HANG_GUARD_S
from support import REPO_ROOT as ROOT

SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


@pytest.mark.slow
def test_train_throughput_quick_reports_both_steps_and_ratio(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--presets", "cpu-small", "--batch", "4",
         "--set", "model.num_clusters=64", "--json-out", str(out)],
        capture_output=True, text=True, timeout=HANG_GUARD_S, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| cpu-small |")]
    assert len(table) == 1, proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    (row,) = result["rows"]
    assert (row["preset"], row["batch"], row["num_clusters"]) == ("cpu-small", 4, 64)
    assert row["tuned_img_s"] > 0 and row["naive_img_s"] > 0
    assert row["ratio"] == pytest.approx(row["tuned_img_s"] / row["naive_img_s"])
    assert len(row["tuned_block_img_s"]) == len(row["naive_block_img_s"]) == 2
    assert row["paired_ratio_min"] <= row["paired_ratio_max"]
    assert row["tuned_peak_mib"] is not None and row["naive_peak_mib"] is not None
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert float(cells[5]) == pytest.approx(row["tuned_img_s"], rel=0.01, abs=0.001)
    assert float(cells[6]) == pytest.approx(row["naive_img_s"], rel=0.01, abs=0.001)
    assert cells[7].startswith(f"{row['ratio']:.2f}x")


def test_train_throughput_rejects_unknown_preset(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--presets", "resnet9000", "--quick"],
                          capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=tmp_path)
    assert proc.returncode == 2
    assert "--presets" in proc.stderr and "resnet9000" in proc.stderr


@pytest.mark.slow
def test_quality_suite_runs_the_default_recipe_and_writes_one_table(tmp_path: Path) -> None:
    """`quality.py suite` on the smallest set with a tiny budget: trains the fitted recipe on the training split
    without its validation images (the default, ``--split val``), evaluates ExCB, raw pixels (as they are and
    whitened: the better is the baseline) and random init the same way on the validation images, prints one table
    and appends it to a results file."""
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "suite", "--sets", "uci-digits", "--budget", "15s",
         "--root", str(tmp_path / "data"), "--out", str(tmp_path / "runs"), "--write-results", str(results),
         "model.width=8", "augment.num_local_crops=2", "kmeans.samples=256"],
        capture_output=True, text=True, timeout=HANG_GUARD_S, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    (row,) = res["rows"]
    assert row["name"] == "uci-digits" and row["split"] == "val" and row["images"] == 1151 and row["test_images"] == 287
    assert row["source"].endswith("uci-digits.val")
    assert row["global_size"] == 28 and row["num_clusters"] == 64 and row["steps"] >= 10  # 10: the floor (busy CPU)
    for kind in ("excb", "raw_pixels", "random_init"):
        assert 0.0 <= row[kind]["knn"] <= 1.0 and 0.0 <= row[kind]["linear"] <= 1.0
    assert row["raw_pixels"]["knn"] > 0.9  # saturated smoke set
    assert 0.9 < row["raw_pixels_whitened_knn"] <= 1.0
    assert row["whitening"]["fitted"] and row["whitening"]["images"] == 1151  # fitted by the trainer at the end
    assert row["best_pixels_knn"] == max(row["raw_pixels"]["knn"], row["raw_pixels_whitened_knn"])
    assert row["margin_best_pixels"] == row["excb"]["knn"] - row["best_pixels_knn"]
    assert all(row["timing"][k] > 0 for k in ("setup_seconds", "training_seconds", "whitening_seconds"))
    text = results.read_text()
    assert "| uci-digits | val | 1151 / 287 | 28, 64, 128 |" in text and "budget 15s per data set, val split" in text
    assert f"| {100 * row['margin_best_pixels']:+.1f} | {row['steps']} |" in text and "--budget 15s" in text
    # the whiten study on the same run: the teacher with and without the fit the trainer made
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "whiten", "--runs",
         str(tmp_path / "runs" / "suite-uci-digits-val"), "--fit-images", "64", "1151", "5000"],
        capture_output=True, text=True, timeout=HANG_GUARD_S, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (w,) = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert w["whitened_on"] == 1151 and abs(w["whitened"]["knn"] - row["excb"]["knn"]) < 1e-9
    assert w["raw_pixels_whitened_knn"] == row["raw_pixels_whitened_knn"]
    # fitted on fewer images; a size above the set's 1151 is skipped; all 1151 is the trainer's own fit
    assert sorted(w["knn_by_fit_images"]) == ["1151", "64"]
    assert abs(w["knn_by_fit_images"]["1151"] - w["whitened"]["knn"]) < 0.01
    assert "N=64" in proc.stdout


@pytest.mark.slow
def test_quality_screen_reports_both_embeddings_of_one_teacher(tmp_path: Path) -> None:
    """`quality.py screen`: the fitted recipe for a fixed number of steps, with overrides; the served (whitened)
    embedding's kNN and the unwhitened kNN of both embeddings of the same teacher."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "screen", "--sets", "uci-digits", "--steps", "6",
         "--root", str(tmp_path / "data"), "--out", str(tmp_path / "runs"), "model.width=8",
         "augment.num_local_crops=2", "kmeans.samples=256", "augment.flip_p=0.5"],
        capture_output=True, text=True, timeout=HANG_GUARD_S, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert row["steps"] == 6 and row["overrides"][-1] == "augment.flip_p=0.5" and row["embedding"] == "multiscale"
    assert row["split"] == "val"  # tuning choices are screened on the validation split
    assert row["whitening"] == "pca" and 0.0 <= row["knn"] <= 1.0 and 0.0 <= row["linear"] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in row["knn_unwhitened_by_embedding"].values())
    assert (tmp_path / "runs" / "screen-uci-digits" / "config.yaml").read_text().count("flip_p: 0.5") == 1


@pytest.mark.slow
def test_embed_load_quick_measures_engine_and_service_side_by_side(tmp_path: Path) -> None:
    """benchmarks/embed_load.py at CI size: real servers (batching on/off), raw and JSON bodies, the engine on the
    servers' cores, per-stage means scraped from the servers, and the ratios computed per round."""
    out = tmp_path / "embed.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "embed_load.py"), "--width", "8", "--size", "32", "--clusters", "64",
         "--max-batch", "4", "--levels", "1,4", "--rounds", "1", "--seconds", "0.3", "--json-out", str(out)],
        capture_output=True, text=True, timeout=HANG_GUARD_S, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {(r["engine"], r["batch"]) for r in res["engine"]} == {("ort", 1), ("ort", 4), ("torch", 1), ("torch", 4)}
    rows = {(r["inputs"], r["server"], r["concurrency"]): r for r in res["service"]}
    assert set(rows) == {(k, s, c) for k in ("raw", "json") for s in ("on", "off") for c in (1, 4)}
    for row in rows.values():
        assert row["img_s"] > 0 and row["errors"] == 0 and row["p50"] <= row["p99"]
        stages = {"decode", "preprocess", "batch", "handler", "outside_handler", "ort_run_per_batch"}
        assert stages <= set(row["stages"])
    assert "raw c=1 on / off img/s" in res["ratios"] and "json c=4 on / engine b4 img/s" in res["ratios"]
    assert "json c=1 off / engine b1 CPU-time efficiency" in res["ratios"]
    assert "| engine | batch | img/s | CPU ms/img |" in proc.stdout and "outside_handler" in proc.stdout


@pytest.mark.slow
def test_step_variants_times_each_variant_against_the_first(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_variants.py"), "--threads", "1", "--blocks", "2",
         "--steps", "1", "--batch", "8", "nchw:channels_last=false", "nhwc:channels_last=true"],
        capture_output=True, text=True, timeout=HANG_GUARD_S, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {ln.split("|")[1].strip(): ln for ln in proc.stdout.splitlines() if ln.startswith(("| nchw", "| nhwc"))}
    assert set(rows) == {"nchw", "nhwc"}
    assert "| 1.00x | 1.00 1.00 |" in rows["nchw"]
    assert float(rows["nhwc"].split("|")[2]) > 0


def test_jpeg_draft_reports_speed_and_fidelity_side_by_side(tmp_path: Path) -> None:
    """`jpeg_draft.py`: a generated camera JPEG decoded full and drafted, and the served embedding of real-format
    photos through a bundle at each margin; the JSON and the table agree."""
    from PIL import Image

    from support import embed as es

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        digit = es.digit_images()[i].convert("RGB").resize((320, 240), Image.BICUBIC)
        digit.save(photos / f"p{i}.jpg", "JPEG", quality=90)
    Image.new("RGB", (100, 100)).save(photos / "small.jpg", "JPEG")  # short side < 128: left out
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "jpeg_draft.py"), "--width", "1600", "--height", "1200",
         "--rounds", "1", "--sizes", "32", "--bundle", str(es.bundle()), "--photos", str(photos)],
        capture_output=True, text=True, timeout=HANG_GUARD_S, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    (speed,) = res["speed"]
    assert speed["decoded_full"] == [1600, 1200] and speed["decoded_draft"] == [200, 150]  # 1/8: 150 >= 128
    assert speed["full_ms"] > 0 and speed["draft_ms"] > 0
    assert speed["speedup"] == pytest.approx(speed["full_ms"] / speed["draft_ms"], rel=0.02)
    (fid,) = res["fidelity"]
    assert fid["photos"] == 3 and fid["input_size"] == 16
    for margin in ("2x", "4x", "8x"):
        assert 0.9 < fid[margin]["mean_cosine"] <= 1.0 + 1e-6 and 0 <= fid[margin]["top1_cluster_agreement"] <= 1
    assert f"| 32 | 1600x1200 -> 200x150 | {speed['full_ms']} |" in proc.stdout
