"""The ABAW challenge metrics, computed over all frames of all videos pooled together.

- VA: concordance correlation coefficient (CCC) per dimension,
  ``2 cov(p, t) / (var p + var t + (mean p - mean t)^2)`` with population (ddof=0) variances and
  covariance, each mean taken over the same pooled frames. P_VA = (CCC_V + CCC_A) / 2.
- EXPR: macro F1 over the expression classes, as ``sklearn.metrics.f1_score(true, pred,
  average="macro")`` computes it: the average runs over the classes present in the labels or in
  the predictions. A class predicted but never labelled (or labelled but never predicted) counts
  with F1 = 0; a class absent from both is left out. With all 8 classes labelled, as in every
  ABAW split, this is the challenge's sum(F1) / 8. With the ``basic7`` class set
  (:data:`~pipeline.labels.EXPRESSION_SETS`) the classes are 0..6: labels of Other must have been
  made invalid first (:func:`~pipeline.labels.restrict_expressions`), and a prediction of 7 is refused.
- AU: binary F1 of each of the 12 AUs, averaged. An AU with no positive frame in either labels or
  predictions has F1 = 0 (sklearn's ``zero_division`` default).
- P_MTL = P_VA + F1_EXPR + F1_AU.

Frames whose label is invalid (-5 / -1) are left out, per task and for AUs per AU. A task with no
labelled frame scores NaN, and so does P_MTL: the score then says plainly that it is incomplete
instead of silently counting the task as 0. ``n_va``, ``n_expr`` and ``n_au`` report the frames
scored.

ABAW scores every labelled frame, also those of a video where no face was found. Given a prior
(:func:`prior_from_labels`: the training split's mean VA, most frequent expression and AU base
rates), :func:`score_videos` predicts it for each labelled frame that has no prediction, and counts
those frames in ``filled_<task>``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.abaw import AUS, EXPRESSIONS, INVALID, TASKS
from pipeline.labels import Labels, concat, expression_set

AU_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)


def ccc(pred: np.ndarray, true: np.ndarray) -> float:
    """Concordance correlation coefficient of two (n,) sequences; NaN when n = 0.

    A side with zero variance gives 0 (no covariance), unless both sides are the same constant,
    where the sequences agree exactly and the score is 1.
    """
    p = np.asarray(pred, np.float64).reshape(-1)
    t = np.asarray(true, np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"ccc: {len(p)} predictions for {len(t)} labels")
    if len(p) == 0:
        return math.nan
    mp, mt = p.mean(), t.mean()
    # A constant side has exactly zero (co)variance; rounding in its mean must not invent some.
    var_p = p.var() if np.ptp(p) > 0 else 0.0
    var_t = t.var() if np.ptp(t) > 0 else 0.0
    cov = np.mean((p - mp) * (t - mt)) if var_p and var_t else 0.0
    denom = var_p + var_t + (mp - mt) ** 2
    if denom == 0.0:
        return 1.0
    return float(2.0 * cov / denom)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def expr_f1(pred_cls: np.ndarray, true: np.ndarray, n_classes: int = len(EXPRESSIONS)) -> float:
    """Macro F1 of (n,) predicted classes against (n,) labels, both in 0..n_classes-1; -1 labels
    are left out.

    Averaged over the classes present in the labels or the predictions (see the module
    docstring); NaN when no frame is labelled.
    """
    pred = np.asarray(pred_cls).reshape(-1)
    true = np.asarray(true).reshape(-1)
    if pred.shape != true.shape:
        raise ValueError(f"expr_f1: {len(pred)} predictions for {len(true)} labels")
    keep = true != INVALID["expr"]
    pred, true = pred[keep].astype(np.int64), true[keep].astype(np.int64)
    if len(true) == 0:
        return math.nan
    k = n_classes
    if pred.min() < 0 or pred.max() >= k:
        raise ValueError(f"expr_f1: predicted classes must be in 0..{k - 1}")
    if true.min() < 0 or true.max() >= k:
        raise ValueError(f"expr_f1: labelled classes must be in 0..{k - 1}; restrict the labels to the "
                         f"class set first")
    confusion = np.bincount(true * k + pred, minlength=k * k).reshape(k, k)  # rows: true
    tp = np.diag(confusion)
    present = (confusion.sum(0) + confusion.sum(1)) > 0
    f1 = _f1(tp, confusion.sum(0) - tp, confusion.sum(1) - tp)
    return float(f1[present].mean())


def _au_counts(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-AU true positives, false positives, false negatives and labelled frames; (12,) each."""
    valid = true != INVALID["au"]
    pos, hit = (true == 1) & valid, (pred == 1) & valid
    return (pos & hit).sum(0), (~pos & hit).sum(0), (pos & ~hit).sum(0), valid.sum(0)


