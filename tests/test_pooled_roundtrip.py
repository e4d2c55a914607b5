"""A training run's written validation predictions, scored again by the evaluate stage, give the
run's own scores: over several data sets pooled (``<Task>/<data set>/<video>.txt``, each data set's
own annotations and scores) and over one with the 7 basic emotions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import evaluate, train
from pipeline.config import InputError, load_config
from pipeline.writers import read_predictions
from tests.synthetic import learnable_set, two_data_sets
from tests.test_seed_training import FAST

HEADLINE = ("ccc_v", "ccc_a", "f1_expr", "f1_au", "p_mtl")


def trained(out: Path, runs: Path, data: str) -> dict:
    """Train two epochs on ``data`` into ``out``; the run's ``scores.json``."""
    cfg = load_config("train", overrides=[*FAST, f"runs_dir={runs}", f"out_dir={out}", "epochs=2", f"data={data}"])
    assert train.main(cfg) == 0
    return json.loads((out / "scores.json").read_text())


def evaluated(run: Path, data: str, *overrides: str) -> dict:
    """The evaluate stage's scores of the run's predictions against ``data``'s validation split."""
    out = run / "evaluate.json"
    keys = [f"predictions={run / 'predictions'}", f"data={data}", f"output={out}", *overrides]
    cfg = load_config("evaluate", overrides=keys)
    assert evaluate.main(cfg) == 0
    return json.loads(out.read_text())["scores"]


def assert_same(rescored: dict, scores: dict) -> None:
    for key in (*HEADLINE, "n_va", "n_expr", "n_au"):
        assert rescored[key] == pytest.approx(scores[key], abs=1e-6, nan_ok=True), key


def test_a_pooled_runs_predictions_score_as_the_run_did(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs, (a_yaml, b_yaml) = two_data_sets(tmp_path)  # b labels action units only
    run = tmp_path / "run"
    scores = trained(run, runs, f"[{a_yaml},{b_yaml}]")
    assert sorted(read_predictions(run / "predictions")) == ["syn_a/v4", "syn_a/v5", "syn_b/v4", "syn_b/v5"]
    capsys.readouterr()

    rescored = evaluated(run, f"[{a_yaml},{b_yaml}]")
    assert_same(rescored, scores)
    assert sorted(rescored["data"]) == sorted(scores["data"]) == ["syn_a", "syn_b"]
    for name, own in scores["data"].items():
        assert_same(rescored["data"][name], own)
    printed = capsys.readouterr().out
    assert "| syn_a |" in printed and "| syn_b |" in printed
    with pytest.raises(InputError, match="each with its own annotations"):
        evaluated(run, f"[{a_yaml},{b_yaml}]", f"annotations={tmp_path}")


def test_a_basic7_runs_predictions_score_over_its_seven_classes(tmp_path: Path) -> None:
    paths = learnable_set(tmp_path)  # Other (7) labels frames too; basic7 leaves them out
    data = tmp_path / "syn.yaml"
    data.write_text(
        f"name: syn\nvideos: none\nannotations: {paths['annotations']}\nformat: abaw_tasks\n"
        "train_split: train\nval_split: val\nexpressions: basic7\n"
    )
    run = tmp_path / "run"
    scores = trained(run, paths["runs"], str(data))
    assert scores["expressions"] == "basic7"
    assert_same(evaluated(run, str(data)), scores)
