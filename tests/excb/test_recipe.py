"""The recipe fitted to the data (excb/training/recipe.py) and the compute budget (excb/training/budget.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from excb.config import ConfigError, budget_seconds, dump_yaml, load_file, resolve
from excb.training.budget import length_overrides, steps_within, time_steps
from excb.training.recipe import DataProfile, fit, fit_config, inspect_data
from excb.training.trainer import Run, TrainingInterrupted, train

torch.set_num_threads(1)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")

# A budgeted run small enough for CI: the fitted recipe with a narrower net and fewer locals (pinned).
SMALL = ["model.width=8", "augment.num_local_crops=2", "model.projector_hidden_dim=64",
         "model.predictor_hidden_dim=64", "kmeans.samples=256", "progress=false"]


def _folder(root: Path, n: int, size: tuple[int, int], grey: bool) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "train" / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
            if grey:
                arr[..., 1] = arr[..., 2] = arr[..., 0]
            Image.fromarray(arr).save(root / "train" / f"c{c}" / f"{i:04d}.png")
    return root


def test_fit_small_grey_digits_on_cpu() -> None:
    cfg = resolve(overrides=["data=digits"])
    r = fit(cfg, DataProfile(images=4000, short_side=20, long_side=20, grey=True), CPU)
    c = r.choices
    assert c["augment"]["global_size"] == 28 and c["model"]["stem_stride"] == 2  # upsampled: cheaper steps
    assert c["model"]["num_clusters"] == 64 and c["batch_size"] == 128
    assert c["augment"]["solarize_p"] == 0.0 and c["budget"] == "10m" and c["device"] == "cpu"
    assert any(line.startswith("model.num_clusters=64:") for line in r.reasons)
    # 20x20 px: crops keep >= 16x16 / 8x8 of the image's own pixels (the usual 0.3 / 0.1 would be 6x6 / 4x4 px)
    a = c["augment"]
    assert (a["global_scale_min_end"], a["global_scale_min_start"], a["local_scale_min"]) == (0.6, 0.7, 0.16)
    assert c["model"]["embedding"] == "multiscale"



def test_grey_data_on_a_cpu_trains_at_twice_the_learning_rate() -> None:
    """Grey sets on a CPU: AdamW 4e-3 at batch 128 (RESULTS, fifth session: opencv-digits 86.3 -> 92.4 % at 600
    steps); colour data and GPUs keep cpu-small's 2e-3; an explicit lr is never touched."""
    cfg = resolve(overrides=["data=digits"])
    lr = lambda grey, device=CPU: fit(cfg, DataProfile(images=4000, short_side=20, long_side=20, grey=grey),  # noqa
                                      device).choices["optim"]["lr"]
    assert lr(True) == pytest.approx(4e-3) and lr(False) == pytest.approx(2e-3) and lr(None) == pytest.approx(2e-3)
    assert lr(True, CUDA) == pytest.approx(2e-3 * (256 / 128) ** 0.5, rel=1e-3)  # GPU, batch 256: no grey factor
    reason = next(r for r in fit(cfg, DataProfile(images=4000, short_side=20, long_side=20, grey=True), CPU).reasons
                  if r.startswith("optim.lr="))
    assert "grey images on a CPU" in reason
    pinned = resolve(overrides=["data=digits", "optim.lr=0.001"])
    assert "lr" not in fit(pinned, DataProfile(images=4000, short_side=20, long_side=20, grey=True), CPU).choices.get(
        "optim", {})


def test_crop_scales_follow_the_images_own_pixels() -> None:
    cfg = resolve(overrides=["data=digits"])
    crops = lambda side: {k: v for k, v in fit(cfg, DataProfile(images=4000, short_side=side, long_side=side,  # noqa
                          grey=True), CPU).choices["augment"].items() if "scale" in k}
    assert crops(64) == crops(480) == {"global_scale_min_start": 0.4, "global_scale_min_end": 0.3,
                                        "local_scale_min": 0.1}  # enough pixels: the tuned cpu-small scales
    assert crops(8) == {"global_scale_min_start": 0.7, "global_scale_min_end": 0.6, "local_scale_min": 0.3}
    unknown = fit(cfg, DataProfile(images=4000, short_side=None, long_side=None, grey=None), CPU).choices
    assert unknown["augment"]["global_scale_min_end"] == 0.3
    gpu = fit(cfg, DataProfile(images=4000, short_side=64, long_side=64, grey=False), CUDA).choices
    assert gpu["model"].get("embedding", "final") == "final"


