"""benchmarks/gpu_suite.sh cannot rot between the rare GPU sessions: its verdicts and report are unit-tested, and
its ``--check`` mode (tiny shapes, every stage's code path, cuda tests skipped) runs here on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO_ROOT as ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402

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
    assert set(status) == {"env", "train_r50", "train_vits", "data_gpu", "data_cpu_loaders", "serving"}
    md = (out / "suite.md").read_text()
    assert "| correctness | check | SKIP |" in md and "skipped (needs a CUDA device)" in md
    assert (out / "logs.tar.gz").exists() and "GPU suite:" in proc.stdout
