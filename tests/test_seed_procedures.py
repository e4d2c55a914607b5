"""The seed systems' training procedures around the model, compared with their authors' code
(Nguyen's dataset as tests/test_nguyen_reference.py transcribes it): which frames are learned from, the last partial batch, how the best epoch is kept, the smoothing
at a video's ends, and whether features are standardised. Each reference below is the authors'
code as written (only wrapped in a function where it is inline in a script), with its source."""

# ruff: noqa: E501, SIM108, UP008, C416 - the references below are the authors' code as written

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline import training
from pipeline.config import load_config
from pipeline.data import SequenceDataset
from pipeline.distributed import GlobalBatches, World
from pipeline.feature_cache import FeatureCache
from pipeline.inference import smooth
from pipeline.labels import Labels
from pipeline.loop import LoopState
from tests.synthetic import write_cache
from tests.test_nguyen_reference import UniSAW2  # their dataset.py, transcribed there


# fmt: off
# ---- khanhnd185/MTL-ABAW4 train.py, lines 190-231: the best epoch of one run (checkpointing cut) ----
def nguyen_best_epoch(val_metrics_per_epoch):
    best_performance = 0.0
    epoch_from_last_improvement = 0
    best_epoch = None
    for epoch, val_metrics in enumerate(val_metrics_per_epoch):
        if val_metrics >= best_performance:
            best_epoch = epoch
            best_performance = val_metrics
            epoch_from_last_improvement = 0
        else:
            epoch_from_last_improvement += 1
    return best_epoch


# ---- AIM3-RUC/ABAW4 train_seed.py, lines 218-228 and 304-310: each target's best epoch ----
def zhang_best_epochs(perfomances_per_epoch, target_set):
    best_eval_perfomance = {}
    best_eval_epoch = {}
    for target in target_set:
        best_eval_perfomance[target] = 0
        best_eval_epoch[target] = -1
    for epoch, perfomances in enumerate(perfomances_per_epoch):
        for target in target_set:
            perfomance = perfomances[target]
            if perfomance > best_eval_perfomance[target]:
                best_eval_epoch[target] = epoch
                best_eval_perfomance[target] = perfomance
    return best_eval_epoch


# ---- AIM3-RUC/ABAW4 utils/metrics.py, lines 18-50 (smooth_predictions) ----
def smooth_predictions(preds, window=40, mean_or_binomial=True):
    """
    Args:
      preds: list of (subj_timesteps, dim), len(list)=num_subjs
      window: int (one side timesteps to average)
    Return:
      smoothed_preds: shape=preds
    """
    if window == 0:
        return preds
    if not mean_or_binomial:
        from scipy.stats import binom
        binomial_weights = np.zeros((window * 2 + 1,))
        for i in range(window + 1):
            binomial_weights[i] = binomial_weights[-i - 1] = binom.pmf(i, window * 2, 0.5)
    smoothed_preds = []
    for pred in preds:
        smoothed_pred = []
        for t in range(len(pred)):
            left = np.max([0, t - window])
            right = np.min([len(pred), t + window])
            if mean_or_binomial:
                smoothed_pred.append(np.mean(pred[left: right + 1]))
            else:
                if left <= 0:
                    weights = binomial_weights[window - t:]
                elif right >= len(pred):
                    weights = binomial_weights[:len(pred) - t - window - 1]
                else:
                    weights = binomial_weights
                smoothed_pred.append(np.sum(pred[left: right + 1] * weights))
        smoothed_preds.append(np.array(smoothed_pred))
    smoothed_preds = np.array(smoothed_preds)
    return smoothed_preds
# fmt: on
# End of the reference.


def recipe(name: str, *overrides: str):
    return load_config("train", overrides=[f"experiment={name}", *overrides])


