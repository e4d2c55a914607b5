"""The config loader: components by name, typed overrides, clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from models import STRUCTURES, MultiTaskModel
from models.multitask import structure_options
from pipeline import cli, config
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


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_each_structure_yaml_holds_exactly_the_options_its_model_takes(structure: str) -> None:
    """``configs/structures/<name>.yaml`` lists every option of the structure and nothing else, and a
    model built from the config it resolves to takes them all."""
    yaml_options = yaml.safe_load((CONFIG_DIR / "structures" / f"{structure}.yaml").read_text())
    assert list(yaml_options) == list(structure_options(structure)), structure
    cfg = load_config("train", overrides=[f"model.structure={structure}"])
    assert set(cfg.model) == {"tasks", "structure", *yaml_options}
    model = MultiTaskModel(16, {"name": "gru", "hidden": 8, "layers": 1}, **dict(cfg.model))
    assert {k: model.args[k] for k in yaml_options} == yaml_options


def test_an_option_of_another_structure_is_refused_naming_its_structure(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config key 'model.au_neighbours' is an option of model.structure amtl, "
                                          r"not of 'shared'$"):
        load_config("train", overrides=["model.structure=shared", "model.au_neighbours=8"])
    assert load_config("train", overrides=["model.structure=amtl", "model.au_neighbours=8"]).model.au_neighbours == 8
    mine = tmp_path / "mine.yaml"  # the same in a file of the user's
    mine.write_text("base: train.yaml\nmodel:\n  structure: feedback\n  au_dim: 32\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: config key 'model.au_dim' is an option of model.structure "
                                          r"cross_attention, not of 'feedback'"):
        load_config("train", mine)


def test_a_config_naming_another_structure_leaves_the_base_structures_own_options() -> None:
    """zhang2022_gru builds on the transformer recipe (feedback, task branches) and names the shared
    structure: it keeps the heads' options both have and drops the branches' ones."""
    base, gru = load_config("train", overrides=["experiment=zhang2022_transformer"]), load_config(
        "train", overrides=["experiment=zhang2022_gru"])
    assert base.model.task_layers == 3 and base.model.feedback_from == "head"
    assert gru.model.structure == "shared" and "task_layers" not in gru.model and "feedback_from" not in gru.model
    assert (gru.model.head_layers, gru.model.dropout, gru.model.split_va) == ([512, 256], 0.3, True)
    # and on the command line: another structure drops the experiment's own options of its structure
    shared = load_config("train", overrides=["experiment=zhang2022_transformer", "model.structure=shared"])
    assert "task_layers" not in shared.model and shared.model.head_layers == [512, 256]


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


# ---- configs that build on others ------------------------------------------------------------------

def test_a_config_holds_only_what_differs_from_its_base(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("base: train.yaml\nname: child\nencoder: lstm\nencoder.hidden: 48\n"
                     "model:\n  structure: feedback\nloss:\n  task_weights: {va: 2.0}\n")
    cfg = load_config("train", child)
    default = load_config("train", overrides=["encoder=lstm"])
    assert cfg.model.structure == "feedback" and cfg.model.tasks == default.model.tasks  # sections merge
    assert cfg.loss.task_weights == {"va": 2.0, "valence": None, "arousal": None, "expr": 1.0, "au": 1.0}
    assert cfg.encoder.name == "lstm" and cfg.encoder.hidden == 48  # a dotted key, after the component loads
    assert set(cfg) == set(default)
    # and builds on a base of its own, beside it; the command line still has the last word
    grandchild = tmp_path / "grandchild.yaml"
    grandchild.write_text("base: child\nlr: 0.0005\n")
    cfg = load_config("train", grandchild, ["encoder.hidden=64"])
    assert (cfg.name, cfg.model.structure, cfg.lr, cfg.encoder.hidden) == ("child", "feedback", 0.0005, 64)


def test_a_config_building_on_another_is_checked_like_a_full_one(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: train.yaml\nmodel:\n  structur: feedback\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.structur'"):
        load_config("train", bad)
    bad.write_text("base: train.yaml\nencoder.hiden: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'encoder.hiden'; did you mean encoder.hidden"):
        load_config("train", bad)
    bad.write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="bad.yaml: base 'nowhere.yaml' not found"):
        load_config("train", bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        load_config("train", loop)


def test_experiment_picks_its_file_and_is_refused_elsewhere(tmp_path: Path) -> None:
    assert load_config("train", overrides=["experiment=va_only", "epochs=2"]).model.tasks == ["va"]
    with pytest.raises(ConfigError, match="unknown experiment 'nope'; choose one of .*mtl_gru"):
        load_config("train", overrides=["experiment=nope"])
    with pytest.raises(ConfigError, match="not both"):
        load_config("train", CONFIG_DIR / "train.yaml", ["experiment=va_only"])
    with pytest.raises(ConfigError, match="the faces stage has none"):
        load_config("faces", overrides=["experiment=va_only"])


def test_a_users_config_folder_adds_components_and_experiments_beside_the_shipped_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "my_configs"
    (mine / "encoders").mkdir(parents=True)
    (mine / "experiments").mkdir()
    (mine / "encoders" / "gru.yaml").write_text("hidden: 24\nlayers: 1\nbidirectional: false\ndropout: 0.0\n"
                                                 "input_projection: true\ncarry_state: false\n")
    (mine / "experiments" / "small_gru.yaml").write_text("base: train.yaml\nname: small_gru\nencoder: gru\n")
    monkeypatch.setenv("AFFECT_CONFIG_DIR", str(mine))
    cfg = load_config("train", overrides=["experiment=small_gru"])
    assert cfg.name == "small_gru" and cfg.encoder.hidden == 24, "the user's gru.yaml comes before the shipped one"
    assert "small_gru" in config.experiment_names() and "mtl_gru" in config.experiment_names()
    shipped = yaml.safe_load((CONFIG_DIR / "encoders" / "lstm.yaml").read_text())
    assert load_config("train", overrides=["encoder=lstm"]).encoder.hidden == shipped["hidden"]
    monkeypatch.setenv("AFFECT_CONFIG_DIR", str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match=r"AFFECT_CONFIG_DIR=.*gone: no such folder"):
        load_config("train")


def test_config_dir_on_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "mine.yaml").write_text("base: train.yaml\nname: mine\n")
    monkeypatch.delenv("AFFECT_CONFIG_DIR", raising=False)
    monkeypatch.setattr(cli, "command_line_process", lambda stage: None)  # no log handlers in the test process
    seen = {}

    def main(cfg) -> int:
        seen["name"] = cfg.name
        return 0

    with pytest.raises(SystemExit) as e:
        cli.run_stage("train", main, argv=["--config-dir", str(tmp_path), "experiment=mine"])
    assert e.value.code == 0 and seen == {"name": "mine"}
    monkeypatch.delenv("AFFECT_CONFIG_DIR")  # run_stage set it for the process, as a command line does
