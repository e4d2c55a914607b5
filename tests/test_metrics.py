"""ABAW metrics against scikit-learn's f1_score and a direct NumPy CCC, plus the edge cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import f1_score

from pipeline.labels import AUS, Labels, restrict_expressions
from pipeline.metrics import (
    AU_GRID,
    au_f1,
    ccc,
    expr_f1,
    format_table,
    prior_from_labels,
    score,
    score_videos,
    tune_au_thresholds,
)


def ccc_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's CCC through Pearson's r and population standard deviations."""
    r = np.corrcoef(x, y)[0, 1]
    sx, sy = x.std(), y.std()
    return 2 * r * sx * sy / (sx**2 + sy**2 + (x.mean() - y.mean()) ** 2)


def sk_f1(true: np.ndarray, pred: np.ndarray, **kw) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on ill-defined F1 and returns 0, as we do
        return f1_score(true, pred, **kw)


@pytest.mark.parametrize("seed", range(4))
def test_ccc_matches_numpy_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = rng.uniform(-1, 1, 400)
    p = 0.6 * t + rng.normal(0.1 * seed, 0.3, 400)
    assert ccc(p, t) == pytest.approx(ccc_reference(p, t), abs=1e-12)
    assert ccc(t, t) == pytest.approx(1.0)
    assert ccc(2 * t.mean() - t, t) == pytest.approx(-1.0)  # mirrored about the mean


def test_ccc_edge_cases() -> None:
    t = np.linspace(-1, 1, 50)
    assert ccc(np.full(50, 0.3), t) == 0.0  # constant prediction: no covariance
    assert ccc(t, np.full(50, 0.3)) == 0.0
    assert ccc(np.full(5, 0.2), np.full(5, 0.7)) == 0.0  # both constant, different means
    assert ccc(np.full(5, 0.2), np.full(5, 0.2)) == 1.0  # both constant and equal
    assert math.isnan(ccc(np.zeros(0), np.zeros(0)))
    with pytest.raises(ValueError, match="3 predictions for 4 labels"):
        ccc(np.zeros(3), np.zeros(4))


def test_ccc_pools_frames_across_videos() -> None:
    # two videos whose own means differ: pooled CCC is not the mean of per-video CCCs
    rng = np.random.default_rng(0)
    t1, t2 = rng.uniform(-1, 0, 100), rng.uniform(0, 1, 60)
    p1, p2 = t1 + rng.normal(0, 0.2, 100), t2 * 0.5 + rng.normal(0, 0.2, 60)
    labels = {
        "a": Labels(np.stack([t1, t1], 1), np.full(100, -1), np.full((100, 12), -1)),
        "b": Labels(np.stack([t2, t2], 1), np.full(60, -1), np.full((60, 12), -1)),
    }
    preds = {"a": {"va": np.stack([p1, p1], 1)}, "b": {"va": np.stack([p2, p2], 1)}}
    got = score_videos(preds, labels)["ccc_v"]
    pooled_t = np.concatenate([t1, t2]).astype(np.float32).astype(np.float64)
    assert got == pytest.approx(ccc_reference(np.concatenate([p1, p2]), pooled_t), abs=1e-9)
    assert abs(got - (ccc_reference(p1, t1) + ccc_reference(p2, t2)) / 2) > 0.05


@pytest.mark.parametrize("seed", range(4))
def test_expr_f1_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 8, 300)
    p = np.where(rng.random(300) < 0.5, t, rng.integers(0, 8, 300))
    t[t == 3] = 2  # class 3 absent from the labels; still predicted sometimes
    p[p == 6] = 5  # class 6 never predicted
    p[(p == 7) & (t != 7)] = 0
    t_masked = np.where(rng.random(300) < 0.2, -1, t)
    keep = t_masked >= 0
    assert expr_f1(p, t_masked) == pytest.approx(sk_f1(t[keep], p[keep], average="macro"), abs=1e-12)
    assert expr_f1(p, t) == pytest.approx(sk_f1(t, p, average="macro"), abs=1e-12)