def s_affwild2(rng: np.random.Generator, n: int) -> Labels:
    """One video's labels as s-Aff-Wild2 has them: a frame lists a task's labels or none of them
    (-5 for VA, -1 for the expression, -1 for all twelve AUs), and many frames list no task."""
    va = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    expr = rng.integers(0, 8, n)
    au = rng.integers(0, 2, (n, 12))
    va[rng.random(n) < 0.3] = -5
    expr[rng.random(n) < 0.3] = -1
    au[rng.random(n) < 0.3] = -1
    unlisted = rng.random(n) < 0.4
    va[unlisted], expr[unlisted], au[unlisted] = -5, -1, -1
    return Labels(va=va, expr=expr, au=au)


@pytest.fixture
def listed(tmp_path: Path):
    """Three videos with s-Aff-Wild2-like labels, a feature cache (some frames without a face) and
    the same data in Nguyen's layout: their annotation file and their feature dictionary."""
    rng = np.random.default_rng(4)
    lengths = {"10-60-1280x720": 70, "video24": 45, "135-24-1920x1080": 90}
    labels = {v: s_affwild2(rng, n) for v, n in lengths.items()}
    a = {v: rng.normal(size=(n, 3)).astype(np.float16).astype(np.float32) for v, n in lengths.items()}
    b = {v: rng.normal(size=(n, 2)).astype(np.float16).astype(np.float32) for v, n in lengths.items()}
    present = {v: rng.random(n) > 0.1 for v, n in lengths.items()}
    cache = FeatureCache([write_cache(tmp_path / "a.h5", {v: (a[v], present[v]) for v in lengths}),
                          write_cache(tmp_path / "b.h5", {v: (b[v], present[v]) for v in lengths})])
    # their annotation file: one line per image, "<video>/<frame + 1, 5 digits>.jpg,v,a,expr,AU..."
    lines = ["image,valence,arousal,expression,aus"]
    feature_dict = {}
    for v, lab in labels.items():
        for f in range(lengths[v]):
            name = f"{v}/{f + 1:05d}.jpg"
            lines.append(",".join([name, repr(float(lab.va[f, 0])), repr(float(lab.va[f, 1])), str(lab.expr[f]),
                                   *map(str, lab.au[f])]))
            if present[v][f]:  # their extractor wrote no feature for an image without a face
                feature_dict[name] = (a[v][f], b[v][f])
    annotations = tmp_path / "training_set_annotations.txt"
    annotations.write_text("\n".join(lines) + "\n")
    return {"labels": labels, "cache": cache, "annotations": annotations, "features": feature_dict}


def frames_served(dataset: SequenceDataset) -> list[tuple[str, int]]:
    out = []
    for index in range(len(dataset)):
        item = dataset[index]
        start, video = item["start"], dataset.videos[item["video"]]
        rows = dataset.rows[item["video"]][start : start + item["steps"]]
        out += [(video, int(f)) for f in dataset.cache.read(video)[2][rows]]
    return out


@pytest.mark.parametrize(("task", "theirs"), [("va", "VA"), ("expr", "EX"), ("au", "AU")])
def test_nguyen_recipe_trains_each_task_on_the_images_their_dataset_lists(listed, task: str, theirs: str) -> None:
    cfg = recipe("nguyen2022_amtl")
    reference = UniSAW2(str(listed["annotations"]), listed["features"], theirs)
    ours = SequenceDataset(listed["cache"], listed["labels"], list(listed["labels"]), cfg.window, cfg.stride,
                           train=True, frames=cfg.frames, tasks=[task])
    # the same images, each once, with the same features (theirs concatenated as ours are)
    assert len(ours) == len(reference.X)
    items = [ours[i] for i in range(len(ours))]
    x = np.stack([it["x"][0].numpy() for it in items])
    order = np.lexsort(x.T[::-1])
    expected = reference.X[np.lexsort(reference.X.T[::-1])]
    np.testing.assert_array_equal(x[order], expected)
    # ... and the same labels
    y = {"va": lambda it: it["va"][0].numpy(), "expr": lambda it: it["expr"][0].numpy(),
         "au": lambda it: it["au"][0].numpy()}[task]
    ours_y = np.stack([y(it) for it in items])[order]
    theirs_y = reference.y[theirs][np.lexsort(reference.X.T[::-1])]
    np.testing.assert_allclose(ours_y.reshape(len(order), -1).astype(np.float64),
                               theirs_y.reshape(len(order), -1).astype(np.float64), rtol=0, atol=1e-7)


