"""Training with the seed systems' settings on small learnable features: every labelled validation
frame scored (the training prior where nothing was predicted), several data sets in one run, the
7 basic emotions, staged training with a frozen task, each task's own best epoch, chunk-by-chunk
batches with a carried encoder state."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline import checkpoint, metrics, splits, train, validation
from pipeline.config import Config, InputError, load_config
from pipeline.data import Normaliser
from pipeline.inference import predict_features
from pipeline.labels import Labels, load_annotations
from tests.synthetic import learnable_set, two_data_sets, write_annotations

FAST = ["encoder.hidden=32", "encoder.layers=1", "window=24", "stride=8", "eval_stride=12", "batch_size=4",
        "lr=0.005", "patience=0", "extractors=[syn]"]


def config(paths: dict[str, Path], out: Path, *overrides: str) -> Config:
    fast = [o for o in FAST if not ("encoder=none" in overrides and o.startswith("encoder."))]
    cfg = load_config("train", overrides=[*fast, f"runs_dir={paths['runs']}", f"out_dir={out}", *overrides])
    cfg.data.update(name="syn", annotations=str(paths["annotations"]), format="abaw_tasks")
    return cfg


def evaluated(run: Path, data: str, *overrides: str) -> dict:
    """The evaluate stage's scores of the run's written predictions against ``data``'s validation split."""
    from pipeline import evaluate

    out = run / "evaluate.json"
    assert evaluate.main(load_config("evaluate", overrides=[
        f"predictions={run / 'predictions'}", f"data={data}", f"output={out}", *overrides])) == 0
    return json.loads(out.read_text())["scores"]


def assert_same(rescored: dict, scores: dict) -> None:
    for key in ("ccc_v", "ccc_a", "f1_expr", "f1_au", "p_mtl", "n_va", "n_expr", "n_au"):
        assert rescored[key] == pytest.approx(scores[key], abs=1e-6, nan_ok=True), key


def scores_of(out: Path) -> dict:
    return json.loads((out / "scores.json").read_text())


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return learnable_set(tmp_path_factory.mktemp("syn"))


def test_every_labelled_validation_frame_is_scored_with_the_prior_where_nothing_was_predicted(
        tmp_path: Path) -> None:
    paths = learnable_set(tmp_path, videos=7)
    # v6 joins the validation split without features (no face file, say); v5 has no face at all
    labels = load_annotations(paths["annotations"], "val")
    extra = Labels(labels["v4"].va.copy(), labels["v4"].expr.copy(), labels["v4"].au.copy())
    write_annotations(paths["annotations"], "val", {"v6": extra})
    with h5py.File(paths["cache"], "a") as f:
        del f["v6"]
        f["v5"]["present"][...] = False
    out = tmp_path / "run"
    assert train.main(config(paths, out, "epochs=2")) == 0
    scores = scores_of(out)
    val = load_annotations(paths["annotations"], "val")
    faceless = {t: int(val["v5"].valid(t).sum() + val["v6"].valid(t).sum()) for t in ("va", "expr")}
    assert scores["filled_va"] == faceless["va"] and scores["filled_expr"] == faceless["expr"]
    assert scores["n_va"] == sum(int(lab.valid("va").sum()) for lab in val.values())  # none dropped
    assert scores["videos"]["val_labelled"] == 3 and scores["videos"]["val"] == 2

    # the same numbers by hand: predictions where there are any, the training prior elsewhere
    model, _ = checkpoint.load(out / "best.pt")
    train_labels = load_annotations(paths["annotations"], "train")
    prior = metrics.prior_from_labels(train_labels)
    cfg = config(paths, out, "epochs=2")
    cache = splits.open_features(cfg)
    normaliser = Normaliser.fit(cache, sorted(train_labels))
    _, preds = validation.validate(model, cache, val, ["v4", "v5"], normaliser, cfg)
    dense = {v: metrics.dense_predictions(preds.get(v, {}), len(lab)) for v, lab in val.items()}
    for v in ("v5", "v6"):
        dense[v]["va"][:] = prior["va"]
        dense[v]["expr"][:] = prior["expr"]
        dense[v]["au"][:] = prior["au"]
    by_hand = metrics.score({t: np.concatenate([dense[v][t] for v in val]) for t in ("va", "expr", "au")},
                            {t: np.concatenate([getattr(val[v], t) for v in val]) for t in ("va", "expr", "au")})
    for key in ("ccc_v", "ccc_a", "f1_expr", "f1_au"):
        assert scores[key] == pytest.approx(by_hand[key], abs=1e-9), key