def test_expr_f1_edge_cases() -> None:
    assert math.isnan(expr_f1(np.array([1, 2]), np.array([-1, -1])))
    assert expr_f1(np.array([4, 4, 4]), np.array([4, 4, 4])) == 1.0
    # predicted but never labelled counts as F1 0: (1 + 0) / 2
    assert expr_f1(np.array([4, 4, 5]), np.array([4, 4, 4])) == pytest.approx(sk_f1([4, 4, 4], [4, 4, 5],
                                                                                      average="macro"))
    with pytest.raises(ValueError, match="0..7"):
        expr_f1(np.array([8]), np.array([1]))


@pytest.mark.parametrize("seed", range(3))
def test_au_f1_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = (rng.random((250, 12)) < 0.3).astype(np.int64)
    p = np.where(rng.random((250, 12)) < 0.7, t, 1 - t)
    t[:, 4] = 0  # an AU never active in the labels
    p[:, 4] = 0  # nor predicted: F1 is 0 by sklearn's default
    t[rng.random((250, 12)) < 0.1] = -1  # invalid frames, left out per AU
    mean, per_au = au_f1(p, t)
    expected = [sk_f1(t[t[:, j] >= 0, j], p[t[:, j] >= 0, j]) for j in range(12)]
    np.testing.assert_allclose(per_au, expected, atol=1e-12)
    assert mean == pytest.approx(np.mean(expected), abs=1e-12) and per_au[4] == 0.0


def test_au_f1_invalid_columns() -> None:
    t = np.ones((4, 12), np.int64)
    t[:, 2] = -1
    mean, per_au = au_f1(np.ones((4, 12)), t)
    assert math.isnan(per_au[2]) and mean == 1.0
    mean, per_au = au_f1(np.ones((4, 12)), np.full((4, 12), -1))
    assert math.isnan(mean) and np.isnan(per_au).all()


def test_tune_au_thresholds() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((400, 12)) < 0.3).astype(np.int64)
    # scores whose useful threshold differs per AU: positives sit around 0.2 + 0.05 j
    probs = np.clip(labels * (0.2 + 0.05 * np.arange(12)) + rng.normal(0.05, 0.05, (400, 12)), 0, 1)
    labels[:, 0] = 0  # no positive at all: the default stays
    th = tune_au_thresholds(probs, labels)
    assert th.shape == (12,) and th[0] == 0.5 and set(th) <= set(AU_GRID) | {0.5}
    for j in range(1, 12):
        best = max(sk_f1(labels[:, j], probs[:, j] >= g) for g in AU_GRID)
        assert sk_f1(labels[:, j], probs[:, j] >= th[j]) == pytest.approx(best)
        assert best >= sk_f1(labels[:, j], probs[:, j] >= 0.5)
    tuned = score({"au": probs}, {"au": labels}, au_thresholds=th)["f1_au"]
    assert tuned > score({"au": probs}, {"au": labels})["f1_au"]


def random_task_data(n: int, seed: int = 0) -> tuple[dict, Labels]:
    rng = np.random.default_rng(seed)
    va_t = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    expr_t = rng.integers(0, 8, n)
    au_t = (rng.random((n, 12)) < 0.4).astype(np.int64)
    va_t[:5] = -5
    expr_t[3:9] = -1
    au_t[10:12] = -1
    preds = {"va": va_t * 0.5 + rng.normal(0, 0.3, (n, 2)), "expr": rng.normal(size=(n, 8)),
             "au": rng.random((n, 12))}
    return preds, Labels(va_t, expr_t, au_t)


def test_score_combines_the_tasks() -> None:
    preds, labels = random_task_data(200)
    s = score(preds, labels)
    va_ok, ex_ok, au_ok = labels.valid("va"), labels.valid("expr"), labels.valid("au")
    v_true = labels.va[va_ok, 0].astype(float)
    assert s["ccc_v"] == pytest.approx(ccc_reference(preds["va"][va_ok, 0], v_true))
    assert s["f1_expr"] == pytest.approx(sk_f1(labels.expr[ex_ok], preds["expr"][ex_ok].argmax(1),
                                               average="macro"))
    per_au = [sk_f1(labels.au[au_ok, j], preds["au"][au_ok, j] >= 0.5) for j in range(12)]
    assert s["f1_au"] == pytest.approx(np.mean(per_au))
    assert s[f"f1_{AUS[3]}"] == pytest.approx(per_au[3])
    assert s["p_va"] == pytest.approx((s["ccc_v"] + s["ccc_a"]) / 2)
    assert s["p_mtl"] == pytest.approx(s["p_va"] + s["f1_expr"] + s["f1_au"])
    assert (s["n_va"], s["n_expr"], s["n_au"]) == (195, 194, 198)
    # classes instead of logits give the same expression score
    assert score({"expr": preds["expr"].argmax(1)}, labels)["f1_expr"] == s["f1_expr"]


