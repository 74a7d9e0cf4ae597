"""Config: merging, overrides, schema defaults and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlmat.config import ConfigError, load_config

ROOT = Path(__file__).parents[1]


def test_paper_config_validates_with_defaults():
    config = load_config([ROOT / "config.yaml"])
    assert config["model"]["hidden"] == 256 and config["train"]["batch_size"] == 16
    assert config["featurizer"] == {
        "cutoff": 8.0,
        "max_neighbors": 12,
        "atom_features": "cgcnn",
        "edge_features": 80,
        "angle_features": 40,
    }
    assert len(config["study"]["datasets"]) == 7


def test_empty_config_gets_schema_defaults():
    config = load_config([])
    assert config["seed"] == 42 and config["train"]["epochs"] == 500


def test_files_merge_in_order_and_overrides_win(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  epochs: 7\nmodel:\n  arch: cgcnn\n")
    config = load_config([ROOT / "config.yaml", extra], ["train.lr=0.01", "data_dir=/x"])
    assert config["train"]["epochs"] == 7 and config["train"]["batch_size"] == 16
    assert config["train"]["lr"] == 0.01 and config["data_dir"] == "/x"
    assert config["model"]["arch"] == "cgcnn" and config["model"]["hidden"] == 256


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=0", "key 'train.epochs': 0 is less than the minimum of 1"),
        ("trian.epochs=3", "'trian' was unexpected"),
        ("model.arch=gat", "key 'model.arch': 'gat' is not one of"),
        ("finetune.strategy=partial", "key 'finetune.strategy'"),
        ("study.ft_sizes=[1]", "key 'study.ft_sizes.0'"),
    ],
)
def test_schema_errors_are_one_line_with_key(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config([ROOT / "config.yaml"], [override])
    assert "\n" not in str(info.value)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config([bad])
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config([tmp_path / "nope.yaml"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config([], ["train.epochs"])
