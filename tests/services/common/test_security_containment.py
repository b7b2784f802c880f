"""Issue 13 item 4: every file a job reads stays inside the data roots (symlinks, ``list:`` lines), checked by
the API on submit and again by the worker before it starts the trainer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from services.common.paths import PathNotAllowed, check_source_contained

SHORT = {"preset": "cpu-small", "max_steps": 5}


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"im{i}.png"
        Image.new("RGB", (8, 8), (i * 40 % 256, 0, 0)).save(path)
        out.append(path)
    return out


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "data"
    outside = tmp_path / "secret"
    _images(root / "ok", 3)
    _images(outside, 4)
    (root / "trojan").mkdir()
    _images(root / "trojan", 1)
    os.symlink(outside, root / "trojan" / "more")  # a folder in the root, a symlink inside it
    (root / "abs.txt").write_text("".join(f"{p}\n" for p in sorted(outside.iterdir())))
    (root / "dotdot.txt").write_text("ok/im0.png\n../secret/im0.png\n")
    (root / "good.txt").write_text("ok/im0.png\nok/im1.png\n")
    return {"root": root, "outside": outside}


def test_check_source_contained_follows_every_file(layout: dict[str, Path]) -> None:
    root = layout["root"]
    assert check_source_contained(str(root / "ok"), [root]) == 4  # the folder + 3 images
    assert check_source_contained(f"list:{root / 'good.txt'}", [root]) == 3
    for bad in [str(root / "trojan"), f"list:{root / 'abs.txt'}", f"list:{root / 'dotdot.txt'}"]:
        with pytest.raises(PathNotAllowed, match="outside the configured data roots"):
            check_source_contained(bad, [root])


@pytest.fixture
def stack(db_url: str, make_stack: Any, layout: dict[str, Path]) -> Any:
    st = make_stack(db_url, None)
    st.env["EXCB_DATA_ROOTS"] = f'["{layout["root"]}"]'
    st.client = st.start_api()
    return st


def test_api_refuses_symlinks_and_list_lines_leaving_the_root(stack: Any) -> None:
    """Before: the symlinked folder trained on 4 outside images (201) and list: lines read outside files."""
    c = stack.client
    assert c.post("/v1/jobs", json={**SHORT, "data": "ok"}).status_code == 201
    assert c.post("/v1/jobs", json={**SHORT, "data": "list:good.txt"}).status_code == 201
    for bad in ["trojan", "list:abs.txt", "list:dotdot.txt"]:
        r = c.post("/v1/jobs", json={**SHORT, "data": bad})
        assert r.status_code == 422, (bad, r.text)
        body = r.json()["error"]
        assert body["type"] == "path_not_allowed" and body["field"] == "data.source"


def test_worker_checks_again_before_training(stack: Any, layout: dict[str, Path]) -> None:
    """A symlink added after submit (or a row that never came through the API) fails the job, not retried,
    and no trainer starts."""
    from services.db import jobs as store
    from services.db.session import Database
    from services.worker.runner import JobRunner

    c = stack.client
    root = layout["root"]
    job = c.post("/v1/jobs", json={**SHORT, "data": "ok"}).json()
    os.symlink(layout["outside"] / "im0.png", root / "ok" / "late.png")
    settings = stack.settings()
    db = Database(settings.database_url)
    server_id = Path(job["config"]["out"]).name
    assert JobRunner(db, settings, server_id).run() == "failed"
    row = store.get_job(db, server_id)
    assert row.status == "FAILED" and row.error["type"] == "path_not_allowed"
    assert "late.png" in row.error["message"]
    assert not (Path(row.run_dir) / "metrics.jsonl").exists()
