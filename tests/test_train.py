"""The training stage on small learnable features: it learns, the noise control does not, and its
checkpoints rebuild the model alone (a killed run's resume: tests/test_faults.py's chain test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models import MultiTaskModel
from models.cross_task import au_cooccurrence
from pipeline import checkpoint, metrics, train
from pipeline.config import Config, _base_path, load_config, read_config
from pipeline.data import Normaliser
from pipeline.feature_cache import FeatureCache
from pipeline.identity import run_name
from pipeline.inference import predict_features
from pipeline.labels import load_annotations
from pipeline.writers import read_predictions
from tests.synthetic import learnable_set

ROOT = Path(__file__).resolve().parents[1]
FAST = ["encoder.hidden=32", "encoder.layers=1", "window=24", "stride=8", "eval_stride=12", "batch_size=4",
        "lr=0.005", "patience=0", "extractors=[syn]"]


def syn_config(paths: dict[str, Path], out: Path, *overrides: str) -> Config:
    cfg = load_config("train", overrides=[*FAST, f"runs_dir={paths['runs']}", f"out_dir={out}", *overrides])
    cfg.data.update(name="syn", annotations=str(paths["annotations"]), format="abaw_tasks")
    return cfg


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return learnable_set(tmp_path_factory.mktemp("syn"))


@pytest.fixture(scope="module")
def trained(syn: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert train.main(syn_config(syn, out, "epochs=25")) == 0
    return out


def test_run_writes_every_output_and_learns(trained: Path) -> None:
    for name in ("config.yaml", "best.pt", "last.pt", "metrics.jsonl", "curves.png", "scores.json"):
        assert (trained / name).is_file(), name
    history = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(25))
    scores = json.loads((trained / "scores.json").read_text())
    assert scores["p_mtl"] > 2.0, scores
    assert scores["p_mtl"] == pytest.approx(scores["p_va"] + scores["f1_expr"] + scores["f1_au"])
    assert (trained / "predictions" / "EXPR_Recognition_Challenge" / "v4.txt").is_file()


def test_noise_control_stays_near_chance(syn: dict[str, Path], tmp_path: Path) -> None:
    assert train.main(syn_config(syn, tmp_path, "epochs=10", "noise_features=true")) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["noise_features"] is True
    assert scores["p_mtl"] < 1.0, scores


def test_written_predictions_rescore_to_the_same_scores(trained: Path, syn: dict[str, Path]) -> None:
    # The ABAW files hold classes and 0/1 AUs at 0.5, exactly what the stage scored.
    labels = load_annotations(syn["annotations"], "val")
    rescored = metrics.score_videos(read_predictions(trained / "predictions"), labels)
    scores = json.loads((trained / "scores.json").read_text())
    for key in ("f1_expr", "f1_au"):
        assert rescored[key] == pytest.approx(scores[key], abs=1e-9)
    for key in ("ccc_v", "ccc_a"):  # VA is written with 4 decimals
        assert rescored[key] == pytest.approx(scores[key], abs=1e-3)


def test_checkpoint_alone_rebuilds_the_model(trained: Path, syn: dict[str, Path]) -> None:
    model, ckpt = checkpoint.load(trained / "best.pt")
    assert len(ckpt.inference.au_thresholds) == 12
    assert ckpt.recipe.extractors == ["syn"] and ckpt.inference.window == 24
    cache = FeatureCache([syn["cache"]])
    feats, present, _ = cache.read("v4")
    norm = Normaliser.from_state(ckpt.inference.normaliser)
    first = predict_features(model, feats, present, norm, ckpt.inference.window, ckpt.inference.eval_stride)
    again, _ = checkpoint.load(trained / "best.pt")
    second = predict_features(again, feats, present, norm, ckpt.inference.window, ckpt.inference.eval_stride)
    for task in ("va", "expr", "au"):
        np.testing.assert_array_equal(first[task], second[task])


@pytest.mark.parametrize("tasks", [["expr"], ["va", "au"]])
def test_uni_and_two_task_runs_score_only_their_tasks(syn: dict[str, Path], tmp_path: Path, tasks: list) -> None:
    assert train.main(syn_config(syn, tmp_path, "epochs=3", f"model.tasks={json.dumps(tasks)}")) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["p_mtl"] is None  # undefined without all three tasks: null in strict JSON
    for task, key in (("va", "p_va"), ("expr", "f1_expr"), ("au", "f1_au")):
        value = scores[key]
        assert (value is not None and not np.isnan(value)) == (task in tasks), (task, value)


EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))


def _flat(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    return [pair for key, value in tree.items()
            for pair in (_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)])]


def _keys(tree: dict, prefix: str = "") -> set[str]:
    return {k for key, value in tree.items()
            for k in ([f"{prefix}{key}"] if not isinstance(value, dict) else _keys(value, f"{prefix}{key}."))}


def test_there_are_experiments_for_each_encoder_task_and_structure() -> None:
    configs = [load_config("train", path) for path in EXPERIMENTS]
    assert {c.encoder.name for c in configs} >= {"transformer", "lstm", "gru"}
    assert {tuple(c.model.tasks) for c in configs} >= {("va",), ("expr",), ("au",), ("va", "expr", "au")}
    assert {(c.model.structure, c.model.get("au_graph")) for c in configs} >= {
        ("shared", None), ("task_specific", None), ("feedback", None), ("cross_attention", "learned"),
        ("cross_attention", "cooccurrence")}
    assert any(len(c.extractors) > 1 for c in configs)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_config_loads_and_builds_its_model(path: Path) -> None:
    cfg = load_config("train", path)
    assert cfg == load_config("train", overrides=[f"experiment={path.stem}"])
    # it holds only what differs from its base, and resolves to a full training config
    written = yaml.safe_load(path.read_text())
    base, _ = read_config(_base_path(written["base"], path))
    flat_base = dict(_flat(base))
    repeated = [k for k, v in _flat({k: v for k, v in written.items() if k != "base" and "." not in k})
                if k in flat_base and flat_base[k] == v and k not in ("name", "encoder")]
    assert not repeated, f"{path.name} repeats its base's values for {repeated}"
    default = load_config("train", overrides=[f"encoder={cfg.encoder.name}", f"model.structure={cfg.model.structure}"])
    assert _keys(cfg) == _keys(default)
    assert cfg.name == path.stem == run_name(cfg)
    args = dict(cfg.model)
    if args.get("au_graph") == "cooccurrence":
        au = np.random.default_rng(0).integers(0, 2, (200, 12))
        args["au_graph"] = au_cooccurrence(au).tolist()
    model = MultiTaskModel(d_in=40, encoder=dict(cfg.encoder), **args).eval()
    x = torch.randn(2, 16, 40)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    out = model(x, mask)
    widths = {"va": 2, "expr": 8, "au": 12}
    assert set(out) == set(cfg.model.tasks)
    for task, value in out.items():
        assert value.shape == (2, 16, widths[task]) and torch.isfinite(value).all(), task