def test_score_with_a_task_missing() -> None:
    preds, labels = random_task_data(50)
    s = score(preds, Labels(labels.va, np.full(50, -1), labels.au))
    assert math.isnan(s["f1_expr"]) and math.isnan(s["p_mtl"]) and s["n_expr"] == 0
    assert not math.isnan(s["p_va"]) and not math.isnan(s["f1_au"])
    uni = score({"va": preds["va"]}, labels)
    assert uni["p_va"] == s["p_va"] and math.isnan(uni["f1_au"]) and math.isnan(uni["p_mtl"])
    table = format_table(s)
    assert "P_MTL" in table and "n/a" in table and f"{s['p_va']:.4f}" in table and "AU26" in table


def test_score_refuses_missing_predictions_on_labelled_frames() -> None:
    preds, labels = random_task_data(30)
    preds["va"][20] = np.nan
    with pytest.raises(ValueError, match="va: 1 labelled frames have no prediction"):
        score(preds, labels)
    preds["va"][20] = 0.0
    preds["va"][0] = np.nan  # frame 0 has no VA label: fine
    assert not math.isnan(score(preds, labels)["ccc_v"])


def test_score_videos_matches_frames() -> None:
    preds, labels = random_task_data(40, seed=3)
    lab = {"v": labels}
    full = score_videos({"v": preds}, lab)
    assert full["p_mtl"] == pytest.approx(score(preds, labels)["p_mtl"])
    assert full["missing_va"] == full["missing_expr"] == full["missing_au"] == 0
    # the same predictions given for every other frame, in shuffled order, plus one past the end
    frames = np.random.default_rng(0).permutation(np.arange(0, 40, 2))
    sparse = {k: np.concatenate([v[frames], v[:1]]) for k, v in preds.items()}
    sparse["frame"] = np.append(frames, 45)
    half = score_videos({"v": sparse}, lab)
    keep = np.zeros(40, bool)
    keep[frames] = True
    sub = Labels(*(np.where(keep[:, None] if a.ndim == 2 else keep, a, -5 if a.dtype.kind == "f" else -1)
                   for a in (labels.va, labels.expr, labels.au)))
    assert half["p_mtl"] == pytest.approx(score(preds, sub)["p_mtl"])
    assert half["missing_expr"] == int((labels.valid("expr") & ~keep).sum())
    with pytest.raises(ValueError, match="labelled frames of 1 videos have no prediction, e.g. in v"):
        score_videos({"v": sparse}, lab, allow_missing=False)
    # a video with no prediction at all, and a task nobody predicted
    no_expr = {k: v for k, v in preds.items() if k != "expr"}
    s = score_videos({"v": no_expr}, {"v": labels, "w": Labels.empty(3)}, allow_missing=False)
    assert math.isnan(s["f1_expr"]) and "missing_expr" not in s and s["missing_va"] == 0


def test_prior_from_labels() -> None:
    a = Labels([[0.2, -0.4], [-5, -5], [0.6, 0.0]], [3, 3, 1], [[1] * 12, [0] * 12, [-1] * 12])
    b = Labels([[0.1, 0.1]], [-1], [[1] + [0] * 11])
    prior = prior_from_labels({"a": a, "b": b})
    np.testing.assert_allclose(prior["va"], [0.3, -0.1], atol=1e-7)
    assert prior["expr"] == 3
    np.testing.assert_allclose(prior["au"], [2 / 3] + [1 / 3] * 11)
    assert prior_from_labels({"c": Labels.empty(4)}) == {}


