"""benchmarks/gpu_suite.sh cannot rot between the rare GPU sessions: its verdicts and report are unit-tested, and
its ``--check`` mode (tiny shapes, every stage's code path, cuda tests skipped) runs here on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import REPO_ROOT as ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402
import quality_gpu  # noqa: E402

JUNIT_SKIPPED = """<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="2" failures="0" errors="0"
skipped="2"><testcase name="test_a"><skipped message="needs a CUDA device"/></testcase>
<testcase name="test_b"><skipped message="needs a CUDA device"/></testcase></testsuite></testsuites>"""
JUNIT_FAILED = """<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="2" failures="1" errors="0"
skipped="0"><testcase name="test_a"/><testcase name="test_b"><failure message="boom"/></testcase></testsuite>
</testsuites>"""


def test_all_skipped_is_a_skip_and_a_failure_is_named(tmp_path: Path) -> None:
    (tmp_path / "s.xml").write_text(JUNIT_SKIPPED)
    (tmp_path / "f.xml").write_text(JUNIT_FAILED)
    status, why, counts = gpu_suite.junit_verdict(tmp_path / "s.xml")
    assert status == "skip" and "needs a CUDA device" in why and counts["passed"] == 0
    status, why, counts = gpu_suite.junit_verdict(tmp_path / "f.xml")
    assert status == "fail" and "test_b" in why and counts["passed"] == 1


@pytest.mark.parametrize("rc,status,why", [(0, "pass", ""), (124, "fail", "timed out after 30 s"),
                                            (77, "skip", "skipped: missing fastapi"), (3, "fail", "exit 3: ")])
def test_exit_codes(rc: int, status: str, why: str) -> None:
    got = gpu_suite.verdict(rc, 30, "noise\nskipped: missing fastapi\n")
    assert got[0] == status and got[1].startswith(why)


def test_report_writes_json_and_a_table_and_fails_on_a_failed_stage(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "env.json").write_text(json.dumps({"torch": "2.11", "gpu": "NVIDIA H200", "modules": {"fastapi": None}}))
    train = {"benchmark": "train_throughput", "rows": [
        {"backbone": "resnet50", "batch": 128, "num_clusters": 65536, "crops": "2x224+6x96", "tuned_img_s": 1029.0,
         "naive_img_s": 640.0, "ratio": 1.61, "tuned_peak_mib": 19968.0, "naive_peak_mib": None}]}
    (work / "train.json").write_text(json.dumps(train))
    (work / "t.log").write_text("Traceback\nRuntimeError: CUDA error\n")
    gpu_suite.record(work, "train_r50", 0, 12.3, 110, None, work / "train.json", None, None, "gpu")
    gpu_suite.record(work, "data_gpu", 1, 4.0, 70, None, None, work / "t.log", None, "gpu")
    assert gpu_suite.report(work, out, "bash benchmarks/gpu_suite.sh") == 1
    md = (out / "suite.md").read_text()
    assert "| train_r50 | gpu | PASS | 12 (110) |" in md
    assert "| data_gpu | gpu | FAIL | 4 (70) | exit 1: RuntimeError: CUDA error |" in md
    assert "| resnet50 | 128 | 65536 | 2x224+6x96 | 1029.0 | 640.0 | 1.61x | 1.60x of 643 | 19.5 GiB | n/a |" in md
    assert "Modules missing: fastapi" in md and "NVIDIA H200" in md
    saved = json.loads((out / "suite.json").read_text())
    assert [s["status"] for s in saved["stages"]] == ["pass", "fail"]


QUALITY_ROW = {"benchmark": "quality_gpu", "set": "opencv-digits", "split": "test", "device": "cuda",
               "gpu": "NVIDIA H200", "budget": "3m", "max_steps": None, "train_images": 4000, "test_images": 1000,
               "steps": 812, "train_seconds": 171.0, "export_seconds": 4.0, "eval_seconds": 9.0,
               "recipe": {"global_size": 28, "num_clusters": 64, "batch_size": 128, "backbone": "resnet18"},
               "parity": {"passed": True, "min_cosine": 0.99999, "top1_agreement": 1.0}, "excb_onnx_knn": 0.951,
               "excb_torch_knn": 0.952, "raw_pixels_knn": 0.962, "raw_pixels_whitened_knn": 0.896,
               "random_init_knn": 0.575, "best_pixels_knn": 0.962, "margin_best_pixels": -0.011, "cpu_figure": None}


def test_quality_row_says_when_no_cpu_figure_is_recorded_and_budget_skips_get_a_rerun_line(tmp_path: Path) -> None:
    """Made-up figures, only to check the table: the served kNN beside the best pixels, and the CPU column says
    'not recorded' until quality_cpu.json holds a figure; stages the budget left out are named in one command."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "q.json").write_text(json.dumps(QUALITY_ROW))
    gpu_suite.record(work, "quality_gpu", 0, 190.0, 230, None, work / "q.json", None, None, "gpu")
    gpu_suite.record(work, "train_r50", 77, 0, 110, None, None, None, "suite budget: 40 s of 470 s left", "gpu",
                     budget_skip=True)
    gpu_suite.record(work, "serving", 77, 0, 75, None, None, None, "suite budget: 40 s of 470 s left", "gpu",
                     budget_skip=True)
    assert gpu_suite.report(work, out, "bash benchmarks/gpu_suite.sh") == 0
    md = (out / "suite.md").read_text()
    assert "| **95.1%** | 95.2% | 96.2% | 89.6% | 96.2% | -1.1 | 57.5% | CPU figure: not recorded |" in md
    assert "on cuda (NVIDIA H200), budget 3m: 812 steps in 171 s" in md
    assert "`bash benchmarks/gpu_suite.sh --stages train_r50,serving`" in md
    cpu = {"knn": 0.969, "budget": "10m", "date": "2026-12-06", "machine": "2-core EPYC"}
    (work / "q.json").write_text(json.dumps({**QUALITY_ROW, "cpu_figure": cpu}))
    (work / "stages.jsonl").unlink()
    gpu_suite.record(work, "quality_gpu", 0, 190.0, 230, None, work / "q.json", None, None, "gpu")
    gpu_suite.report(work, out, "bash benchmarks/gpu_suite.sh")
    md = (out / "suite.md").read_text()
    assert "| 57.5% | 96.9% (10m, 2026-12-06, 2-core EPYC) |" in md and "--stages" not in md