def test_a_stage_of_two_tasks_trains_on_the_images_either_lists(listed) -> None:
    cfg = recipe("nguyen2022_amtl")
    ours = SequenceDataset(listed["cache"], listed["labels"], list(listed["labels"]), 1, 1, train=True,
                           frames=cfg.frames, tasks=["au"])
    ours.set_tasks(["expr", "va"])
    either = set()
    for theirs in ("EX", "VA"):
        names = [line.split(",")[0] for line in listed["annotations"].read_text().splitlines()[1:]]
        reference = UniSAW2(str(listed["annotations"]), listed["features"], theirs)
        listed_names = [n for n in names if n in listed["features"]]
        lookup = {tuple(listed["features"][n][0]) + tuple(listed["features"][n][1]): n for n in listed_names}
        either |= {lookup[tuple(row)] for row in reference.X}
    served = {f"{v}/{f + 1:05d}.jpg" for v, f in frames_served(ours)}
    assert served == either


def test_zhang_recipe_reads_each_video_as_the_sequence_of_its_listed_frames(listed) -> None:
    """Their SeqDataset (data/seq_dataset.py, lines 109-124) holds one feature row per listed image
    of a video, asserting as many rows as labels, and cuts it into max_seq_len chunks in order."""
    cfg = recipe("zhang2022_transformer", "extractors=[onet]")
    labels, cache = listed["labels"], listed["cache"]
    ours = SequenceDataset(cache, labels, list(labels), cfg.window, cfg.stride, train=True, frames=cfg.frames,
                           consecutive=cfg.train_windows == "consecutive", tasks=["va", "expr", "au"])
    for i, video in enumerate(ours.videos):
        lab = labels[video]
        present = cache.read(video)[1]
        listed_frames = [f for f in range(len(lab.expr)) if present[f] and (
            (lab.va[f] > -5).all() or lab.expr[f] > -1 or (lab.au[f] >= 0).all())]
        chunks = [it for it in (ours[j] for j in range(len(ours))) if it["video"] == i]
        assert [c["start"] for c in chunks] == list(range(0, len(listed_frames), cfg.window))
        got = [int(f) for c in chunks for f in cache.read(video)[2][ours.rows[i][c["start"]:c["start"] + c["steps"]]]]
        assert got == listed_frames
        for c in chunks:  # each step's features and labels are those of its listed frame
            frames = ours.rows[i][c["start"]:c["start"] + c["steps"]]
            np.testing.assert_array_equal(c["expr"][: c["steps"]].numpy(), lab.expr[frames])


def test_nguyen_recipe_keeps_the_last_partial_batch_as_their_loader_does() -> None:
    """train.py line 143: ``DataLoader(trainset, batch_size=batch_size, shuffle=True, num_workers=0)``,
    so drop_last is PyTorch's default, False."""
    cfg = recipe("nguyen2022_amtl")
    windows = list(range(600))  # 2 full batches of 256 and one of 88
    theirs = DataLoader(windows, batch_size=cfg.batch_size, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(3))
    shuffle = torch.Generator().manual_seed(3)  # served as training serves it (pipeline.training)
    keys = {(i, True): i for i in windows}  # the loader reads windows by (index, real), as Shares does
    ours = DataLoader(keys, batch_sampler=GlobalBatches(windows, cfg.batch_size, cfg.last_batch, shuffle, World(0, 1)),
                      generator=shuffle, collate_fn=list)
    assert list(ours) == [b.tolist() for b in theirs]
    assert [len(b) for b in theirs] == [256, 256, 88]


