"""Run directories written before excb/ was grouped into subpackages (issue 31) still resume.

``fixtures/premove_run`` is a tiny digits run stopped after 4 of 8 steps by the code at commit 29b91bc, when the
trainer was ``excb/trainer.py``. Checkpoints are loaded with ``weights_only=True``,
so they can only name torch and collections classes, never an excb module; the second test checks that in the
pickle itself, for the old file and for one the current code writes.
"""

from __future__ import annotations

import pickletools
import shutil
import zipfile
from pathlib import Path

import torch

from excb.training.checkpoint import latest_checkpoint, load_checkpoint
from excb.training.trainer import train
from support.training import read_rows, tiny

torch.set_num_threads(1)

FIXTURE = Path(__file__).parent / "fixtures" / "premove_run"
# the overrides the fixture was made with (on top of support.training.TINY): a smaller net keeps the file small
FIXTURE_OVERRIDES = ("max_steps=8", "model.width=4", "model.num_clusters=16", "model.projector_hidden_dim=16",
                     "model.bottleneck_dim=8", "model.predictor_hidden_dim=16")


def _pickled_globals(checkpoint: Path) -> set[str]:
    """The ``module name`` of every class or function the checkpoint's pickle refers to."""
    with zipfile.ZipFile(checkpoint) as archive:
        (pkl,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        ops = list(pickletools.genops(archive.read(pkl)))
    assert not any(op.name == "STACK_GLOBAL" for op, _, _ in ops), "protocol 4 pickle: extend the scan"
    return {str(arg) for op, arg, _ in ops if op.name == "GLOBAL"}


def test_a_run_written_before_the_move_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    assert load_checkpoint(latest_checkpoint(run))["step"] == 4
    result = train(tiny(run, *FIXTURE_OVERRIDES))
    assert result.status == "completed" and result.steps == 8
    assert "resumed from the checkpoint at step 4" in (run / "train.log").read_text()
    steps = [r["step"] for r in read_rows(run) if r["type"] == "step"]
    assert steps == list(range(1, 9)), "each step once: 1-4 from the old code, 5-8 resumed"
    assert load_checkpoint(latest_checkpoint(run))["step"] == 8


def test_checkpoints_name_no_excb_module(tmp_path: Path) -> None:
    old = _pickled_globals(FIXTURE / "checkpoints" / "last.pt")
    train(tiny(tmp_path / "new", "max_steps=2"))
    new = _pickled_globals(latest_checkpoint(tmp_path / "new"))
    for names in (old, new):
        assert names and {n.split(" ")[0].split(".")[0] for n in names} <= {"torch", "collections"}, names
