"""Parts of a model started from other runs (init_from, init_parts, init_sources, init_frozen): the
taken weights are the sources' own, the rest a fresh build's; frozen parts stay put and in eval
mode while the others train; each refusal is one line; a new source is a new run; and the
uni- versus multi-task comparison (pipeline.compare_init) takes each uni-task run's weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from models import MultiTaskModel
from pipeline import checkpoint, compare_init, initialise, train
from pipeline.config import Config, InputError, check_choices, load_config
from pipeline.distributed import World
from pipeline.identity import run_folder, run_identity
from pipeline.splits import open_features
from pipeline.training import CHOICES, build_training
from tests.synthetic import learnable_set

FAST = ["encoder.hidden=16", "encoder.layers=1", "window=24", "stride=8", "eval_stride=12", "batch_size=4",
        "lr=0.005", "patience=0", "extractors=[syn]", "epochs=2"]
# what the comparison trains with: the 7 basic classes, each task at its own best epoch, a branch per task
RECIPE = ["data.expressions=basic7", "selection=per_task", "model.structure=task_specific"]


def config(syn: dict[str, Path], *overrides: str) -> Config:
    return load_config("train", overrides=[*FAST, *RECIPE, f"runs_dir={syn['runs']}", "data.name=syn",
                                           f"data.annotations={syn['annotations']}", *overrides])


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return learnable_set(tmp_path_factory.mktemp("syn"), frames=48)


@pytest.fixture(scope="module")
def sources(syn: dict[str, Path]) -> dict[str, Path]:
    """Finished uni-task runs of expressions and of valence/arousal."""
    folders = {}
    for task in ("expr", "va"):
        cfg = config(syn, f"experiment={task}_only")
        assert train.main(cfg) == 0
        folders[task] = run_folder(cfg)
    return folders


def built(cfg: Config) -> MultiTaskModel:
    return build_training(cfg, World(), torch.device("cpu"), open_features(cfg)).model


def task_state(folder: Path, task: str) -> dict:
    return checkpoint.read(folder / "best.pt").model.task_state_dicts[task]


def test_taken_parts_are_the_sources_weights_and_the_rest_a_fresh_builds(syn, sources) -> None:
    cfg = config(syn, f"init_from={sources['expr']}", "init_parts=[encoder,expr]",
                 f"init_sources.va={sources['va']}")
    model, fresh = built(cfg).state_dict(), built(config(syn)).state_dict()
    expr, va = task_state(sources["expr"], "expr"), task_state(sources["va"], "va")
    assert set(model) == set(fresh)
    for key, value in model.items():
        if key.startswith(("net.bottom.", "net.tops.expr.", "net.heads.expr.")):
            want = expr[key]
        elif key.startswith(("net.tops.va.", "net.heads.va.")):
            want = va[key]
        else:
            assert key.startswith(("net.tops.au.", "net.heads.au.")), key
            want = fresh[key]
        assert torch.equal(value, want), key
        if want is not fresh[key]:
            assert not torch.equal(value, fresh[key]), f"{key}: the source is no different from a fresh build"


def test_the_encoder_of_one_structure_starts_anothers(syn, sources) -> None:
    model = built(config(syn, "model.structure=shared", f"init_from={sources['expr']}")).state_dict()
    source = task_state(sources["expr"], "expr")
    encoder = {k for k in model if k.startswith("net.encoder.")}
    assert encoder and all(torch.equal(model[k], source[k.replace("net.encoder.", "net.bottom.")]) for k in encoder)


def test_frozen_parts_stay_fixed_and_in_eval_mode_while_the_others_train(syn, sources, tmp_path, monkeypatch) -> None:
    modes: dict[str, list[bool]] = {"bottom": [], "expr": []}
    take = initialise.take_parts

    def take_and_watch(cfg: Config, model: MultiTaskModel) -> None:
        take(cfg, model)
        for name, module in (("bottom", model.net.bottom), ("expr", model.net.heads["expr"])):
            module.register_forward_pre_hook(lambda m, _, name=name: modes[name].append(m.training))

    monkeypatch.setattr(initialise, "take_parts", take_and_watch)
    cfg = config(syn, "epochs=1", f"init_from={sources['expr']}", "init_parts=[encoder,expr]",
                 "init_frozen=[encoder]", f"out_dir={tmp_path / 'run'}")
    assert train.main(cfg) == 0
    assert json.loads((tmp_path / "run" / "scores.json").read_text())["f1_expr"] >= 0
    assert modes["bottom"] and not any(modes["bottom"])  # not even while training
    assert any(modes["expr"])  # the head trained in train mode
    after, source = checkpoint.read(tmp_path / "run" / "last.pt").model.state_dict, task_state(sources["expr"], "expr")
    bottom = [k for k in after if k.startswith("net.bottom.")]
    assert bottom and all(torch.equal(after[k], source[k]) for k in bottom)
    head = [k for k in after if k.startswith(("net.tops.expr.", "net.heads.expr."))]
    assert not all(torch.equal(after[k], source[k]) for k in head)


def test_a_new_source_is_a_new_run_and_a_moved_one_the_same(syn, sources, tmp_path) -> None:
    cache = open_features(config(syn))
    # the identity the default config had before these keys existed: runs taking nothing keep their names
    assert run_identity(load_config("train"), type("Cache", (), {"identity": lambda self: [{"x": 1}]})()) \
        == "5e95aaec65c7813a"
    assert run_identity(config(syn), cache) == run_identity(config(syn, "init_parts=[all]", "init_frozen=[]"), cache)
    moved = shutil.copytree(sources["expr"], tmp_path / "moved")
    taking = run_identity(config(syn, f"init_from={sources['expr']}"), cache)
    assert taking != run_identity(config(syn), cache)
    assert run_identity(config(syn, f"init_from={moved}"), cache) == taking
    assert run_identity(config(syn, f"init_from={moved / 'best.pt'}"), cache) == taking
    assert run_identity(config(syn, f"init_from={sources['va']}"), cache) != taking
    assert run_identity(config(syn, f"init_from={sources['expr']}", "init_frozen=[encoder]"), cache) != taking


def refusal(cfg: Config, model: MultiTaskModel) -> str:
    with pytest.raises(InputError) as e:
        initialise.take_parts(cfg, model)
    assert "\n" not in str(e.value)
    return str(e.value)


def model_of(cfg: Config, **change) -> MultiTaskModel:
    args = dict(d_in=24, encoder=dict(cfg.encoder), tasks=tuple(cfg.model.tasks), structure=cfg.model.structure,
                expr_classes=7)
    return MultiTaskModel(**{**args, **change})


def test_each_refusal_is_one_line_naming_the_checkpoint_and_the_part(syn, sources, tmp_path) -> None:
    expr = sources["expr"]
    cfg = config(syn, f"init_from={tmp_path / 'nothing'}")
    assert f"init_from={tmp_path / 'nothing'}: no checkpoint there" in refusal(cfg, model_of(cfg))
    cfg = config(syn, f"init_from={expr}", "init_parts=[va]")
    assert f"init_from={expr}" in refusal(cfg, model_of(cfg))
    assert "part 'va': the source run has no va task (its tasks: expr)" in refusal(cfg, model_of(cfg))
    cfg = config(syn, f"init_from={expr}", "init_parts=[au]", "model.tasks=[va,expr]")
    assert "part 'au': this model has no au task" in refusal(cfg, model_of(cfg))
    cfg = config(syn, f"init_from={expr}", "init_parts=[expr]", "model.structure=shared")
    assert ("part 'expr' does not fit: the source's task_specific model has tops.expr, heads.expr, this shared "
            "model heads.expr") in refusal(cfg, model_of(cfg))
    cfg = config(syn, f"init_from={expr}")
    assert "part 'encoder' does not fit: encoder." in refusal(cfg, model_of(cfg, d_in=30))  # feature width
    assert "here (feature width" in refusal(config(syn, f"init_from={expr}", "encoder.hidden=8"),
                                            model_of(config(syn, "encoder.hidden=8")))
    cfg = config(syn, f"init_from={expr}", "init_parts=[expr]")
    assert "part 'expr' does not fit: heads.expr." in refusal(cfg, model_of(cfg, expr_classes=8))
    running = shutil.copytree(expr, tmp_path / "running")
    (running / "run.json").write_text(json.dumps({"identity": "x", "finished": False}))
    cfg = config(syn, f"init_from={running}")
    assert "holds a run that has not finished" in refusal(cfg, model_of(cfg))

    for overrides, message in (
        (["init_frozen=[au]"], "config key 'init_frozen' = ['au']: au is not taken"),
        ([f"init_sources.encoder={expr}"], "init_parts and init_sources both name encoder"),
        ([f"init_sources.bottom={expr}"], "config key 'init_sources.bottom': no such part"),
        (["init_parts=[all]", "init_frozen=[all]"], "nothing would be left to train"),
    ):
        cfg = config(syn, f"init_from={expr}", *overrides)
        assert message in refusal(cfg, model_of(cfg))
    with pytest.raises(InputError, match="config key 'init_parts' = 'bottom': choose one of encoder"):
        check_choices(config(syn, "init_parts=[bottom]"), CHOICES)


def test_the_comparison_tables_every_variant_and_starts_from_each_uni_task_run(tmp_path, capfd) -> None:
    tiny = learnable_set(tmp_path, frames=48)
    argv = [*FAST, "epochs=1", f"runs_dir={tiny['runs']}", "data.name=syn", f"data.annotations={tiny['annotations']}",
            "seeds=[3]", "init_frozen=[encoder,va,expr]"]
    comparison = compare_init.PROGRAM.read(argv)
    assert "data.expressions=basic7" in comparison.train and "epochs=1" in comparison.train
    assert compare_init.main(comparison) == 0
    table = capfd.readouterr().out.split("Uni- versus multi-task over seeds [3] (6 results, 0 failed)")[1]
    assert table.splitlines()[2] == "| variant | seeds | CCC-V | CCC-A | F1-EXPR | F1-AU | P_MTL |"
    rows = [line.split("|")[1].strip() for line in table.splitlines()[4:] if line.startswith("| ")]
    assert rows == ["va alone", "expr alone", "au alone", "multi-task", "multi-task from uni-task",
                    "ensemble of uni-task"]
    result = json.loads(next((tiny["runs"] / "syn" / "comparisons").glob("init-*.json")).read_text())
    runs = {r["variant"]: r for r in result["runs"]}
    assert all(r["status"] == 0 and r["seed"] == 3 for r in runs.values())
    started = checkpoint.read(Path(runs["mtl_from_uni"]["folder"]) / "last.pt")
    assert started.recipe.config["data"]["expressions"] == "basic7" and started.recipe.config["epochs"] == 1
    weights = started.model.state_dict
    own = {t: task_state(Path(runs[t]["folder"]), t) for t in ("va", "expr", "au")}
    for key, value in weights.items():  # frozen: still exactly the uni-task runs' weights
        task = next((t for t in ("va", "expr") if key.startswith((f"net.tops.{t}.", f"net.heads.{t}."))), None)
        if key.startswith("net.bottom.") or task:
            assert torch.equal(value, own[task or "expr"][key]), key
    au = [k for k in weights if k.startswith("net.heads.au.")]
    assert not all(torch.equal(weights[k], own["au"][k]) for k in au)  # taken, then trained
    assert started.recipe.config["init_sources"] == {"va": runs["va"]["folder"], "au": runs["au"]["folder"]}
    assert started.recipe.config["init_from"] == runs["expr"]["folder"]
    assert compare_init.main(compare_init.PROGRAM.read(argv)) == 0  # again: every run is reused
    assert capfd.readouterr().out.count("not trained again") == 5
