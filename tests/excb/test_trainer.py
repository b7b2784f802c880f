"""The training loop end to end on CPU: runs, resumes exactly, survives bad files, distributes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from excb.config import COMPILE_MIN_STEPS, resolve
from excb.method.step import compile_decision
from excb.training.checkpoint import latest_checkpoint, load_checkpoint
from excb.training.trainer import TrainingInterrupted, train
from support import HANG_GUARD_S
from support.training import TINY, read_rows, tiny

torch.set_num_threads(1)

def test_run_directory_and_metrics(tmp_path: Path) -> None:
    result = train(tiny(tmp_path / "r", "max_steps=6"))
    run = tmp_path / "r"
    assert result.steps == 6 and result.status == "completed"
    for name in ("config.yaml", "metrics.jsonl", "train.log", "summary.json", "checkpoints/last.pt",
                 "backbone.safetensors", "backbone.json"):
        assert (run / name).exists(), name
    rows = read_rows(run)
    steps = [r for r in rows if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for key in ("loss", "acc", "lr", "wd", "wd_centroid", "ema_momentum", "changed_labels", "confidence_tr",
                "confidence_st", "unique_labels_tr", "unique_labels_st", "label_agreement", "llb_min", "lhb_min",
                "s_entropy", "s_effective_clusters", "s_empty_fraction", "s_rel_size_p50", "img_per_s"):
        assert key in steps[-1], key
        assert np.isfinite(steps[-1][key]), key
    curves = [r for r in rows if r["type"] == "cluster_sizes"]
    assert curves and len(curves[-1]["rank"]) == 32
    assert curves[-1]["balance"]["num_clusters"] == 32  # statistics of the full size estimate, not the curve
    assert any(r["type"] == "kmeans" for r in rows)
    assert {r["type"] for r in rows} >= {"step", "cluster_sizes", "done"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["balance"]["num_clusters"] == 32


def _state(run_dir: Path) -> dict:
    return load_checkpoint(latest_checkpoint(run_dir))


def test_exact_resume(tmp_path: Path) -> None:
    """N steps straight == N/2 steps, a fresh process-like restart, then N/2 more: identical weights and s."""
    train(tiny(tmp_path / "straight", "max_steps=8"))
    stopped = {"n": 0}

    def stop_at_4() -> bool:
        stopped["n"] += 1
        return stopped["n"] == 4

    with pytest.raises(TrainingInterrupted):
        train(tiny(tmp_path / "resumed", "max_steps=8"), should_stop=stop_at_4)
    assert _state(tmp_path / "resumed")["step"] == 4
    train(tiny(tmp_path / "resumed", "max_steps=8"))
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    assert a["step"] == b["step"] == 8
    for part in ("student", "teacher"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert torch.equal(a["balancer"]["sizes"], b["balancer"]["sizes"])
    rows = [r["step"] for r in read_rows(tmp_path / "resumed") if r["type"] == "step"]
    assert rows == list(range(1, 9)), "metrics.jsonl must have each step exactly once after a resume"


@pytest.mark.slow
def test_compile_matches_eager(tmp_path: Path) -> None:
    """``compile=on`` trains the same model: same losses (to float tolerance), same checkpoint keys; ``auto``
    leaves a run too short to pay for compiling eager."""
    eager = train(tiny(tmp_path / "eager", "max_steps=3", "compile=auto"))
    compiled = train(tiny(tmp_path / "compiled", "max_steps=3", "compile=true"))
    assert eager.summary["compiled"] is False and compiled.summary["compiled"] is True
    losses = {name: [r["loss"] for r in read_rows(tmp_path / name) if r["type"] == "step"]
              for name in ("eager", "compiled")}
    assert len(losses["compiled"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3)
    a, b = _state(tmp_path / "eager"), _state(tmp_path / "compiled")
    assert a["student"].keys() == b["student"].keys() and a["teacher"].keys() == b["teacher"].keys()


def test_compile_auto_needs_a_long_run_and_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = resolve(preset_name="cpu-small", overrides=["compile=auto"])
    cpu = torch.device("cpu")
    assert compile_decision(cfg, cpu, COMPILE_MIN_STEPS - 1)[0] is False
    monkeypatch.setenv("CXX", "no-such-compiler-on-path")
    on, why = compile_decision(cfg, cpu, 10 * COMPILE_MIN_STEPS)
    assert on is False and "no C++ compiler" in why
    monkeypatch.setenv("CXX", sys.executable)  # any executable on disk stands in for a found compiler
    assert compile_decision(cfg, cpu, 10 * COMPILE_MIN_STEPS)[0] is True
    assert compile_decision(resolve(overrides=["compile=off"]), cpu, 10 * COMPILE_MIN_STEPS)[0] is False


def _write_folder(root: Path, n_good: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n_good):
        arr = (rng.random((20, 20, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"good_{i:03d}.png")
    (root / "truncated.jpg").write_bytes((root / "good_000.png").read_bytes()[:60])
    (root / "notes.png").write_text("this is not an image")
    (root / "empty.jpg").write_bytes(b"")
    good = root / "good_001.png"
    (root / "corrupt.png").write_bytes(good.read_bytes()[:30] + b"\x00" * 200)


def test_corrupted_files_are_skipped_and_counted(tmp_path: Path) -> None:
    data = tmp_path / "imgs"
    data.mkdir()
    _write_folder(data, 60)
    result = train(tiny(tmp_path / "r", f"data={data}", "epochs=2", "batch_size=16", "model.small_images=true"))
    assert result.status == "completed"
    assert result.summary["skipped_files"] >= 4  # each bad file is seen at least once per epoch it is sampled
    assert result.summary["steps"] == 2 * (64 // 16)


def test_empty_dataset_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    from excb.data.datasets import EmptyDatasetError

    with pytest.raises(EmptyDatasetError, match="nothing"):
        train(tiny(tmp_path / "r", f"data={empty}"))


@pytest.mark.parametrize("method", ["dino-centering", "none"])
def test_baselines_share_the_code_path(tmp_path: Path, method: str) -> None:
    result = train(tiny(tmp_path / method, "max_steps=3", f"balancing.method={method}"))
    assert result.steps == 3


def test_vit_and_sgd_run(tmp_path: Path) -> None:
    result = train(tiny(tmp_path / "vit", "max_steps=2", "backbone=vit_tiny", "model.patch_size=4",
                        "augment.local_size=8", "optim.name=sgd", "optim.lr=0.05", "optim.clip_grad=1.0",
                        "model.drop_path_rate=0.1"))
    assert result.steps == 2


@pytest.mark.slow
def test_cli_sigterm_checkpoints_and_exits_retryable(tmp_path: Path) -> None:
    out = tmp_path / "sig"
    cmd = [sys.executable, "-m", "excb.cli", "train", "--preset", "cpu-small", *TINY, f"out={out}", "max_steps=100000",
           "checkpoint_every_steps=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    import time

    deadline = time.time() + HANG_GUARD_S
    while time.time() < deadline:
        if metrics.exists() and sum(1 for ln in metrics.read_text().splitlines() if '"type": "step"' in ln) >= 3:
            break
        time.sleep(0.2)
    proc.terminate()
    assert proc.wait(timeout=HANG_GUARD_S) == 143
    step = load_checkpoint(out / "checkpoints" / "last.pt")["step"]
    assert step >= 3


def test_cli_bad_config_names_field(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "excb.cli", "train", "optim.lr=-3", f"out={tmp_path}"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "optim.lr" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_train(out: Path, *overrides: str) -> None:
    """``excb train`` (cpu-small, TINY) as two gloo ranks under torchrun, one thread each; fails on a non-zero exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "excb.cli", "train", "--preset", "cpu-small", *TINY, f"out={out}", "model.sync_bn=false", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_two_process_gloo_training(tmp_path: Path) -> None:
    """The same trainer under torchrun (gloo, CPU): ranks agree on the size estimate and the teacher."""
    out = tmp_path / "ddp"
    _torchrun_train(out, "max_steps=3")
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 3
    assert float(ckpt["balancer"]["sizes"].sum()) == pytest.approx(1.0, abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["images_seen"] == 3 * 32


@pytest.mark.slow
def test_two_process_budget_ends_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """budget= under torchrun: the calibration takes the slowest rank's step and every correction the fewest steps
    any rank computed, so the ranks stop together (a rank one step longer would wait in its all-reduce forever)."""
    out = tmp_path / "ddp"
    _torchrun_train(out, "budget=45s")
    plan = json.loads((out / "recipe.json").read_text())
    assert plan["corrections"], plan  # the loop was re-timed at least once
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == plan["length"]["max_steps"]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


_GROUP_SCRIPT = """
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, sys.argv[1])
from support.training import tiny  # noqa: E402
from excb.training.trainer import train  # noqa: E402

train(tiny(Path(sys.argv[2]), "max_steps=2", "model.sync_bn=false"))
# one file per rank: two ranks printing to one pipe interleave their words
Path(sys.argv[3], "rank" + os.environ["RANK"]).write_text(str(dist.is_initialized()))
"""


@pytest.mark.slow
def test_a_run_destroys_the_process_group_it_created(tmp_path: Path) -> None:
    """train() under torchrun joins a process group and destroys it at the end of the run: a process that goes
    on (a second run, a notebook) starts without a stale group."""
    script = tmp_path / "one_run.py"
    script.write_text(_GROUP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           str(script), str(Path(__file__).resolve().parents[1]), str(tmp_path / "run"), str(tmp_path)]
    # a 2-step run takes ~20 s on an idle 2-core machine
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == ["False", "False"], r.stdout


def test_a_run_leaves_a_process_group_its_caller_created(tmp_path: Path) -> None:
    """A group that existed before train() (the caller's, as in tests/excb/test_cuda.py's torchrun launch) is the
    caller's to destroy: the run uses it and leaves it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert train(tiny(tmp_path / "run", "max_steps=2")).steps == 2
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_online_knn_every_epoch(tmp_path: Path) -> None:
    # stride-1 stem: at 16 px the preset's stride 2 leaves 1x1 maps for this 2-epoch width-8 net
    train(tiny(tmp_path / "knn", "epochs=2", "batch_size=256", "eval.knn_every_epochs=1", "eval.test_limit=100",
               "model.stem_stride=1"))
    evals = [r for r in read_rows(tmp_path / "knn") if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert all(0.3 < r["knn_acc"] <= 1.0 for r in evals)  # digits: far above the 10% of chance


def test_resume_falls_back_to_the_previous_checkpoint_when_last_is_damaged(tmp_path: Path) -> None:
    """reliability.md row 14: the last two checkpoints are kept; a damaged last.pt (bad disk, bad copy) makes
    the resume use previous.pt, and the run still ends identical to an uninterrupted one."""
    train(tiny(tmp_path / "straight", "max_steps=6", "checkpoint_every_steps=2"))
    calls = {"n": 0}

    def stop_at_3() -> bool:
        calls["n"] += 1
        return calls["n"] == 3

    run = tmp_path / "damaged"
    with pytest.raises(TrainingInterrupted):
        train(tiny(run, "max_steps=6", "checkpoint_every_steps=2"), should_stop=stop_at_3)
    folder = run / "checkpoints"
    assert load_checkpoint(folder / "last.pt")["step"] == 3 and load_checkpoint(folder / "previous.pt")["step"] == 2
    data = (folder / "last.pt").read_bytes()
    (folder / "last.pt").write_bytes(data[: len(data) // 2])  # truncated
    result = train(tiny(run, "max_steps=6", "checkpoint_every_steps=2"))
    assert result.steps == 6 and "last.pt is unreadable" in (run / "train.log").read_text()
    a, b = _state(tmp_path / "straight"), _state(run)
    for key in a["teacher"]:
        assert torch.equal(a["teacher"][key], b["teacher"][key]), key
    rows = [r["step"] for r in read_rows(run) if r["type"] == "step"]
    assert rows == list(range(1, 7))


def test_channels_last_on_cpu_trains_the_same_model(tmp_path: Path) -> None:
    """``channels_last=true`` on a CPU runs NHWC convolutions (weights stored channels-last) and gives the same
    losses as contiguous weights: a memory layout, not a different model."""
    nchw = train(tiny(tmp_path / "nchw", "max_steps=3", "channels_last=false"))
    nhwc = train(tiny(tmp_path / "nhwc", "max_steps=3", "channels_last=true"))
    assert nchw.steps == nhwc.steps == 3
    losses = {n: [r["loss"] for r in read_rows(tmp_path / n) if r["type"] == "step"] for n in ("nchw", "nhwc")}
    assert losses["nhwc"] == pytest.approx(losses["nchw"], rel=2e-3)  # summation order differs after a few steps
    convs = [w for k, w in _state(tmp_path / "nhwc")["student"].items() if w.dim() == 4 and k.endswith("weight")]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
