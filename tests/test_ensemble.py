"""Ensembles of finished runs: the outputs are the members' mean frame by frame, one run alone
scores as that run, and a folder that is not a finished run is one error line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import checkpoint, ensemble, train
from pipeline.config import Config, ConfigError, InputError, load_config
from pipeline.data import Normaliser
from pipeline.feature_cache import FeatureCache
from pipeline.identity import run_folder
from pipeline.inference import predict_features
from pipeline.labels import AUS
from pipeline.writers import read_predictions
from tests.synthetic import learnable_set

ROOT = Path(__file__).resolve().parents[1]
FAST = ["encoder.hidden=16", "encoder.layers=1", "window=24", "stride=8", "eval_stride=12", "batch_size=4",
        "lr=0.005", "patience=0", "extractors=[syn]", "epochs=2"]
SCORES = ("ccc_v", "ccc_a", "p_va", "f1_expr", "f1_au", "p_mtl", "f1_au_tuned", "n_va", "n_expr", "n_au",
          *(f"f1_{a}" for a in AUS))


def syn_config(syn: dict[str, Path], *overrides: str) -> Config:
    return load_config("train", overrides=[*FAST, f"runs_dir={syn['runs']}", "data.name=syn",
                                           f"data.annotations={syn['annotations']}", *overrides])


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return learnable_set(tmp_path_factory.mktemp("syn"))


@pytest.fixture(scope="module")
def runs(syn: dict[str, Path]) -> list[Path]:
    folders = []
    for seed in (0, 1):
        cfg = syn_config(syn, f"seed={seed}")
        assert train.main(cfg) == 0
        folders.append(run_folder(cfg))
    return folders


def run_ensemble(*args: str) -> int:
    return ensemble.main(ensemble.PROGRAM.read(list(args)))


def ensembles(syn: dict[str, Path]) -> set[Path]:
    folder = syn["runs"] / "syn" / "ensembles"
    return set(folder.iterdir()) if folder.is_dir() else set()


def test_the_ensemble_averages_the_members_outputs(syn: dict[str, Path], runs: list[Path],
                                                   capsys: pytest.CaptureFixture) -> None:
    before = ensembles(syn)
    assert run_ensemble(*map(str, runs)) == 0
    (out,) = ensembles(syn) - before
    printed = capsys.readouterr().out
    assert "ensemble of 2" in printed and all(r.name in printed for r in runs)
    members = json.loads((out / "members.json").read_text())
    assert sorted(m["run"] for m in members) == sorted(map(str, runs))
    for m in members:
        assert m["scores"] == json.loads((Path(m["run"]) / "scores.json").read_text())
    scores = json.loads((out / "scores.json").read_text())
    assert scores["p_mtl"] == pytest.approx(scores["p_va"] + scores["f1_expr"] + scores["f1_au"])
    assert len(scores["au_thresholds"]) == 12 and scores["filled_va"] == 0

    # each member's outputs computed here from its checkpoint alone
    cache = FeatureCache([syn["cache"]])
    written = read_predictions(out / "predictions")
    assert sorted(written) == ["v4", "v5"]
    for video in written:
        feats, present, frames = cache.read(video)
        outputs = []
        for run in runs:
            model, ckpt = checkpoint.load(run / "best.pt")
            norm = Normaliser.from_state(ckpt.inference.normaliser)
            outputs.append(predict_features(model, feats, present, norm, ckpt.inference.window,
                                            ckpt.inference.eval_stride))
        va = np.mean([o["va"] for o in outputs], 0)
        np.testing.assert_allclose(written[video]["va"][frames], va, atol=2e-6)  # written with 6 decimals
        expr = np.mean([o["expr"] for o in outputs], 0)
        np.testing.assert_array_equal(written[video]["expr"][frames], expr.argmax(1))

    # the same members in another order: the same ensemble, not computed again
    assert run_ensemble(f"runs={runs[1]}", f"runs={runs[0]}") == 0
    assert "averaged before" in capsys.readouterr().out
    assert ensembles(syn) - before == {out}


def test_an_ensemble_of_one_run_scores_as_that_run(syn: dict[str, Path], runs: list[Path]) -> None:
    before = ensembles(syn)
    assert run_ensemble(str(runs[0])) == 0
    (out,) = ensembles(syn) - before
    got = json.loads((out / "scores.json").read_text())
    own = json.loads((runs[0] / "scores.json").read_text())
    for key in SCORES:
        assert got[key] == own[key], key


def test_runs_that_cannot_be_averaged_are_refused_by_name(syn: dict[str, Path], runs: list[Path],
                                                          tmp_path: Path) -> None:
    missing = tmp_path / "gru-nowhere"
    done = subprocess.run([sys.executable, "-m", "pipeline.ensemble", str(runs[0]), str(missing)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"error: {missing}: not a training run folder (no best.pt)"
    with pytest.raises(InputError, match="the same run as"):
        run_ensemble(str(runs[0]), str(runs[0]))
    other = tmp_path / "other"
    shutil.copytree(runs[1], other)
    ckpt = checkpoint.read(other / "best.pt")
    ckpt.recipe.config["data"]["val_split"] = "train"
    ckpt.recipe.identity = "f" * 64  # sorts after the real run, which is then the one compared with
    checkpoint.save(other / "best.pt", ckpt)
    with pytest.raises(InputError, match=rf"{other}: trained on other data than .*data.val_split: 'train'"):
        run_ensemble(str(runs[0]), str(other))
    with pytest.raises(ConfigError, match="give the run folders"):
        run_ensemble()


def test_run_folders_as_arguments_or_runs_keys() -> None:
    cfg = ensemble.PROGRAM.read(["a", "runs=b", "runs=[c,d]", "device=cpu"])
    assert cfg.runs == ["a", "b", "c", "d"] and cfg.device == "cpu"
    with pytest.raises(ConfigError, match="unknown config key 'epochs'"):
        ensemble.PROGRAM.read(["a", "epochs=3"])


def test_a_submission_from_several_runs_scores_as_their_ensemble(syn: dict[str, Path], runs: list[Path],
                                                                  tmp_path: Path) -> None:
    """`make submit RUNS="a b"` writes the ensemble's outputs: make evaluate scores the file, whose
    list holds frames without a face, as the ensemble scored itself, AUs at 0.5 by default and at
    the runs' mean tuned thresholds with tuned."""
    from pipeline import evaluate, submit
    from pipeline.labels import load_annotations

    assert run_ensemble(*map(str, runs)) == 0
    scored = json.loads((ensemble.resolve(runs)[2] / "scores.json").read_text())
    val = load_annotations(syn["annotations"], "val")
    images = [f"{v}/{k + 1:05d}.jpg" for v, lab in val.items() for k in range(len(lab.expr))]
    cache = FeatureCache([syn["cache"]])
    faceless = [f"{v}/{k + 1:05d}.jpg" for v in val for k in np.flatnonzero(~cache.index(v)[0])]
    assert faceless and set(faceless) <= set(images)
    listing = tmp_path / "MTL_Challenge_test_set_release.txt"
    listing.write_text("\n".join(["image", *reversed(images)]) + "\n")
    for tuned, au_key in (("false", "f1_au"), ("true", "f1_au_tuned")):
        out = tmp_path / f"mtl_{tuned}.txt"
        assert submit.main(load_config("submit", overrides=[
            f"runs=[{runs[1]},{runs[0]}]", f"list={listing}", "layout=abaw_mtl", f"out={out}",
            f"tuned={tuned}"])) == 0
        assert evaluate.main(load_config("evaluate", overrides=[
            f"predictions={out}", f"annotations={syn['annotations']}", f"output={tmp_path / 'scores.json'}"])) == 0
        again = json.loads((tmp_path / "scores.json").read_text())["scores"]
        assert again["f1_au"] == pytest.approx(scored[au_key], abs=1e-9)
        if tuned == "false":  # tuned also smooths VA as each run chose on validation
            for key in ("ccc_v", "ccc_a", "f1_expr"):
                assert again[key] == pytest.approx(scored[key], abs=1e-5), key
