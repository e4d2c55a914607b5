"""The per-frame table: detections beside decisions and probabilities, frames from 1, OpenFace's
layout, and the same rows as a data frame."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import tables
from pipeline.labels import AUS, EXPRESSIONS
from pipeline.writers import read_csv_predictions, write_csv


def face_track(n: int = 6) -> dict[str, np.ndarray]:
    present = np.array([True, True, False, True, True, False][:n])
    box = np.arange(n * 4, dtype=np.float32).reshape(n, 4) + 100
    return {"frame": np.arange(0, 2 * n, 2), "timestamp": np.arange(n) * 0.08, "present": present,
            "score": np.linspace(0.9, 0.99, n).astype(np.float32), "box": box,
            "landmarks": np.arange(n * 10, dtype=np.float32).reshape(n, 5, 2)}


def outputs(frames: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(frames), 8))
    return {"frame": frames, "va": rng.uniform(-1, 1, (len(frames), 2)),
            "expr": np.exp(logits) / np.exp(logits).sum(1, keepdims=True), "au": rng.random((len(frames), 12))}


def test_rows_carry_the_detection_and_number_frames_from_one(tmp_path: Path) -> None:
    face = face_track()
    preds = outputs(face["frame"])
    thresholds = np.full(12, 0.3)
    path = write_csv(tmp_path / "p.csv", {"clip": preds}, thresholds, {"clip": face})
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(tables.COLUMNS) and len(rows) == 6
    assert [int(r["frame"]) for r in rows] == [1, 3, 5, 7, 9, 11]  # frame index + 1, as 00001.jpg
    assert [int(r["face_present"]) for r in rows] == face["present"].astype(int).tolist()
    for r, present, box, lms, score in zip(rows, face["present"], face["box"], face["landmarks"], face["score"],
                                           strict=True):
        got_box = [r[c] for c in tables.BOX]
        if present:
            assert [float(v) for v in got_box] == pytest.approx(box.tolist())
            assert [float(r[c]) for c in tables.LANDMARKS] == pytest.approx(lms.reshape(-1).tolist())
            assert float(r["confidence"]) == pytest.approx(score, abs=1e-6)
        else:
            assert got_box == ["", "", "", ""] and r["confidence"] == "" and r["lm1_x"] == ""
    expr = np.array([[float(r[f"p_{c}"]) for c in EXPRESSIONS] for r in rows])
    assert expr == pytest.approx(preds["expr"], abs=1e-5)
    assert [int(r["expression"]) for r in rows] == preds["expr"].argmax(1).tolist()
    decisions = np.array([[int(r[a]) for a in AUS] for r in rows])
    assert (decisions == (preds["au"] >= 0.3)).all(), "decisions at the model's thresholds"
    assert np.array([[float(r[f"p_{a}"]) for a in AUS] for r in rows]) == pytest.approx(preds["au"], abs=1e-5)

    back = read_csv_predictions(path)["clip"]  # evaluate reads the table: probabilities, 0-based indices
    assert np.flatnonzero(~np.isnan(back["va"][:, 0])).tolist() == face["frame"].tolist()
    assert back["au"][face["frame"]] == pytest.approx(preds["au"], abs=1e-5)


def test_openface_layout_names_the_shared_columns(tmp_path: Path) -> None:
    face = face_track()
    preds = outputs(face["frame"])
    path = write_csv(tmp_path / "of.csv", {"clip": preds}, None, {"clip": face}, format="openface")
    lines = path.read_text().splitlines()
    header = lines[0].split(", ")
    assert header[:5] == ["frame", "face_id", "timestamp", "confidence", "success"]
    assert header[5:] == ["AU01_c", "AU02_c", "AU04_c", "AU06_c", "AU07_c", "AU10_c", "AU12_c", "AU15_c", "AU23_c",
                          "AU25_c", "AU26_c"], "OpenFace 2 detects every ABAW AU but AU24"
    frame = pd.read_csv(path, skipinitialspace=True)
    assert frame["frame"].tolist() == [1, 3, 5, 7, 9, 11] and (frame["face_id"] == 0).all()
    assert frame["success"].tolist() == face["present"].astype(int).tolist()
    assert frame.loc[~face["present"], "confidence"].eq(0).all()
    assert frame["AU12_c"].tolist() == (preds["au"][:, AUS.index("AU12")] >= 0.5).astype(int).tolist()
    with pytest.raises(ValueError, match="one video per file"):
        write_csv(tmp_path / "two.csv", {"a": preds, "b": preds}, None, {"a": face, "b": face}, format="openface")


def test_the_data_frame_holds_the_rows_of_the_csv(tmp_path: Path) -> None:
    face = face_track()
    preds = outputs(face["frame"])
    table = tables.frame_table("clip", preds, face)
    frame = pd.DataFrame(dict(table))
    assert list(frame.columns) == list(tables.COLUMNS) and len(frame) == 6
    written = pd.read_csv(tables.write_table(tmp_path / "t.csv", [table]))
    pd.testing.assert_frame_equal(written, frame, check_dtype=False, atol=1e-5)


def test_probabilities_that_are_not_are_refused() -> None:
    face = face_track()
    preds = outputs(face["frame"])
    with pytest.raises(ValueError, match="clip: expression scores must be probabilities"):
        tables.frame_table("clip", {**preds, "expr": preds["expr"] * 3 - 1}, face)
    with pytest.raises(ValueError, match="clip: predicted frames that the face track does not have"):
        tables.frame_table("clip", {**preds, "frame": preds["frame"] + 1}, face)