def test_fit_sizes_k_and_batch_follow_the_data() -> None:
    cfg = resolve(overrides=["data=digits"])
    fm = fit(cfg, DataProfile(images=60_000, short_side=28, long_side=28, grey=True), CPU).choices
    assert fm["augment"]["global_size"] == 28 and fm["model"]["stem_stride"] == 2
    assert fm["model"]["num_clusters"] == 1024 and fm["augment"]["local_size"] == 16
    photos = fit(cfg, DataProfile(images=500, short_side=480, long_side=640, grey=False), CPU).choices
    assert photos["augment"]["global_size"] == 32 and photos["batch_size"] == 32
    assert photos["augment"]["solarize_p"] == 0.2
    gpu = fit(cfg, DataProfile(images=1_000_000, short_side=375, long_side=500, grey=False), CUDA).choices
    assert gpu["augment"]["global_size"] == 224 and gpu["model"]["backbone"] == "resnet50"
    assert gpu["model"]["num_clusters"] == 16384 and "budget" not in gpu and gpu["epochs"] >= 100


def test_explicit_keys_win_and_later_choices_follow_them() -> None:
    cfg = resolve(overrides=["data=digits", "num_clusters=256", "augment.global_size=24", "batch_size=64"])
    assert {"model.num_clusters", "augment.global_size", "batch_size"} <= set(cfg.pinned)
    c = fit(cfg, DataProfile(images=4000, short_side=20, long_side=20, grey=True), CPU).choices
    assert "num_clusters" not in c["model"] and "global_size" not in c["augment"] and "batch_size" not in c
    assert c["augment"]["local_size"] == 14 and c["model"]["stem_stride"] == 1  # follow the pinned 24 px
    assert c["optim"]["lr"] == pytest.approx(4e-3 * (64 / 128) ** 0.5, rel=1e-3)  # grey on a CPU: 2x, batch-scaled
    fitted, _ = fit_config(cfg, CPU)
    assert fitted.model.num_clusters == 256 and fitted.augment.global_size == 24 and fitted.recipe == "fitted"


def test_a_length_given_means_no_default_budget() -> None:
    for given in ("epochs=5", "max_steps=100", "budget=2m"):
        cfg = resolve(overrides=["data=digits", given])
        c = fit(cfg, DataProfile(images=4000, short_side=20, long_side=20, grey=True), CPU).choices
        assert "budget" not in c and "epochs" not in c, given


def test_presets_are_not_refitted_unless_asked() -> None:
    cfg = resolve(preset_name="cpu-small")
    assert cfg.recipe == "off" and fit_config(cfg, CPU) == (cfg, None)
    assert resolve(preset_name="cpu-small", overrides=["recipe=auto"]).recipe == "auto"


def test_pinned_survives_a_round_trip_through_a_full_dump(tmp_path: Path) -> None:
    """The API stores the full config and the worker re-reads it: pinned must stay the user's keys only."""
    cfg = resolve({"optim": {"lr": 0.01}}, ["data=digits"])
    again = resolve(json.loads(cfg.model_dump_json()))
    assert again.pinned == cfg.pinned == ["optim.lr"]
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert resolve(load_file(path), ["batch_size=16"]).pinned == ["batch_size", "optim.lr"]


def test_inspect_folder_sizes_and_colour(tmp_path: Path) -> None:
    grey = inspect_data(resolve(overrides=[f"data={_folder(tmp_path / 'g', 20, (40, 30), grey=True)}"]))
    assert (grey.images, grey.short_side, grey.long_side, grey.grey) == (20, 30, 40, True)
    colour = inspect_data(resolve(overrides=[f"data={_folder(tmp_path / 'c', 16, (64, 64), grey=False)}"]))
    assert colour.grey is False and colour.short_side == 64
    arrays = inspect_data(resolve(overrides=["data=digits"]))
    assert (arrays.short_side, arrays.grey) == (8, True) and arrays.images == 1438


