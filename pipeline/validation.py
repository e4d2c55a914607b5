"""Validation of a training run: the model's outputs over every validation video, the score that
picks the best epoch, the VA smoothing and AU thresholds chosen on validation, and the scoring of
the best checkpoint once training ends (its predictions, ``scores.json``, ``curves.png``)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from models import MultiTaskModel
from pipeline import checkpoint, metrics
from pipeline.atomic import write_json
from pipeline.config import Config, InputError
from pipeline.data import Normaliser, labelled_rows
from pipeline.feature_cache import FeatureCache, PooledCache
from pipeline.inference import predict_features, smooth
from pipeline.splits import data_sets, expressions
from pipeline.training import Training
from pipeline.writers import write_task_files


def validate(
    model: MultiTaskModel,
    cache: FeatureCache,
    labels: dict,
    videos: list[str],
    normaliser: Normaliser | None,
    cfg: Config,
    au_thresholds: np.ndarray | None = None,
    prior: dict | None = None,
) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Scores over every labelled validation frame pooled, and the per-frame predictions of each
    video with features; labelled frames without a prediction (no features, no face in the whole
    video) take ``prior`` and are counted as ``filled_<task>``."""
    preds = {}
    for video in videos:
        out = video_outputs(model, cache, video, normaliser, cfg, labels.get(video))
        if out is not None:
            preds[video] = out
    scores = metrics.score_videos(preds, labels, au_thresholds=au_thresholds, prior=prior,
                                  expressions=expressions(cfg))
    if isinstance(cache, PooledCache):  # each data set's own scores beside the pooled ones
        scores["data"] = metrics.score_by_data(preds, labels, list(cache.caches), au_thresholds=au_thresholds,
                                               prior=prior, expressions=expressions(cfg))
    return scores, preds


def video_outputs(model: MultiTaskModel, cache: FeatureCache, video: str, normaliser: Normaliser | None,
                  cfg: Config, labels=None, scored: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
    """One video's per-frame outputs (``frame`` (m,) and ``model.probabilities`` per task) as the
    run of ``cfg`` computes them. A run trained on its labelled frames (``frames=labelled``) sees
    the sequence of the frames it scores: those ``labels`` label for its tasks, or the frames in
    ``scored`` (a test list's); None when there is none."""
    feats, present, frames = cache.read(video)
    if cfg.frames == "labelled":  # the sequence of the video's labelled frames, as it was trained
        rows = (labelled_rows(labels, frames, cfg.model.tasks) if scored is None
                else np.flatnonzero(np.isin(frames, scored)))
        if not len(rows):
            return None
        feats, present, frames = feats[rows], present[rows], frames[rows]
    if cfg.noise_features:
        feats = np.random.default_rng((cfg.seed, len(video))).standard_normal(feats.shape).astype(np.float32)
        normaliser = None
    device = next(model.parameters()).device  # the model's own: a rank's GPU under torchrun
    out = predict_features(model, feats, present, normaliser, cfg.window, cfg.eval_stride, device,
                           consecutive=cfg.eval_windows == "consecutive")
    return {"frame": frames, **out}


def as_scored(preds: dict, labels: dict, prior: dict | None) -> dict[str, dict[str, np.ndarray]]:
    """``preds`` as :func:`pipeline.metrics.score_videos` scored them with ``prior``: a labelled
    video without a prediction, or frames of one without any (no face in the whole video), take
    the prior of each task some video predicts, so that the written predictions give the run's
    scores again and hold no sentinel; videos with nothing to fill are left as they are."""
    if prior is None:
        return preds
    predicted = [t for t in ("va", "expr", "au") if prior.get(t) is not None
                 and any(p.get(t) is not None for p in preds.values())]
    out = dict(preds)
    for video in dict.fromkeys([*preds, *labels]):
        pred = preds.get(video, {})
        n = max(len(labels[video]) if video in labels else 0,
                int(np.max(pred["frame"])) + 1 if pred.get("frame") is not None and len(pred["frame"]) else 0)
        dense = metrics.dense_predictions(pred, n)
        absent = metrics.without_prediction(dense)
        if not any(absent[t].any() for t in predicted):
            continue
        for task in predicted:
            dense[task][absent[task]] = prior[task]
        out[video] = {"frame": np.arange(n), **{t: dense[t] for t in predicted}}
    return out


def choose_va_smoothing(preds: dict, labels: dict, windows: list[int], per_dimension: bool = False,
                        prior: dict | None = None, edges: str = "pad") -> tuple[int | list[int], float]:
    """The moving-average window (frames) for valence and arousal that maximises validation P_VA;
    with ``per_dimension`` each dimension's own window, by its CCC, as ``[valence, arousal]``.
    ``edges``: how the average treats a video's ends (:func:`pipeline.inference.smooth`)."""
    def scores(window):
        smoothed = {v: {**p, "va": smooth(p["va"], window, edges)} for v, p in preds.items()}
        return metrics.score_videos(smoothed, labels, prior=prior)

    tried = {w: scores(w) for w in sorted(set(windows) | {1})}
    if not per_dimension:
        best = max(tried, key=lambda w: (round(tried[w]["p_va"], 6), -w))  # the smallest of equals
        return best, tried[best]["p_va"]
    chosen = [max(tried, key=lambda w: (round(tried[w][key], 6), -w)) for key in ("ccc_v", "ccc_a")]
    return chosen, scores(chosen)["p_va"]


TERMS = {"va": "p_va", "expr": "f1_expr", "au": "f1_au"}  # each task's term of P_MTL
VA_TERMS = {"valence": "ccc_v", "arousal": "ccc_a"}  # VA's dimensions, selected apart


def selection_keys(tasks: list[str], va: str = "joint") -> list[str]:
    """What per-task selection keeps a best epoch for: each task, with VA split into valence and
    arousal when ``va`` is ``apart``."""
    return [k for t in tasks for k in (VA_TERMS if t == "va" and va == "apart" else (t,))]


def selection_term(key: str) -> str:
    """The validation score that picks ``key``'s best epoch (a task or a VA dimension)."""
    return TERMS.get(key) or VA_TERMS[key]


# each task's validation scores: its term of P_MTL and, for VA, its dimensions
TASK_SCORES = {t: (term, *(VA_TERMS.values() if t == "va" else ())) for t, term in TERMS.items()}


def selected_scores(scores: dict, cfg: Config) -> dict:
    """The validation scores the best epoch is chosen on: the pooled ones, or with
    ``selection_data`` that data set's own (a run over several data sets) for each task it labels,
    the pooled ones for the tasks it does not."""
    if not cfg.selection_data:
        return scores
    own = scores["data"][cfg.selection_data]
    chosen = dict(scores)
    for task, keys in TASK_SCORES.items():
        if own.get(f"n_{task}"):
            chosen.update({k: own[k] for k in keys if k in own})
    return chosen


def check_selection_data(cfg: Config) -> None:
    """Refuse a ``selection_data`` that is not one of the run's data sets, before any work."""
    names = [d.name for d in data_sets(cfg)] if cfg.data.get("members") else []
    if cfg.selection_data and cfg.selection_data not in names:
        raise InputError(f"config key 'selection_data' = {cfg.selection_data!r}: not a data set this run pools "
                         f"({', '.join(names) or 'it reads one; selection_data is for data=[a,b]'})")


def selection_score(scores: dict, tasks: list[str]) -> float:
    """What early stopping maximises: P_MTL's terms for the tasks trained (P_MTL for all three)."""
    return float(sum(scores[TERMS[t]] for t in tasks))


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend()
    for _, key in metrics.columns("p_mtl", "ccc_v", "ccc_a", "f1_expr", "f1_au"):
        values = [h["val"].get(key) for h in history]
        if any(v is not None and not math.isnan(v) for v in values):
            ax2.plot(epochs, values, label=key)
    ax2.set_xlabel("epoch"), ax2.set_ylabel("validation"), ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)