def test_prior_fills_and_scores_a_video_without_predictions() -> None:
    preds, labels = random_task_data(60, seed=5)
    _, unseen = random_task_data(25, seed=6)
    val = {"seen": labels, "unseen": unseen}
    prior = {"va": np.array([0.1, -0.2]), "expr": 4, "au": np.linspace(0.1, 0.9, 12)}
    got = score_videos({"seen": preds}, val, prior=prior)
    n = len(unseen)
    filled = {"va": np.concatenate([preds["va"], np.tile(prior["va"], (n, 1))]),
              "expr": np.concatenate([preds["expr"].argmax(1), np.full(n, 4)]),
              "au": np.concatenate([preds["au"], np.tile(prior["au"], (n, 1))])}
    whole = Labels(*(np.concatenate([getattr(labels, t), getattr(unseen, t)]) for t in ("va", "expr", "au")))
    expected = score(filled, whole)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key
    assert got["n_va"] == labels.valid("va").sum() + unseen.valid("va").sum()
    assert (got["filled_va"], got["filled_expr"], got["filled_au"]) == (20, 19, 23)
    assert not any(k.startswith("missing_") for k in got)
    # a strict caller gets every labelled frame scored, nothing refused
    assert score_videos({"seen": preds}, val, allow_missing=False, prior=prior)["p_mtl"] == got["p_mtl"]
    # without a prior the unseen video's frames are left out, as before
    plain = score_videos({"seen": preds}, val)
    assert plain["p_mtl"] == pytest.approx(score(preds, labels)["p_mtl"], abs=1e-12)
    assert (plain["missing_va"], plain["missing_expr"], plain["missing_au"]) == (20, 19, 23)
    assert plain["n_va"] == labels.valid("va").sum() and "filled_va" not in plain
    with pytest.raises(ValueError, match="have no prediction, e.g. in unseen"):
        score_videos({"seen": preds}, val, allow_missing=False)
    # a task no video predicts is not invented from the prior
    no_au = score_videos({"seen": {k: v for k, v in preds.items() if k != "au"}}, val, prior=prior)
    assert math.isnan(no_au["f1_au"]) and "filled_au" not in no_au and no_au["filled_va"] == 20


@pytest.mark.parametrize("seed", range(3))
def test_expr_f1_over_the_basic7_set_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 7, 400)
    p = np.where(rng.random(400) < 0.4, t, rng.integers(0, 7, 400))
    t[rng.random(400) < 0.1] = -1
    keep = t >= 0
    expected = sk_f1(t[keep], p[keep], average="macro", labels=range(7))
    assert expr_f1(p, t, n_classes=7) == pytest.approx(expected, abs=1e-12)
    logits = rng.normal(size=(400, 7))
    logits[np.arange(400), p] += 10
    lab = Labels(np.full((400, 2), -5), t, np.full((400, 12), -1))
    assert score({"expr": logits}, lab, expressions="basic7")["f1_expr"] == pytest.approx(expected, abs=1e-12)
    assert score_videos({"v": {"expr": logits}}, {"v": lab}, expressions="basic7")["f1_expr"] == pytest.approx(
        expected, abs=1e-12)
    # eight classes as before; Other is neither a label nor a prediction of basic7
    with pytest.raises(ValueError, match="0..6"):
        expr_f1(np.array([7]), np.array([1]), n_classes=7)
    with pytest.raises(ValueError, match="restrict the labels"):
        expr_f1(np.array([1]), np.array([7]), n_classes=7)
    with pytest.raises(ValueError, match="8 class scores per frame for the 7 classes of basic7"):
        score({"expr": rng.normal(size=(400, 8))}, lab, expressions="basic7")
    eight = Labels(lab.va, np.where(rng.random(400) < 0.1, 7, t), lab.au)
    pred8 = np.where(rng.random(400) < 0.1, 7, p)
    assert score({"expr": pred8}, eight)["f1_expr"] == expr_f1(pred8, eight.expr)
    basic = restrict_expressions(eight, "basic7")
    assert not math.isnan(score({"expr": p}, basic, expressions="basic7")["f1_expr"])