def test_budget_parsing() -> None:
    assert [budget_seconds(t) for t in ("600s", "10m", "2h", "90sec", "1.5m")] == [600, 600, 7200, 90, 90]
    for bad in ("ten minutes", "-5m", "0", "5d", "90"):
        with pytest.raises(ConfigError) as err:
            resolve(overrides=[f"budget={bad}"])
        assert err.value.field == "budget"


def test_steps_within_and_length() -> None:
    assert steps_within(100.0, 0.5, 10.0) == int(90 * 0.97 / 0.5)
    assert steps_within(10.0, 1.0, 20.0) == 10  # never below the minimum
    cfg = resolve(overrides=["data=digits"])
    out = length_overrides(cfg, 1000, 11, fitted=True)
    assert out["max_steps"] == 1000 and out["epochs"] == 91
    assert out["optim"]["warmup_epochs"] == pytest.approx(0.05 * 1000 / 11, rel=1e-3)
    assert "optim" not in length_overrides(resolve(overrides=["optim.warmup_epochs=2"]), 1000, 11, fitted=True)


def test_a_short_budget_names_a_budget_that_holds_set_up_steps_and_the_whitening_fit() -> None:
    from excb.training.budget import SAFETY, Calibration, short_budget_warning

    cal = Calibration(budget_seconds=30, seconds_per_step=0.1, seconds_before_training=10, steps=150,
                      seconds_for_whitening=50)
    line = short_budget_warning(cal, "30s", needed=200)
    assert line is not None and "fewer than the 200" in line
    minimum = 10 + 200 * 0.1 / SAFETY + 50  # without the fit's reserve the advice would be too short to hold it
    assert f"budget={int(-(-minimum // 1))}s or more" in line
    assert short_budget_warning(cal, "30s", needed=150) is None


def test_timing_steps_leaves_the_run_untouched(tmp_path: Path) -> None:
    cfg, _ = fit_config(resolve(overrides=["data=digits", f"out={tmp_path}", "max_steps=5", *SMALL]), CPU)
    from excb.distributed import setup

    run = Run(cfg, setup("cpu"))
    before = {k: v.clone() for k, v in run.learner.student_core.state_dict().items()}
    assert time_steps(run, steps=2, warmup=1) > 0
    after = run.learner.student_core.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and run.step == 0


@pytest.mark.slow
def test_budgeted_run_plans_once_and_resume_keeps_the_step_count(tmp_path: Path) -> None:
    out = tmp_path / "run"
    over = ["data=digits", f"out={out}", "budget=25s", *SMALL]
    calls = {"n": 0}

    def stop_early() -> bool:
        calls["n"] += 1
        return calls["n"] == 5

    with pytest.raises(TrainingInterrupted):
        train(resolve(overrides=over), should_stop=stop_early)
    plan = json.loads((out / "recipe.json").read_text())
    planned = plan["length"]["max_steps"]
    assert plan["calibration"]["seconds_per_step"] > 0 and plan["choices"]["model"]["num_clusters"] == 64
    assert load_file(out / "config.yaml")["max_steps"] == planned
    result = train(resolve(overrides=over))  # the same command again: resumes, no new fit, no new timing
    assert result.steps == planned == json.loads((out / "recipe.json").read_text())["length"]["max_steps"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "step"] == list(range(1, planned + 1))


def test_cli_dry_run_shows_the_fitted_recipe(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "excb.cli", "train", "--dry-run", "data=digits", "budget=3m",
                          f"out={tmp_path}"], capture_output=True, text=True, check=True).stdout
    assert "# recipe fitted to 1438 images, median 8x8 px, grey on cpu" in out
    assert "augment.global_size=28: the images' median short side is 8 px; upsampled" in out
    assert "model.num_clusters=64" in out and "max_steps is set at the start" in out
    assert "recipe: fitted" in out and "budget: 3m" in out