def report_finished(out: Path) -> None:
    """What a run finished earlier with the same settings says instead of training again."""
    print(f"\n{out}: finished earlier with these settings; not trained again")
    metrics.print_scores(json.loads((out / "scores.json").read_text()))


def finish(cfg: Config, out: Path, history: list[dict], cache: FeatureCache, training: Training,
           device: torch.device, identity: str) -> None:
    """Score the best checkpoint of the run ``training`` built, store the thresholds and smoothing
    chosen on validation with it, and write the curves, predictions and ``scores.json``."""
    val_labels, val_videos, prior = training.val_labels, training.val_videos, training.prior
    counts = {"train": len(training.train_videos), "val": len(val_videos), "val_labelled": len(val_labels)}
    plot_curves(history, out / "curves.png")
    best_path = out / "best.pt"
    model, ckpt = checkpoint.load(best_path, device)
    scores, preds = validate(model, cache, val_labels, val_videos, training.normaliser, cfg, prior=prior)
    # Chosen on validation and stored with the model for prediction; the headline scores stay
    # those of the official 0.5 threshold and unsmoothed outputs.
    chosen = {}
    if cfg.tune_au_thresholds and "au" in cfg.model.tasks:
        probs = np.concatenate([metrics.dense_predictions(preds[v], len(val_labels[v]))["au"] for v in val_videos])
        thresholds = metrics.tune_au_thresholds(probs, np.concatenate([val_labels[v].au for v in val_videos]))
        chosen["au_thresholds"] = thresholds.tolist()
        scores["f1_au_tuned"] = metrics.score_videos(preds, val_labels, au_thresholds=thresholds,
                                                     prior=prior)["f1_au"]
    if "va" in cfg.model.tasks:
        chosen["va_smoothing"], scores["p_va_smoothed"] = choose_va_smoothing(
            preds, val_labels, cfg.va_smoothing, cfg.va_smoothing_per_dimension, prior, cfg.va_smoothing_edges)
        scores["va_smoothing"] = chosen["va_smoothing"]
    if chosen:
        ckpt.inference = dataclasses.replace(ckpt.inference, **chosen)
        checkpoint.save(best_path, ckpt)
    write_task_files(out / "predictions", as_scored(preds, val_labels, prior), tasks=tuple(cfg.model.tasks),
                     expressions=expressions(cfg))
    epoch = ckpt.resume.task_epochs if cfg.selection == "per_task" else ckpt.resume.epoch
    scores.update({"encoder": cfg.encoder.name, "extractors": list(cfg.extractors), "epoch": epoch,
                   "expressions": expressions(cfg), "noise_features": cfg.noise_features,
                   "videos": counts, "identity": identity})
    write_json(out / "scores.json", scores)
    print(f"\nValidation scores ({cfg.data.name}, {'+'.join(cfg.extractors)} features, {cfg.encoder.name}, "
          f"best epoch {epoch}){' -- NOISE CONTROL' if cfg.noise_features else ''}")
    metrics.print_scores(scores)
    filled = {k[len("filled_"):]: v for k, v in scores.items() if k.startswith("filled_") and v}
    if filled:
        print("labelled frames without a prediction, scored with the training prior: "
              + ", ".join(f"{t} {n}" for t, n in filled.items()))
    print(f"written to {out / 'scores.json'}")