def test_splits_that_share_a_video_are_refused(tmp_path: Path) -> None:
    paths = learnable_set(tmp_path)
    labels = load_annotations(paths["annotations"], "train")
    write_annotations(paths["annotations"], "val", {"v0": labels["v0"]})
    with pytest.raises(InputError, match=r"share 1 video\(s\), e.g. v0"):
        train.main(config(paths, tmp_path / "run", "epochs=1"))


def test_two_data_sets_train_together_each_on_the_tasks_it_labels(tmp_path: Path) -> None:
    runs, (a_yaml, b_yaml) = two_data_sets(tmp_path)  # b labels action units only
    out = tmp_path / "run"
    cfg = load_config("train", overrides=[
        *FAST, f"runs_dir={runs}", f"out_dir={out}", "epochs=20", f"data=[{a_yaml},{b_yaml}]"])
    assert cfg.data.name == "syn_a+syn_b" and [m.name for m in cfg.data.members] == ["syn_a", "syn_b"]
    assert train.main(cfg) == 0
    scores = scores_of(out)
    assert scores["videos"] == {"train": 8, "val": 4, "val_labelled": 4}
    per_data = scores["data"]
    assert per_data["syn_b"]["n_va"] == 0 and per_data["syn_b"]["n_au"] > 0
    assert per_data["syn_a"]["n_va"] > 0 and scores["n_au"] == per_data["syn_a"]["n_au"] + per_data["syn_b"]["n_au"]
    assert per_data["syn_b"]["f1_au"] > 0.8 and per_data["syn_a"]["p_mtl"] > 1.5, per_data
    # its written predictions (<Task>/<data set>/<video>.txt) score again as the run scored, pooled and apart
    rescored = evaluated(out, f"[{a_yaml},{b_yaml}]")
    assert_same(rescored, scores)
    assert sorted(rescored["data"]) == ["syn_a", "syn_b"]
    for name, own in per_data.items():
        assert_same(rescored["data"][name], own)
    with pytest.raises(InputError, match="each with its own annotations"):
        evaluated(out, f"[{a_yaml},{b_yaml}]", f"annotations={tmp_path}")
    with pytest.raises(Exception, match="several data sets train together"):
        load_config("features", overrides=[f"data=[{a_yaml},{b_yaml}]"])


