"""The one config schema for CLI, files and the job API."""

import json

import pytest

from excb.config import ConfigError, dump_yaml, load_file, resolve


def test_short_keys_and_preset() -> None:
    cfg = resolve({"preset": "cpu-small", "data": "digits", "max_steps": 50})
    assert cfg.data.source == "digits" and cfg.max_steps == 50 and cfg.model.width == 16
    assert cfg.model.num_clusters == 1024  # from the preset
    assert cfg.balancing.size_momentum == 0.999 and cfg.ema_momentum_start == 0.99


def test_overrides_have_priority_and_parse_types() -> None:
    cfg = resolve({"optim": {"lr": 0.5}}, ["optim.lr=1e-3", "backbone=vit_tiny", "num_clusters=64",
                                          "augment.blur_p=[0.5,0.5,0.5]", "kmeans.enabled=false"])
    assert cfg.optim.lr == 1e-3 and cfg.model.backbone == "vit_tiny" and cfg.model.num_clusters == 64
    assert cfg.augment.blur_p == (0.5, 0.5, 0.5) and cfg.kmeans.enabled is False


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"optim": {"lrr": 1}}, "optim.lrr"),
        ({"batch_size": "big"}, "batch_size"),
        ({"model": {"backbone": "alexnet"}}, "model.backbone"),
        ({"preset": "nope"}, "preset"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_config_names_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve(raw)
    assert err.value.field == field


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError):
        resolve({}, ["no_equals_sign"])


def test_yaml_and_json_round_trip(tmp_path) -> None:
    cfg = resolve(preset_name="vit-s16-ep800")
    y = tmp_path / "c.yaml"
    y.write_text(dump_yaml(cfg))
    assert resolve(load_file(y)) == cfg
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"data": "digits", "epochs": 3}))
    assert resolve(load_file(j)).epochs == 3


def test_reference_presets_match_method_spec() -> None:
    r50 = resolve(preset_name="resnet50-ep400")
    assert (r50.optim.name, r50.optim.lr, r50.optim.weight_decay, r50.model.num_clusters) == ("sgd", 0.6, 1e-4, 65536)
    assert r50.balancing.teacher_temp == 0.04 and r50.balancing.student_temp == 0.1
    assert r50.balancing.size_momentum == 0.999 and r50.augment.num_local_crops == 6
    vit = resolve(preset_name="vit-s16-ep800")
    assert (vit.optim.name, vit.optim.lr, vit.optim.weight_decay_end_factor) == ("adamw", 0.002, 10.0)
    assert vit.model.drop_path_rate == 0.1 and vit.epochs == 800 and vit.model.mlp_bn is False
