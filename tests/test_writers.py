"""Prediction writers -> readers round trips, and the evaluate stage end to end."""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from pipeline import tables
from pipeline.config import InputError, load_config
from pipeline.evaluate import main as evaluate
from pipeline.labels import AUS, EXPRESSIONS, AnnotationError, Labels, load_annotations, read_mtl_file, read_task_file
from pipeline.writers import (
    detect_layout,
    read_csv_predictions,
    read_predictions,
    write_csv,
    write_mtl,
    write_task_files,
)

LAYOUTS = ("mtl", "tasks", "csv")


def write_predictions(path: Path, preds: dict, layout: str, au_thresholds: np.ndarray | None = None,
                      expressions: str | None = None) -> Path:
    """Write ``preds`` in ``layout`` ("mtl", "tasks" or "csv"); ``path`` is a file, or a folder for "tasks"."""
    if layout == "mtl":
        return write_mtl(path, preds, au_thresholds)
    if layout == "tasks":
        write_task_files(path, preds, au_thresholds=au_thresholds, expressions=expressions)
        return Path(path)
    if layout == "csv":
        return write_csv(path, preds)
    raise ValueError(f"prediction layout {layout!r}: choose one of {', '.join(LAYOUTS)}")


def model_outputs(frames: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = len(frames)
    logits = rng.normal(size=(m, 8))
    return {"frame": frames, "va": rng.uniform(-1.3, 1.3, (m, 2)),
            "expr": np.exp(logits) / np.exp(logits).sum(1, keepdims=True), "au": rng.random((m, 12))}


@pytest.fixture()
def outputs() -> dict[str, dict[str, np.ndarray]]:
    return {"vid1": model_outputs(np.arange(6)), "vid2_left": model_outputs(np.array([4, 0, 2]), seed=1)}


@pytest.mark.parametrize("layout", ["mtl", "tasks", "csv"])
def test_round_trip(tmp_path: Path, outputs: dict, layout: str, caplog: pytest.LogCaptureFixture) -> None:
    th = np.linspace(0.3, 0.7, 12)
    target = tmp_path / ("preds" if layout == "tasks" else f"preds.{'csv' if layout == 'csv' else 'txt'}")
    with caplog.at_level(logging.WARNING):
        write_predictions(target, outputs, layout, au_thresholds=th)
    assert detect_layout(target)[0] == layout
    back = read_predictions(target)
    assert sorted(back) == ["vid1", "vid2_left"]
    for video, out in outputs.items():
        got, f = back[video], out["frame"]
        assert len(got["expr"]) == f.max() + 1
        np.testing.assert_allclose(got["va"][f], np.clip(out["va"], -1, 1), atol=1e-6)
        np.testing.assert_array_equal(got["expr"][f], out["expr"].argmax(1))
        au = out["au"] if layout == "csv" else out["au"] >= th
        np.testing.assert_allclose(got["au"][f], au, atol=1e-6)
        gaps = np.setdiff1d(np.arange(f.max() + 1), f)  # frames 1 and 3 of vid2_left
        assert np.isnan(got["va"][gaps]).all() and (got["expr"][gaps] == -1).all()
        assert np.isnan(got["au"][gaps]).all()
    if layout == "tasks":  # row i must be frame i, so the gaps were written and warned about once
        assert [r.getMessage().split(":")[0] for r in caplog.records] == ["vid2_left"]


def test_mtl_file_is_the_abaw_submission_format(tmp_path: Path, outputs: dict) -> None:
    path = write_mtl(tmp_path / "sub.txt", outputs)
    lines = path.read_text().splitlines()
    assert lines[0] == "image,valence,arousal,expression,aus"
    assert lines[1].startswith("vid1/00001.jpg,") and all(len(ln.split(",")) == 16 for ln in lines[1:])
    assert lines[7].startswith("vid2_left/00005.jpg,")
    labels = read_mtl_file(path)  # the annotation reader accepts it as well
    assert labels["vid1"].valid("va").all() and labels["vid2_left"].valid("expr").tolist() == [1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="no au predictions"):
        write_mtl(tmp_path / "bad.txt", {"v": {"va": np.zeros((2, 2)), "expr": np.zeros(2, np.int64)}})


def test_task_files_use_the_annotation_headers(tmp_path: Path, outputs: dict) -> None:
    only_va = {"vid1": {"va": outputs["vid1"]["va"]}}
    files = write_task_files(tmp_path, only_va)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["VA_Estimation_Challenge/vid1.txt"]
    assert files[0].read_text().splitlines()[0] == "valence,arousal"
    assert read_task_file(files[0], "va").shape == (6, 2)
    with pytest.raises(ValueError, match="no expr predictions"):
        write_task_files(tmp_path, only_va, tasks=("va", "expr"))
    # a video without a face has NaN outputs: written as the invalid markers
    files = write_task_files(tmp_path / "nan", {"v": {k: np.full_like(v, np.nan, dtype=float)
                                                       for k, v in outputs["vid1"].items() if k != "frame"}})
    assert {p.parent.name: p.read_text().splitlines()[1] for p in files} == {
        "VA_Estimation_Challenge": "-5,-5", "EXPR_Recognition_Challenge": "-1",
        "AU_Detection_Challenge": ",".join(["-1"] * 12)}


def test_csv_predictions(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "p.csv", {"v": {"expr": np.array([2, 5]), "frame": np.array([1, 0])}})
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(tables.COLUMNS)
    # frame index 1 is ABAW's 00002.jpg; classes without probabilities leave the p_ columns empty
    assert [(r["frame"], r["expression"], r["p_Anger"], r["valence"], r["AU1"]) for r in rows] == [
        ("2", "2", "", "", ""), ("1", "5", "", "", "")]
    got = read_csv_predictions(path)["v"]
    assert got["expr"].tolist() == [5, 2] and np.isnan(got["va"]).all() and np.isnan(got["au"]).all()
    bad = tmp_path / "bad.csv"
    bad.write_text("video,frame,AU4\nv,1,0.2\nv,2,1.5\n")
    with pytest.raises(AnnotationError, match=r"bad.csv:3: AU4 = 1.5 is not a probability"):
        read_csv_predictions(bad)
    bad.write_text("video,frame,valence\nv,1,0.2\nv,0,0.1\n")
    with pytest.raises(AnnotationError, match=r"bad.csv:3: frame 0: frames are numbered from 1"):
        read_csv_predictions(bad)
    with pytest.raises(ValueError, match="AU probabilities must lie in"):
        write_csv(tmp_path / "c.csv", {"v": {"au": np.full((2, 12), -1.0)}})
    with pytest.raises(ValueError, match="contains a comma"):
        write_csv(tmp_path / "c.csv", {"a,b": {"expr": np.array([1])}})


@pytest.mark.parametrize("layout", ["mtl", "tasks", "csv"])
def test_seven_class_predictions_round_trip(tmp_path: Path, layout: str) -> None:
    outputs = {v: {**out, "expr": out["expr"][:, :7]} for v, out in
               {"a": model_outputs(np.arange(8), seed=3), "b": model_outputs(np.arange(5), seed=4)}.items()}
    target = tmp_path / ("preds" if layout == "tasks" else f"preds.{'csv' if layout == 'csv' else 'txt'}")
    write_predictions(target, outputs, layout)
    back = read_predictions(target)
    for video, out in outputs.items():
        np.testing.assert_array_equal(back[video]["expr"], out["expr"].argmax(1))
    if layout == "tasks":
        path = target / "EXPR_Recognition_Challenge" / "a.txt"
        assert path.read_text().splitlines()[0] == ",".join(EXPRESSIONS[:7])
        # the file is an annotation file too, and the class set may be named for classes
        write_task_files(tmp_path / "named", {"a": {"expr": outputs["a"]["expr"].argmax(1)}}, expressions="basic7")
        head = (tmp_path / "named" / "EXPR_Recognition_Challenge" / "a.txt").read_text().splitlines()[0]
        assert head == ",".join(EXPRESSIONS[:7])
        with pytest.raises(ValueError, match="class 7 is outside the 7 classes"):
            write_task_files(tmp_path / "bad", {"a": {"expr": np.array([1, 7])}}, expressions="basic7")
        with pytest.raises(ValueError, match="7 expression scores per frame for the 8 classes of abaw8"):
            write_task_files(tmp_path / "bad", outputs, expressions="abaw8")
        with pytest.raises(ValueError, match="5 expression scores per frame; the class sets are"):
            write_task_files(tmp_path / "bad", {"a": {"expr": np.zeros((2, 5))}})
        (target / "EXPR_Recognition_Challenge" / "a.txt").rename(target / "a.txt")
        ann = tmp_path / "ann" / "EXPR_Recognition_Challenge" / "Validation_Set"
        ann.mkdir(parents=True)
        (target / "a.txt").rename(ann / "a.txt")
        assert load_annotations(tmp_path / "ann", "val")["a"].expr.tolist() == outputs["a"]["expr"].argmax(1).tolist()


def test_detect_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        detect_layout(tmp_path / "none")
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.csv").write_text("x")
    with pytest.raises(AnnotationError, match="found 2 files"):
        detect_layout(tmp_path)
    (tmp_path / "b.csv").unlink()
    assert detect_layout(tmp_path) == ("mtl", tmp_path / "a.txt")


# ---- evaluate stage ---------------------------------------------------------------------------


def write_annotations(root: Path, labels: dict[str, Labels]) -> None:
    """The labels in the per-task ABAW layout, validation split."""
    for video, lab in labels.items():
        for folder, header, rows in (
            ("VA_Estimation_Challenge", "valence,arousal", [f"{v:g},{a:g}" for v, a in lab.va]),
            ("EXPR_Recognition_Challenge", ",".join(EXPRESSIONS), [str(e) for e in lab.expr]),
            ("AU_Detection_Challenge", ",".join(AUS), [",".join(map(str, r)) for r in lab.au]),
        ):
            path = root / folder / "Validation_Set" / f"{video}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join([header, *rows]) + "\n")


def make_labels(n: int, seed: int) -> Labels:
    rng = np.random.default_rng(seed)
    va = np.round(rng.uniform(-1, 1, (n, 2)), 3)
    va[0] = -5
    expr = rng.integers(0, 8, n)
    expr[1] = -1
    au = (rng.random((n, 12)) < 0.4).astype(np.int64)
    au[2] = -1
    return Labels(va, expr, au)


def run(tmp_path: Path, *overrides: str) -> tuple[int, dict | None]:
    out = tmp_path / "scores.json"
    out.unlink(missing_ok=True)
    cfg = load_config("evaluate", None, [f"annotations={tmp_path / 'ann'}", f"output={out}", *overrides])
    code = evaluate(cfg)
    return code, json.loads(out.read_text()) if out.is_file() else None


def test_evaluate_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    labels = {"a": make_labels(30, 0), "b": make_labels(20, 1)}
    write_annotations(tmp_path / "ann", labels)
    rng = np.random.default_rng(2)
    preds = {}
    for v, lab in labels.items():
        au, n = lab.au.clip(0), len(lab)
        preds[v] = {"va": np.clip(lab.va + rng.normal(0, 0.3, lab.va.shape), -1, 1),
                    "expr": np.where(rng.random(n) < 0.6, lab.expr.clip(0), rng.integers(0, 8, n)),
                    "au": np.where(rng.random(au.shape) < 0.8, au, 1 - au).astype(float)}
    write_task_files(tmp_path / "pred", preds)

    code, result = run(tmp_path, f"predictions={tmp_path / 'pred'}")
    assert code == 0
    s = result["scores"]
    assert result["videos"] == 2 and result["config"]["split"] == "val"
    # independent check of the expression and AU scores with scikit-learn over the pooled frames
    true_e = np.concatenate([lab.expr for lab in labels.values()])
    pred_e = np.concatenate([p["expr"] for p in preds.values()])
    true_au = np.concatenate([lab.au for lab in labels.values()])
    pred_au = np.concatenate([p["au"] for p in preds.values()])
    ok = true_e >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert s["f1_expr"] == pytest.approx(f1_score(true_e[ok], pred_e[ok], average="macro"))
        ok = (true_au >= 0).all(1)
        per_au = [f1_score(true_au[ok, j], pred_au[ok, j]) for j in range(12)]
        assert s["f1_au"] == pytest.approx(np.mean(per_au))
    assert s["p_mtl"] == pytest.approx(s["p_va"] + s["f1_expr"] + s["f1_au"])
    assert s["n_va"] == 48 and s["n_expr"] == 48 and s["n_au"] == 48
    assert "| P_MTL" in capsys.readouterr().out

    # the same predictions as one MTL file score the same
    write_mtl(tmp_path / "mtl" / "sub.txt", preds)
    code, again = run(tmp_path, f"predictions={tmp_path / 'mtl'}")
    assert code == 0 and again["scores"]["p_mtl"] == pytest.approx(s["p_mtl"], abs=1e-5)

    # perfect predictions: the labels themselves
    perfect = {v: {"va": np.where(lab.va == -5, np.nan, lab.va), "expr": lab.expr,
                   "au": np.where(lab.au < 0, np.nan, lab.au)} for v, lab in labels.items()}
    write_csv(tmp_path / "perfect.csv", perfect)
    code, best = run(tmp_path, f"predictions={tmp_path / 'perfect.csv'}")
    assert code == 0 and best["scores"]["p_mtl"] == pytest.approx(3.0)


def test_evaluate_bad_input(tmp_path: Path) -> None:
    labels = {"a": make_labels(10, 0), "b": make_labels(5, 1)}
    write_annotations(tmp_path / "ann", labels)
    a = labels["a"]
    only_a = {"a": {"va": a.va, "expr": a.expr, "au": a.au.clip(0).astype(float)}}
    write_task_files(tmp_path / "pred", only_a)
    # each an input error (one error line, exit 1 on the command line) that names what is wrong
    with pytest.raises(InputError, match="have no prediction, e.g. in b"):
        run(tmp_path, f"predictions={tmp_path / 'pred'}")
    code, result = run(tmp_path, f"predictions={tmp_path / 'pred'}", "allow_missing=true")
    assert code == 0 and result["scores"]["missing_expr"] == 4 and result["scores"]["n_expr"] == 9
    with pytest.raises(InputError, match="set predictions="):
        run(tmp_path, "predictions=")
    with pytest.raises(InputError, match="nowhere"):
        run(tmp_path, f"predictions={tmp_path / 'nowhere'}")
    with pytest.raises(InputError, match="au_thresholds needs 12 numbers"):
        run(tmp_path, f"predictions={tmp_path / 'pred'}", "au_thresholds=[0.5]")
    (tmp_path / "bad.txt").write_text("image,valence\nv/00001.jpg,0.1\n")
    with pytest.raises(InputError, match="bad.txt"):
        run(tmp_path, f"predictions={tmp_path / 'bad.txt'}")
    assert not (tmp_path / "scores.json").exists()
