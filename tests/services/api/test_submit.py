"""services/api/submit.py directly: a job body becomes a bounded, path-safe config whose ``out`` the server owns."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.api.schemas import JobSubmit
from services.api.submit import build_config, discard_run_dir, fresh_run
from services.common.errors import ApiError
from services.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    return Settings(home=tmp_path, data_roots=[tmp_path / "data"])


def _error(body: dict, settings: Settings, run_dir: Path) -> ApiError:
    with pytest.raises(ApiError) as info:
        build_config(JobSubmit.model_validate(body), settings, run_dir)
    return info.value


def test_out_is_the_servers_run_dir_and_sources_resolve_inside_the_roots(settings: Settings, tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "j-1"
    data = build_config(JobSubmit.model_validate({"data": {"source": "imgs"}, "out": "/etc", "max_steps": 3}),
                        settings, run_dir)
    assert data["out"] == str(run_dir) and data["max_steps"] == 3
    assert data["data"]["source"] == str((tmp_path / "data" / "imgs").resolve())
    assert build_config(JobSubmit.model_validate({"data": "digits"}), settings, run_dir)["data"]["source"] == "digits"


@pytest.mark.parametrize("body, status, code, field", [
    ({"data": "/etc"}, 422, "path_not_allowed", "data.source"),
    ({"data": "../../etc"}, 422, "path_not_allowed", "data.source"),
    ({"data": "digits", "batch_size": 10**7}, 422, "validation_error", "batch_size"),
    ({"data": "digits", "model": {"num_clusters": 10**8}}, 422, "validation_error", "model.num_clusters"),
    ({"data": "digits", "optim": {"lr": float("inf")}}, 422, "validation_error", None),
    ({"data": "digits", "no_such_key": 1}, 422, "validation_error", None),
    ({"data": "digits", "checkpoint": "/etc/passwd"}, 422, "path_not_allowed", "checkpoint"),
])
def test_bad_bodies_are_422_with_the_field(settings: Settings, tmp_path: Path, body: dict, status: int, code: str,
                                           field: str | None) -> None:
    err = _error(body, settings, tmp_path / "runs" / "j-2")
    assert (err.status, err.type) == (status, code), (err.status, err.type, err.message)
    if field is not None:
        assert err.field == field


def test_fresh_runs_are_new_and_deleting_touches_only_the_runs_dir(settings: Settings, tmp_path: Path) -> None:
    job_id, run_dir = fresh_run(settings)
    assert job_id.startswith("j-") and not run_dir.exists() and run_dir.parent == Path(settings.runs_dir).resolve()
    run_dir.mkdir(parents=True)
    (run_dir / "train.log").write_text("x")
    outside = tmp_path / "data" / "imgs"
    discard_run_dir(settings, str(outside))
    discard_run_dir(settings, str(Path(settings.runs_dir)))
    assert outside.is_dir() and Path(settings.runs_dir).is_dir()
    discard_run_dir(settings, str(run_dir))
    assert not run_dir.exists()
