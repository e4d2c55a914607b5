"""The config loader: components by name, typed overrides, clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import CONFIG_DIR, GROUPS, ConfigError, component_names, load_component, load_config

STAGES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_config_resolves(stage: str) -> None:
    cfg = load_config(stage)
    for group in GROUPS:
        if group in cfg:
            assert cfg[group]["name"], f"{stage}: component {group} resolved without a name"


@pytest.mark.parametrize(("group", "name"), [(g, n) for g in GROUPS for n in component_names(g)])
def test_every_component_yaml_loads(group: str, name: str) -> None:
    data = load_component(group, name)
    assert data["name"] == name


def test_group_selection_then_field_override_in_any_order() -> None:
    cfg = load_config("train", overrides=["encoder.dropout=0.3", "encoder=lstm", "epochs=3", "lr=1e-4"])
    assert cfg.encoder.name == "lstm"
    assert cfg.encoder.dropout == 0.3
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.lr == pytest.approx(1e-4)


def test_int_widens_to_float_but_not_the_reverse() -> None:
    assert load_config("train", overrides=["lr=1"]).lr == 1.0
    with pytest.raises(ConfigError, match="'epochs' expects int"):
        load_config("train", overrides=["epochs=2.5"])


def test_misspelled_key_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'.*did you mean epochs"):
        load_config("train", overrides=["epoch=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.structur'"):
        load_config("train", overrides=["model.structur=shared"])


def test_wrong_type_and_malformed_override_are_refused() -> None:
    with pytest.raises(ConfigError, match="'deterministic' expects bool"):
        load_config("train", overrides=["deterministic=yes please"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config("train", overrides=["epochs"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config("train", overrides=["model=3"])


def test_unknown_component_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown encoder 'lstn'.*gru.*lstm.*transformer"):
        load_config("train", overrides=["encoder=lstn"])


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config("train", bad)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config("train", tmp_path / "missing.yaml")


def test_resolved_config_round_trips_and_hash_tracks_changes(tmp_path: Path) -> None:
    cfg = load_config("train", overrides=["epochs=3"])
    cfg.save(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == cfg.to_dict()
    again = load_config("train", tmp_path / "config.yaml")
    assert again.hash() == cfg.hash()
    assert load_config("train", overrides=["epochs=4"]).hash() != cfg.hash()
    assert load_config("train", overrides=["epochs=4"]).hash(["model"]) == cfg.hash(["model"])