def test_seven_basic_emotions(syn: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = config(syn, out, "epochs=15")
    cfg.data.expressions = "basic7"
    assert train.main(cfg) == 0
    model, ckpt = checkpoint.load(out / "best.pt")
    assert model.args["expr_classes"] == 7 and ckpt.recipe.expressions == [
        "Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise"]
    scores = scores_of(out)
    val = load_annotations(syn["annotations"], "val")
    assert scores["n_expr"] == sum(int(((lab.expr >= 0) & (lab.expr < 7)).sum()) for lab in val.values())
    assert scores["expressions"] == "basic7" and scores["f1_expr"] > 0.6
    header = (out / "predictions" / "EXPR_Recognition_Challenge" / "v4.txt").read_text().splitlines()[0]
    assert header == "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise"
    data = tmp_path / "syn.yaml"  # evaluate scores the run's predictions over the same seven classes
    data.write_text(f"name: syn\nvideos: none\nannotations: {syn['annotations']}\nformat: abaw_tasks\n"
                    "train_split: train\nval_split: val\nexpressions: basic7\n")
    assert_same(evaluated(out, str(data)), scores)


def test_staged_training_freezes_au_after_its_stage_and_keeps_each_tasks_best(syn: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = config(syn, out, "epochs=4", "model.structure=amtl", "encoder=none", "loss.au=asymmetric",
                 "loss.au_pos_weight=none", "stages=[[au],[expr,va]]", "selection=per_task")
    assert train.main(cfg) == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in history] == [0] * 4 + [1] * 4
    model, ckpt = checkpoint.load(out / "best.pt")
    assert isinstance(model, checkpoint.PerTaskModel)
    epochs = ckpt.resume.task_epochs
    assert epochs["au"] < 4 <= min(epochs["expr"], epochs["va"])
    # the AU part of every later weight set is the AU stage's best, untouched by the second stage
    au_keys = [k for k in ckpt.model.state_dict if k.startswith("net.au.")]
    assert au_keys
    for task in ("expr", "va"):
        for key in au_keys:
            torch.testing.assert_close(ckpt.model.task_state_dicts[task][key], ckpt.model.task_state_dicts["au"][key])
    assert scores_of(out)["epoch"] == epochs


def test_chunk_by_chunk_batches_with_a_carried_state(syn: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = config(syn, out, "epochs=12", "encoder.bidirectional=false", "encoder.carry_state=true",
                 "batches=videos", "train_windows=consecutive", "eval_windows=consecutive",
                 "va_smoothing_per_dimension=true")
    assert train.main(cfg) == 0
    scores = scores_of(out)
    assert scores["p_mtl"] > 1.5, scores
    window = scores["va_smoothing"]
    assert isinstance(window, list) and len(window) == 2
    # evaluation fed each video chunk after chunk from the carried state: equal to the whole video at once
    model, ckpt = checkpoint.load(out / "best.pt")
    assert ckpt.inference.eval_windows == "consecutive"
    cache = splits.open_features(cfg)
    feats, present, _ = cache.read("v4")
    norm = Normaliser.from_state(ckpt.inference.normaliser)
    chunked = predict_features(model, feats, present, norm, 24, 12, consecutive=True)
    x = torch.from_numpy(np.where(present[:, None], norm(feats), 0.0).astype(np.float32))[None]
    model.net.encoder.reset_state()
    with torch.no_grad():
        whole = model.probabilities(model(x, torch.from_numpy(present)[None]))
    ok = present
    np.testing.assert_allclose(chunked["va"][ok], whole["va"][0].numpy()[ok], atol=1e-5)
    with pytest.raises(InputError, match="carry_state needs batches: videos"):
        train.main(config(syn, tmp_path / "bad", "encoder.bidirectional=false", "encoder.carry_state=true"))


def test_frozen_modules_left_in_training_mode_keep_their_weights_but_not_their_batch_statistics(
        syn: dict[str, Path], tmp_path: Path) -> None:
    """Nguyen's procedure: AU trained first, then its part frozen by requires_grad alone while the
    network stays in training mode (their train.py calls net.train()), on each stage's own frames."""
    out = tmp_path / "run"
    cfg = config(syn, out, "epochs=2", "model.structure=amtl", "encoder=none", "window=1", "stride=1",
                 "eval_stride=1", "batch_size=32", "loss.au=asymmetric", "loss.au_pos_weight=none",
                 "stages=[[au],[expr,va]]", "selection=per_task", "frozen_mode=train", "frames=labelled",
                 "last_batch=keep", "selection_ties=last", "standardise=false")
    assert train.main(cfg) == 0
    _, ckpt = checkpoint.load(out / "best.pt")
    states = ckpt.model.task_state_dicts
    assert ckpt.inference.normaliser is None
    au = {k for k in ckpt.model.state_dict if k.startswith("net.au.")}
    weights = {k for k in au if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    statistics = au - weights
    assert weights and statistics
    for key in weights:  # frozen: the AU stage's weights
        torch.testing.assert_close(states["expr"][key], states["au"][key])
    # ... but its batch norms went on counting and moving in the second stage
    assert any(not torch.equal(states["expr"][k], states["au"][k]) for k in statistics)


def test_valence_and_arousal_each_from_their_own_best_epoch(syn: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = config(syn, out, "epochs=4", "selection=per_task", "selection_va=apart", "frames=labelled",
                 "train_windows=consecutive", "eval_windows=consecutive", "va_smoothing_edges=truncate",
                 "lr=0.05")
    assert train.main(cfg) == 0
    model, ckpt = checkpoint.load(out / "best.pt")
    assert set(ckpt.resume.task_epochs) == {"valence", "arousal", "expr", "au"}
    assert scores_of(out)["epoch"] == ckpt.resume.task_epochs
    assert ckpt.inference.va_smoothing_edges == "truncate"
    history = [json.loads(line)["val"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    for dim, term in (("valence", "ccc_v"), ("arousal", "ccc_a")):
        assert ckpt.resume.task_epochs[dim] == int(np.argmax([h[term] for h in history]))
    # the VA output: valence from the weights of valence's epoch, arousal from arousal's
    x, mask = torch.randn(1, 24, 24), torch.ones(1, 24, dtype=torch.bool)
    with torch.no_grad():
        va = model(x, mask)["va"]
        for k, dim in enumerate(("valence", "arousal")):
            own = checkpoint.build(checkpoint.ModelPart(ckpt.model.args, ckpt.model.task_state_dicts[dim]))
            own.eval()
            torch.testing.assert_close(va[..., k], own(x, mask)["va"][..., k])