def test_the_packed_digits_unpack_into_the_suite_layout_and_the_cpu_figure_is_read_only_when_recorded(
        tmp_path: Path) -> None:
    """The committed .npz is the suite's prepared split (4,000 / 1,000, 10 classes), unpacked per class as
    suite_data writes it; quality_cpu.json's null means 'not recorded', a number is returned with its source."""
    with np.load(quality_gpu.PACK) as data:
        assert data["train_images"].shape == (4000, 20, 20) and data["test_images"].shape == (1000, 20, 20)
        assert data["train_images"].dtype == np.uint8 and set(np.unique(data["test_labels"])) == set(range(10))
        assert not set(data["train_ids"]) & set(data["test_ids"])  # no cell in both splits
        first_test = (int(data["test_labels"][0]), int(data["test_ids"][0]), data["test_images"][0])
    counts = quality_gpu.unpack(quality_gpu.PACK, tmp_path / "set", train_per_class=3, test_per_class=2)
    assert counts == {"train": 30, "test": 20}
    assert sorted(p.name for p in (tmp_path / "set" / "train").iterdir()) == [str(c) for c in range(10)]
    label, cell, pixels = first_test
    assert (np.asarray(Image.open(tmp_path / "set" / "test" / str(label) / f"cell{cell:05d}.png")) == pixels).all()
    committed = quality_gpu.cpu_figure(quality_gpu.CPU_FIGURES)
    assert committed is None or (0 < committed["knn"] <= 1 and committed["command"])
    recorded = tmp_path / "cpu.json"
    recorded.write_text(json.dumps({"opencv-digits": {"test": {"knn": None, "budget": "10m"}}}))
    assert quality_gpu.cpu_figure(recorded) is None and quality_gpu.cpu_figure(tmp_path / "absent.json") is None
    recorded.write_text(json.dumps({"opencv-digits": {"test": {"knn": 0.97, "budget": "10m"}}}))
    assert quality_gpu.cpu_figure(recorded) == {"knn": 0.97, "budget": "10m"}


@pytest.mark.slow
def test_check_mode_runs_every_stage_on_cpu(tmp_path: Path) -> None:
    """What CI runs: the whole suite in --check mode with CUDA hidden; cuda tests are reported as skipped."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--check"], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    suite = json.loads((out / "suite.json").read_text())
    status = {s["stage"]: s["status"] for s in suite["stages"]}
    assert status.pop("correctness") == "skip"
    assert status.pop("service") in ("pass", "skip")  # skip where fastapi/uvicorn are not installed
    assert set(status.values()) == {"pass"}, status
    assert set(status) == {"env", "train_r50", "train_vits", "data_gpu", "data_cpu_loaders", "serving", "quality_gpu"}
    # the stages no GPU run has measured come before the two the first GPU run measured
    assert [s["stage"] for s in suite["stages"]] == ["env", "correctness", "train_vits", "data_gpu", "data_cpu_loaders",
                                                     "service", "quality_gpu", "train_r50", "serving"]
    quality = next(s for s in suite["stages"] if s["stage"] == "quality_gpu")["result"]
    assert quality["steps"] == 4 and quality["train_images"] == 200 and quality["test_images"] == 100
    assert quality["parity"]["passed"] and 0 < quality["excb_onnx_knn"] <= 1
    assert quality["best_pixels_knn"] >= quality["raw_pixels_knn"]
    md = (out / "suite.md").read_text()
    assert "| correctness | check | SKIP |" in md and "skipped (needs a CUDA device)" in md
    assert "| quality_gpu | check | PASS |" in md and "**quality_gpu** (check run" in md
    assert "max_steps=4: 4 steps" in md and "ExCB kNN, ONNX (served)" in md
    assert (out / "logs.tar.gz").exists() and "GPU suite:" in proc.stdout