@pytest.mark.parametrize("task", ["va", "expr", "au"])
def test_nguyen_recipe_keeps_the_best_epoch_as_their_train_loop(task: str) -> None:
    cfg = recipe("nguyen2022_amtl")
    terms = {"va": "p_va", "expr": "f1_expr", "au": "f1_au"}
    history = [0.31, 0.42, 0.42, 0.40, 0.45, 0.45, 0.2]  # ties at the best: theirs takes the later epoch
    state = LoopState.start(cfg)
    model = torch.nn.Linear(1, 1)
    for epoch, value in enumerate(history):
        scores = {"p_va": math.nan, "f1_expr": math.nan, "f1_au": math.nan, "ccc_v": math.nan,
                  "ccc_a": math.nan, terms[task]: value}
        state.judge(epoch, scores, [task], model, cfg)
    assert state.task_epochs[task] == nguyen_best_epoch(history) == 5


def test_zhang_recipe_keeps_valence_arousal_expression_and_au_best_epochs_apart_as_their_loop() -> None:
    cfg = recipe("zhang2022_transformer")
    rng = np.random.default_rng(0)
    per_epoch = [dict(zip(["valence", "arousal", "expression", "AU"], rng.choice([0.2, 0.3, 0.4, 0.5], 4), strict=True))
                 for _ in range(12)]
    theirs = zhang_best_epochs(per_epoch, ["valence", "arousal", "expression", "AU"])
    state = LoopState.start(cfg)
    model = torch.nn.Linear(1, 1)
    for epoch, p in enumerate(per_epoch):
        scores = {"ccc_v": p["valence"], "ccc_a": p["arousal"], "p_va": (p["valence"] + p["arousal"]) / 2,
                  "f1_expr": p["expression"], "f1_au": p["AU"]}
        state.judge(epoch, scores, list(cfg.model.tasks), model, cfg)
    assert state.task_epochs == {"valence": theirs["valence"], "arousal": theirs["arousal"],
                                 "expr": theirs["expression"], "au": theirs["AU"]}
    assert theirs["valence"] != theirs["arousal"]  # the draw separates them, so the split is tested


@pytest.mark.parametrize("half", [0, 5, 10, 15])
def test_zhang_recipe_smooths_as_their_smooth_predictions(half: int) -> None:
    cfg = recipe("zhang2022_transformer")
    assert 2 * half + 1 in cfg.va_smoothing  # their windows 0, 5, 10, 15 frames each side
    rng = np.random.default_rng(half)
    for n in (3, 17, 40):  # videos shorter and longer than the window
        va = rng.uniform(-1, 1, (n, 2))
        ours = smooth(va, 2 * half + 1, cfg.va_smoothing_edges)
        for k in range(2):
            theirs = smooth_predictions([va[:, k]], window=half)[0]
            np.testing.assert_allclose(ours[:, k], theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["zhang2022_transformer", "nguyen2022_amtl"])
def test_recipes_feed_the_features_as_cached(listed, name: str) -> None:
    """Zhang's transformer script sets ``norm_features=None`` (scripts/train_mtl_transformer.sh line
    33), so SeqDataset.load_feature (lines 121-123) leaves every feature as stored; Nguyen's
    get_dataset concatenates the stored features (dataset.py line 43)."""
    cfg = recipe(name, "extractors=[onet]")
    videos = list(listed["labels"])
    norm = training.fit_normaliser(cfg, listed["cache"], videos)
    ours = SequenceDataset(listed["cache"], listed["labels"], videos, 4, 4, norm)
    feats, present, _ = listed["cache"].read(videos[0], 0, 4)
    np.testing.assert_array_equal(ours[0]["x"].numpy(), np.where(present[:, None], feats, 0))
