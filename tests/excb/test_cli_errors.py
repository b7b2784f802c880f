"""Every config/usage error of every verb is one ``excb: ...`` line and exit 2, never a traceback (issue 15 §4, §7);
``excb train --help-config`` is generated from the pydantic schema."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from excb.cli import main
from excb.config import TrainConfig, config_fields, dump_yaml, resolve
from support import HANG_GUARD_S


def _excb(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "excb.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=HANG_GUARD_S)


@pytest.mark.slow
def test_bad_invocations_are_one_clean_line(tmp_path: Path) -> None:
    """One subprocess per verb family would cost a torch import each; a handful covers the paths that differ."""
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    cases = {
        ("train", "--config", "missing.yaml"): "missing.yaml",
        ("train", "--config", "bad.yaml"): "line 2",
        ("train", "optim.lr=-3", "out=r"): "optim.lr",
        ("train", "data=no-such-folder", "max_steps=1", "out=r2", "device=cpu"): "no-such-folder",
        ("eval", "no-such-run", "--k", "abc"): "--k",
        ("export", "no-such-run", "--out", "b"): "no-such-run",
        ("data", "pack", "no-such-folder", "--out", "p"): "no-such-folder",
        ("presets", "nope"): "nope",
        ("data",): "DATA_COMMAND",
    }
    for args, needle in cases.items():
        r = _excb(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("excb") and needle in last, (args, last)


def test_argparse_errors_and_missing_files_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("excb: train: argument --preset") and err.count("\n") == 1
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: No such file or directory" in capsys.readouterr().err
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:  # excb train installs its stop handlers; put pytest's back
        assert main(["train", f"out={tmp_path / 'r'}", "resume=must", "recipe=off", "device=cpu"]) == 2
        assert capsys.readouterr().err.startswith("excb: config error: resume: resume=must")
        assert main(["train", "data=", f"out={tmp_path / 'e'}", "device=cpu"]) == 2
        assert capsys.readouterr().err.startswith("excb: config error: data.source: empty")
        assert main(["train", "data=list:", f"out={tmp_path / 'e'}", "device=cpu"]) == 2
        assert "expected list:FILE" in capsys.readouterr().err
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_overrides_on_both_sides_of_a_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``excb train data=X --dry-run out=Y`` reads both overrides (argparse alone refuses ``out=Y``); an unknown
    flag among them is still argparse's one-line usage error."""
    out = tmp_path / "r"
    assert main(["train", "data=digits", "--dry-run", f"out={out}", "max_steps=5", "recipe=off"]) == 0
    printed = capsys.readouterr().out
    assert f"out: {out}" in printed and "max_steps: 5" in printed
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "data=digits", "--dry-run", "--bogus", f"out={out}"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_resolved_config_is_trained_as_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--resolved-config`` (how the worker starts a job's trainer, issue 31): the config stored at submit, taken
    whole, not merged again; it goes alone (a preset or key=value beside it is the one config-error line)."""
    stored = resolve({"preset": "cpu-small", "data": "digits", "max_steps": 5, "out": str(tmp_path / "r")})
    text = stored.model_dump_json()
    assert main(["train", "--dry-run", "--resolved-config", text]) == 0
    assert capsys.readouterr().out == dump_yaml(stored)
    assert main(["train", "--resolved-config", text, "max_steps=6"]) == 2
    assert capsys.readouterr().err.startswith("excb: config error: --resolved-config: a resolved config is trained")


def test_help_config_lists_every_field_from_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help-config"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    rows = config_fields()
    names = [r[0] for r in rows]
    assert len(names) == len(set(names)) > 80
    for name in names:
        assert f"  {name} " in text, name
    assert "optim.lr" in names and "model.num_clusters" in names and "overwrite" in names and "checkpoint" in names
    lr = dict((r[0], r) for r in rows)["optim.lr"]
    assert lr[1] == "float (>0.0)" and lr[2] == str(TrainConfig().optim.lr)
    assert "warm start a new run" in text and "(short key: num_clusters)" in text