def au_f1(pred_bin: np.ndarray, true: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean and per-AU F1 of (n, 12) binary predictions against (n, 12) labels.

    -1 labels are left out per AU; an AU without any labelled frame is NaN and the mean runs over
    the others (NaN when none is labelled).
    """
    pred = np.asarray(pred_bin).reshape(-1, len(AUS))
    true = np.asarray(true).reshape(-1, len(AUS))
    if pred.shape != true.shape:
        raise ValueError(f"au_f1: {len(pred)} predictions for {len(true)} labels")
    tp, fp, fn, n = _au_counts(pred, true)
    per_au = np.where(n > 0, _f1(tp, fp, fn), np.nan)
    mean = float(np.nanmean(per_au)) if (n > 0).any() else math.nan
    return mean, per_au


def tune_au_thresholds(probs: np.ndarray, labels: np.ndarray, grid: np.ndarray = AU_GRID) -> np.ndarray:
    """(12,) thresholds maximising each AU's F1 on (n, 12) probabilities and labels.

    Ties go to the threshold closest to 0.5; an AU without a labelled positive keeps 0.5.
    """
    probs = np.asarray(probs, np.float64).reshape(-1, len(AUS))
    labels = np.asarray(labels).reshape(-1, len(AUS))
    grid = np.asarray(grid, np.float64)
    order = np.argsort(np.abs(grid - 0.5), kind="stable")  # argmax then picks the closest to 0.5
    out = np.full(len(AUS), 0.5)
    for j in range(len(AUS)):
        valid = labels[:, j] != INVALID["au"]
        p, pos = probs[valid, j], labels[valid, j] == 1
        if not pos.any():
            continue
        hit = p[:, None] >= grid[None, order]  # (n, g)
        tp = (hit & pos[:, None]).sum(0)
        f1 = _f1(tp, hit.sum(0) - tp, pos.sum() - tp)
        out[j] = grid[order][np.argmax(f1)]
    return out


def _labels_of(labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    get = labels.get if isinstance(labels, Mapping) else lambda k: getattr(labels, k, None)
    return get("va"), get("expr"), get("au")


def expr_classes(expr: np.ndarray) -> np.ndarray:
    """(n, k) logits or probabilities, or (n,) classes -> (n,) int64 classes, -1 where missing."""
    expr = np.asarray(expr)
    if expr.ndim == 1:
        return (np.where(np.isnan(expr), -1, expr) if expr.dtype.kind == "f" else expr).astype(np.int64)
    missing = np.isnan(expr).any(1)
    return np.where(missing, -1, np.argmax(np.nan_to_num(expr, nan=-np.inf), 1)).astype(np.int64)


def binarise_au(probs: np.ndarray, thresholds: np.ndarray | float | None = None) -> np.ndarray:
    """(n, 12) probabilities -> (n, 12) int64 in {0, 1} (p >= threshold), -1 where missing."""
    probs = np.asarray(probs, np.float64).reshape(-1, len(AUS))
    th = np.broadcast_to(np.asarray(0.5 if thresholds is None else thresholds, np.float64), (len(AUS),))
    return np.where(np.isnan(probs), -1, probs >= th).astype(np.int64)


def _check_present(task: str, missing: np.ndarray) -> None:
    if missing.any():
        raise ValueError(f"{task}: {int(missing.sum())} labelled frames have no prediction")


def score(
    preds: Mapping[str, np.ndarray],
    labels: Any,
    au_thresholds: np.ndarray | None = None,
    expressions: str = "abaw8",
) -> dict[str, float]:
    """ABAW scores of pooled per-frame predictions against labels.

    ``preds``: any of ``va`` (n, 2) float, ``expr`` (n, k) logits/probabilities or (n,) classes,
    ``au`` (n, 12) probabilities (thresholded at ``au_thresholds``, default 0.5). ``labels``: a
    :class:`~pipeline.labels.Labels` or a mapping with ``va``, ``expr``, ``au`` arrays. The macro
    F1 runs over the k classes of the set ``expressions`` ("abaw8" or "basic7"). A task without
    predictions or labels scores NaN. Returns ``ccc_v``, ``ccc_a``, ``p_va``, ``f1_expr``,
    ``f1_au``, ``p_mtl``, ``f1_<AU>`` for each AU and ``n_va``, ``n_expr``, ``n_au``.
    """
    n_classes = len(expression_set(expressions))
    va_true, expr_true, au_true = _labels_of(labels)
    out: dict[str, float] = {"ccc_v": math.nan, "ccc_a": math.nan, "p_va": math.nan, "f1_expr": math.nan,
                             "f1_au": math.nan, "p_mtl": math.nan, "n_va": 0, "n_expr": 0, "n_au": 0}
    out.update({f"f1_{a}": math.nan for a in AUS})
    if preds.get("va") is not None and va_true is not None:
        p = np.asarray(preds["va"], np.float64).reshape(-1, 2)
        t = np.asarray(va_true, np.float64).reshape(-1, 2)
        valid = (t != INVALID["va"]).all(1)
        _check_present("va", valid & np.isnan(p).any(1))
        out["ccc_v"], out["ccc_a"] = ccc(p[valid, 0], t[valid, 0]), ccc(p[valid, 1], t[valid, 1])
        out["p_va"] = (out["ccc_v"] + out["ccc_a"]) / 2
        out["n_va"] = int(valid.sum())
    if preds.get("expr") is not None and expr_true is not None:
        width = np.shape(preds["expr"])[1:]
        if width and width[0] != n_classes:
            raise ValueError(f"expr: {width[0]} class scores per frame for the {n_classes} classes of {expressions}")
        cls, t = expr_classes(preds["expr"]), np.asarray(expr_true).reshape(-1)
        _check_present("expr", (t != INVALID["expr"]) & (cls < 0))
        out["f1_expr"] = expr_f1(np.where(t == INVALID["expr"], 0, cls), t, n_classes)
        out["n_expr"] = int((t != INVALID["expr"]).sum())
    if preds.get("au") is not None and au_true is not None:
        b, t = binarise_au(preds["au"], au_thresholds), np.asarray(au_true).reshape(-1, len(AUS))
        _check_present("au", ((t != INVALID["au"]) & (b < 0)).any(1))
        out["f1_au"], per_au = au_f1(b, t)
        out.update({f"f1_{a}": float(f) for a, f in zip(AUS, per_au, strict=True)})
        out["n_au"] = int((t != INVALID["au"]).any(1).sum())
    out["p_mtl"] = out["p_va"] + out["f1_expr"] + out["f1_au"]  # NaN if any task is
    return out


def dense_predictions(pred: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """One video's predictions at frames ``pred["frame"]`` (default 0..m-1) -> n frames with
    ``va`` (n, 2) and ``au`` (n, 12) float64 NaN, ``expr`` (n,) int64 -1 where there is none."""
    out = {"va": np.full((n, 2), np.nan), "expr": np.full(n, -1, np.int64),
           "au": np.full((n, len(AUS)), np.nan)}
    m = next((len(pred[t]) for t in TASKS if pred.get(t) is not None), 0)
    frames = np.asarray(pred["frame"], np.int64) if pred.get("frame") is not None else np.arange(m)
    keep = (frames >= 0) & (frames < n)  # predictions past the labels' end are unlabelled
    f = frames[keep]
    if pred.get("va") is not None:
        out["va"][f] = np.asarray(pred["va"], np.float64).reshape(-1, 2)[keep]
    if pred.get("expr") is not None:
        out["expr"][f] = expr_classes(pred["expr"])[keep]
    if pred.get("au") is not None:
        out["au"][f] = np.asarray(pred["au"], np.float64).reshape(-1, len(AUS))[keep]
    return out


def without_prediction(dense: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per task of dense predictions (:func:`dense_predictions`), the frames that have none: NaN
    in any VA or AU column, expression class -1."""
    return {"va": np.isnan(dense["va"]).any(1), "expr": dense["expr"] < 0, "au": np.isnan(dense["au"]).any(1)}


def prior_from_labels(labels: Mapping[str, Labels]) -> dict[str, np.ndarray | int]:
    """The prediction that knows nothing about a frame, from (training) labels: ``va`` (2,) mean
    valence and arousal over the valid frames, ``expr`` the most frequent valid class (the lowest
    on ties), ``au`` (12,) each AU's positive rate over its valid labels (0 for an AU never
    labelled). A task without any valid label is left out. For a class set other than ABAW's,
    give the labels restricted to it (:func:`~pipeline.labels.restrict_expressions`)."""
    truth = concat(labels.values())
    prior: dict[str, np.ndarray | int] = {}
    if truth.valid("va").any():
        prior["va"] = truth.va[truth.valid("va")].astype(np.float64).mean(0)
    if truth.valid("expr").any():
        prior["expr"] = int(np.argmax(np.bincount(truth.expr[truth.valid("expr")])))
    valid = truth.au != INVALID["au"]
    if valid.any():
        prior["au"] = ((truth.au == 1) & valid).sum(0) / np.maximum(valid.sum(0), 1)
    return prior


def score_videos(
    preds: Mapping[str, Mapping[str, np.ndarray]],
    labels: Mapping[str, Labels],
    au_thresholds: np.ndarray | None = None,
    allow_missing: bool = True,
    prior: Mapping[str, Any] | None = None,
    expressions: str = "abaw8",
) -> dict[str, float]:
    """:func:`score` over the labelled videos, matching predictions to labels by frame.

    ``preds[video]`` holds optional ``frame`` (m,) indices (default 0..m-1) and ``va`` / ``expr``
    / ``au`` as in :func:`score`, NaN (or class -1) where a frame has no prediction. A task is
    scored when some frame has a prediction for it. Labelled frames without a prediction (no face
    in the whole video, no features, or no entry in ``preds``) are counted in ``missing_<task>``
    and left out, or with ``allow_missing=False`` raise ValueError. With a ``prior`` (see
    :func:`prior_from_labels`; any of its tasks), they get the prior's ``va``, ``expr`` or ``au``
    (probabilities, thresholded like predictions) instead and are scored: the count is then
    ``filled_<task>`` and there is no ``missing_<task>``. A task that no video predicts stays NaN.
    """
    per_video = [dense_predictions(preds.get(video, {}), len(lab)) for video, lab in labels.items()]
    pooled = dense_predictions({}, 0)
    if per_video:
        pooled = {t: np.concatenate([p[t] for p in per_video]) for t in TASKS}
    truth = concat(Labels(lab.va.copy(), lab.expr.copy(), lab.au.copy()) for lab in labels.values())
    absent = without_prediction(pooled)
    labelled = {"va": truth.valid("va"), "expr": truth.valid("expr"),
                "au": (truth.au != INVALID["au"]).any(1)}
    missing = {}
    for task in TASKS:
        if absent[task].all():
            pooled[task] = None
            continue
        holes = absent[task] & labelled[task]
        if prior is not None and prior.get(task) is not None:
            if task == "expr":
                pooled[task][holes] = int(prior[task])
            else:
                pooled[task][holes] = np.asarray(prior[task], np.float64)
            missing[f"filled_{task}"] = int(holes.sum())
            continue
        missing[f"missing_{task}"] = int(holes.sum())
        if holes.any() and not allow_missing:
            names = np.repeat(np.array(list(labels), dtype=object), [len(lab) for lab in labels.values()])
            videos = list(dict.fromkeys(names[holes]))
            raise ValueError(f"{task}: {int(holes.sum())} labelled frames of {len(videos)} videos have no "
                             f"prediction, e.g. in {', '.join(videos[:3])}")
        getattr(truth, task)[holes] = INVALID[task]
    return {**score(pooled, truth, au_thresholds, expressions), **missing}


# A run's headline scores in table order: (column header, key of score() and scores.json).
SCORE_COLUMNS = (("CCC-V", "ccc_v"), ("CCC-A", "ccc_a"), ("P_VA", "p_va"), ("F1-EXPR", "f1_expr"), ("F1-AU", "f1_au"),
                 ("P_MTL", "p_mtl"))


def columns(*keys: str) -> tuple[tuple[str, str], ...]:
    """The :data:`SCORE_COLUMNS` of ``keys``, in table order."""
    unknown = set(keys) - {k for _, k in SCORE_COLUMNS}
    if unknown:
        raise ValueError(f"no score columns {sorted(unknown)}")
    return tuple(c for c in SCORE_COLUMNS if c[1] in keys)


def score_cell(x: float | None) -> str:
    """A score as a table cell: four decimals, ``n/a`` when undefined (None or NaN)."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def format_table(scores: Mapping[str, float]) -> str:
    """A small Markdown table of :func:`score`'s output: the headline scores, then per-AU F1."""
    head = SCORE_COLUMNS
    lines = [
        "| " + " | ".join(h for h, _ in head) + " | frames (va/expr/au) |",
        "|" + "---:|" * (len(head) + 1),
        "| " + " | ".join(score_cell(scores.get(k, math.nan)) for _, k in head)
        + f" | {scores.get('n_va', 0)}/{scores.get('n_expr', 0)}/{scores.get('n_au', 0)} |",
    ]
    if any(f"f1_{a}" in scores for a in AUS):
        lines += [
            "",
            "| " + " | ".join(AUS) + " |",
            "|" + "---:|" * len(AUS),
            "| " + " | ".join(score_cell(scores.get(f"f1_{a}", math.nan)) for a in AUS) + " |",
        ]
    return "\n".join(lines)


def summarise(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation, min and max of the values that are not None (None if none are)."""
    ok = [v for v in values if v is not None]
    if not ok:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    std = statistics.stdev(ok) if len(ok) > 1 else 0.0
    return {"mean": statistics.fmean(ok), "std": std, "min": min(ok), "max": max(ok), "n": len(ok)}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "n/a" if not math.isfinite(v) else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def score_by_data(preds: dict, labels: dict, names: list[str], **how) -> dict[str, dict]:
    """Each pooled data set's own scores (its videos are ``<name>/<video>``), scored as
    :func:`score_videos` scores with ``how``."""
    out = {}
    for name in names:
        own = {v: lab for v, lab in labels.items() if v.startswith(f"{name}/")}
        out[name] = score_videos({v: p for v, p in preds.items() if v in own}, own, **how)
    return out


def print_scores(scores: dict) -> None:
    """The scores table, and each data set's own line when the run pooled several."""
    print(format_table(scores))
    if scores.get("data"):
        shown = columns("ccc_v", "ccc_a", "f1_expr", "f1_au", "p_mtl")
        print("\n" + markdown_table(
            ["data set", *(h for h, _ in shown), "frames (va/expr/au)"],
            [[name, *(score_cell(own[k]) for _, k in shown), f"{own['n_va']}/{own['n_expr']}/{own['n_au']}"]
             for name, own in scores["data"].items()]))