@pytest.mark.slow
def test_a_folder_of_any_sizes_and_modes_trains_within_its_budget(tmp_path: Path) -> None:
    """Grey, RGBA, palette and RGB files of different sizes plus one corrupt file: fitted, trained, counted."""
    rng = np.random.default_rng(1)
    root = tmp_path / "mixed"
    root.mkdir()
    for i in range(48):
        w, h = int(rng.integers(24, 90)), int(rng.integers(24, 90))
        image = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
        image = [image, image.convert("L"), image.convert("RGBA"), image.convert("P")][i % 4]
        image.save(root / f"{i:03d}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = train(resolve(overrides=[f"data={root}", f"out={tmp_path / 'run'}", "budget=15s", *SMALL]))
    plan = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert plan["profile"]["images"] == 49 and plan["profile"]["grey"] is False
    assert plan["choices"]["batch_size"] == 16 and plan["choices"]["augment"]["global_size"] == 32
    assert result.status == "completed" and result.steps == plan["length"]["max_steps"]
    assert result.summary["skipped_files"] >= 1


def _glyphs(n: int, mirrored_half: bool) -> torch.Tensor:
    """``n`` noisy, slightly shifted copies of 10 random blocky glyphs; optionally every other one mirrored."""
    gen = torch.Generator().manual_seed(0)
    shapes = (torch.rand(10, 1, 4, 4, generator=gen) > 0.5).float().repeat_interleave(3, 2).repeat_interleave(3, 3)
    out = torch.zeros(n, 1, 16, 16)
    for i in range(n):
        glyph = shapes[i % 10]
        if mirrored_half and (i // 10) % 2:
            glyph = glyph.flip(-1)
        top, left = (int(v) for v in torch.randint(0, 5, (2,), generator=gen))  # shifts symmetric under a flip
        out[i, :, top:top + 12, left:left + 12] = glyph
    return out + 0.6 * torch.rand(out.shape, generator=gen)


def test_mirror_ratio_tells_handed_data_from_data_seen_both_ways() -> None:
    from excb.training.mirror import MIRROR_RATIO_MAX, mirror_ratio

    handed, both = mirror_ratio(_glyphs(200, False)), mirror_ratio(_glyphs(200, True))
    assert handed is not None and both is not None
    assert handed > 1.5 * MIRROR_RATIO_MAX and both < MIRROR_RATIO_MAX, (handed, both)
    assert mirror_ratio(_glyphs(5, False)) is None  # too few images to say
    assert inspect_data(resolve(overrides=["data=digits"])).mirror_ratio > MIRROR_RATIO_MAX  # real digits


def test_flips_follow_the_mirror_test_and_yield_to_the_user() -> None:
    cfg = resolve(overrides=["data=digits"])
    profile = lambda ratio: DataProfile(images=4000, short_side=20, long_side=20, grey=True,  # noqa: E731
                                        mirror_ratio=ratio)
    assert fit(cfg, profile(2.0), CPU).choices["augment"]["flip_p"] == 0.0
    assert fit(cfg, profile(1.0), CPU).choices["augment"]["flip_p"] == 0.5
    assert "flip_p" not in fit(cfg, profile(None), CPU).choices["augment"]
    pinned = resolve(overrides=["data=digits", "augment.flip_p=0.5"])
    assert "flip_p" not in fit(pinned, profile(2.0), CPU).choices["augment"]


def test_the_fitted_recipe_whitens_the_embedding_unless_told_not_to() -> None:
    profile = DataProfile(images=4000, short_side=20, long_side=20, grey=True)
    for device in (CPU, CUDA):
        r = fit(resolve(overrides=["data=digits"]), profile, device)
        assert r.choices["model"]["whitening"] == "pca"
        assert any(line.startswith("model.whitening=pca:") for line in r.reasons)
    kept = fit(resolve(overrides=["data=digits", "model.whitening=off"]), profile, CPU)
    assert "whitening" not in kept.choices["model"]
    assert resolve(preset_name="cpu-small", overrides=["data=digits"]).model.whitening == "off"  # presets: as tuned


def test_the_budget_check_keeps_the_first_plans_warm_up(tmp_path: Path) -> None:
    """A correction to more than twice the planned steps stretches the tail: the warm-up the first plan fixed
    stays, so the learning rate at the check is at its peak, not back in warm-up (issue 28 item 4)."""
    import time

    from excb.distributed import setup
    from excb.method.schedules import learning_rate
    from excb.training.budget import BudgetCheck
    from excb.training.plan import correct_length, set_length
    from excb.training.run_log import RunLogger

    cfg, recipe = fit_config(resolve(overrides=["data=digits", f"out={tmp_path}", "max_steps=5", *SMALL]), CPU)
    run, plan = Run(cfg, setup("cpu")), recipe.to_json()
    set_length(run, plan, 200)  # the first plan: 200 steps, a warm-up of 5% of them
    first = json.loads((tmp_path / "recipe.json").read_text())["length"]
    warmup = run.warmup_steps
    assert warmup == 10 and first["max_steps"] == 200
    check = BudgetCheck(600.0, time.time(), run.total_steps, 0, plan)
    run.step = check.check_step  # the loop reached the check after a fraction of a second: far faster than planned
    correct_length(run, check, RunLogger(tmp_path, run.ctx), None)
    assert run.total_steps > 2 * 200 and run.warmup_steps == warmup
    stored = json.loads((tmp_path / "recipe.json").read_text())
    assert stored["length"]["optim"] == first["optim"] and stored["length"]["max_steps"] == run.total_steps
    lr = learning_rate(run.step, run.total_steps, cfg.optim.lr, run.warmup_steps, cfg.optim.lr_min_factor)
    assert lr > 0.99 * cfg.optim.lr


def test_the_budget_is_corrected_three_times_each_from_the_pace_since_the_last_check(monkeypatch) -> None:
    """The loop's pace drifts (tiny images: the calibrated step was 15% off the loop's average): the end moves at
    10%, 35% and 60% of the run, each time at the pace of the stretch since the previous check, then no more."""
    from excb.training import budget

    clock = [1000.0]
    monkeypatch.setattr(budget.time, "time", lambda: clock[0])
    check = budget.BudgetCheck(1000.0, 1000.0, 1000, 0, {})
    assert check.check_step == 100 and not check.due(99) and check.due(100)
    clock[0] = 1100.0  # 1 s per step so far
    total = check.corrected_steps(100)
    assert total == 100 + budget.steps_within(900.0, 1.0, 0.0) == 973
    assert check.check_step == int(973 * 0.35)
    clock[0] += (check.check_step - 100) * 0.5  # the loop sped up: the new pace, not the run's average, counts
    at = check.check_step
    total = check.corrected_steps(at, agree=lambda n: n - 1)  # another rank counted one step fewer
    assert total == at + budget.steps_within(1000.0 - (clock[0] - 1000.0), 0.5, 0.0) - 1
    assert check.check_step == int(total * 0.6)
    clock[0] += 1.0
    check.corrected_steps(check.check_step)
    assert check.check_step is None and not check.due(10**9)


@pytest.mark.slow
def test_a_budget_holds_the_whitening_fit_and_the_summary_says_where_the_time_went(tmp_path: Path) -> None:
    """budget=20s: the calibration reserves the end-of-run whitening fit before it counts steps, and summary.json
    and the run's last log line give set-up, training and fitting time (issue 28 item 4)."""
    from excb.training.budget import steps_within

    out = tmp_path / "run"
    result = train(resolve(overrides=["data=digits", f"out={out}", "budget=20s", *SMALL]))
    cal = json.loads((out / "recipe.json").read_text())["calibration"]
    assert cal["seconds_for_whitening"] > 0
    assert cal["steps"] == steps_within(cal["budget_seconds"] - cal["seconds_for_whitening"],
                                        cal["seconds_per_step"], cal["seconds_before_training"])
    timing = json.loads((out / "summary.json").read_text())["timing"]
    assert timing == result.summary["timing"]
    assert all(timing[k] > 0 for k in ("setup_seconds", "training_seconds", "whitening_seconds"))
    # each figure is rounded to 0.01 s on its own (excb/training/run_log.timing): up to 0.005 s each way
    parts = timing["setup_seconds"] + timing["training_seconds"] + timing["whitening_seconds"]
    assert timing["total_seconds"] >= parts - 0.02
    assert timing["setup_seconds"] >= cal["seconds_before_training"] - 0.01
    last = (out / "train.log").read_text().strip().splitlines()[-1]
    assert "completed after" in last and f"set-up {timing['setup_seconds']:.1f} s" in last, last
    assert "training " in last and "whitening fit " in last and "total " in last, last
