"""One thin run through every stage on a reduced built-in sample, then prediction on a real clip."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import evaluate, faces, features, predict, sample, train
from pipeline.config import Config, load_config


def stage(name: str, *overrides: str) -> Config:
    return load_config(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    data, runs = root / "data", root / "runs"
    data_keys = [f"data.videos={data / 'videos'}", f"data.annotations={data / 'annotations'}"]
    assert sample.main(stage("sample", f"out={data}", "n_videos=4", "n_frames=90", "val_videos=1")) == 0
    assert faces.main(stage("faces", *data_keys, f"out_dir={runs / 'sample' / 'faces'}")) == 0
    assert features.main(stage("features", f"faces_dir={runs / 'sample' / 'faces'}",
                               f"out_dir={runs / 'sample' / 'features'}")) == 0
    out = runs / "sample" / "train" / "gru"
    assert train.main(stage("train", *data_keys, f"runs_dir={runs}", f"out_dir={out}", "epochs=4",
                            "encoder.hidden=32", "window=32", "stride=16")) == 0
    return {"data": data, "runs": runs, "train": out, "keys": data_keys}


def test_every_stage_wrote_its_outputs(pipeline_run: dict[str, Path]) -> None:
    data, runs = pipeline_run["data"], pipeline_run["runs"]
    videos = sorted(p.stem for p in (data / "videos").glob("*.mp4"))
    assert len(videos) == 4
    for video in videos:
        usable = np.load(data / "truth" / f"{video}.npz")["face_ok"].astype(bool)
        with h5py.File(runs / "sample" / "faces" / f"{video}.h5", "r") as f:
            assert f.attrs["complete"] and f["crops_112"].shape[1:] == (112, 112, 3)
            found = f["present"][:]
        # the generator knows where the face is fully in view: the stage must find it there
        assert found[usable].mean() > 0.95, f"{video}: face found in {found[usable].mean():.0%} of usable frames"
    with h5py.File(runs / "sample" / "features" / "onet.h5", "r") as f:
        assert sorted(f) == videos
        assert f[videos[0]]["features"].shape[1] == 256
    scores = json.loads((pipeline_run["train"] / "scores.json").read_text())
    for key in ("ccc_v", "ccc_a", "f1_expr", "f1_au", "p_mtl"):
        assert np.isfinite(scores[key]), key
    assert scores["p_mtl"] == pytest.approx((scores["ccc_v"] + scores["ccc_a"]) / 2 + scores["f1_expr"]
                                            + scores["f1_au"])
    for name in ("best.pt", "config.yaml", "curves.png", "metrics.jsonl"):
        assert (pipeline_run["train"] / name).is_file()


def test_evaluate_rescores_the_written_predictions(pipeline_run: dict[str, Path]) -> None:
    out = pipeline_run["train"] / "evaluate.json"
    cfg = stage("evaluate", f"predictions={pipeline_run['train'] / 'predictions'}",
                f"annotations={pipeline_run['data'] / 'annotations'}", f"output={out}")
    assert evaluate.main(cfg) == 0
    rescored = json.loads(out.read_text())["scores"]
    scores = json.loads((pipeline_run["train"] / "scores.json").read_text())
    assert rescored["f1_expr"] == pytest.approx(scores["f1_expr"])
    assert rescored["f1_au"] == pytest.approx(scores["f1_au"])
    assert rescored["ccc_v"] == pytest.approx(scores["ccc_v"], abs=1e-3)


def test_rerunning_the_stages_skips_finished_work(pipeline_run: dict[str, Path], caplog) -> None:
    runs = pipeline_run["runs"]
    stamp = {p: p.stat().st_mtime_ns for p in (runs / "sample").rglob("*.h5")}
    caplog.set_level(logging.INFO, logger="pipeline")
    assert faces.main(stage("faces", *pipeline_run["keys"], f"out_dir={runs / 'sample' / 'faces'}")) == 0
    assert features.main(stage("features", f"faces_dir={runs / 'sample' / 'faces'}",
                               f"out_dir={runs / 'sample' / 'features'}")) == 0
    unchanged = [p for p, t in stamp.items() if p.stat().st_mtime_ns == t and p.name != "onet.h5"]
    assert len(unchanged) == len(stamp) - 1, "finished face or feature files were rewritten"
    assert "0 done, 4 already done" in caplog.text


def test_predict_on_a_real_clip(pipeline_run: dict[str, Path], pyfeat_clips: Path, tmp_path: Path) -> None:
    clip = pyfeat_clips / "single_face.mp4"
    cfg = stage("predict", f"video={clip}", f"checkpoint={pipeline_run['train'] / 'best.pt'}", f"out_dir={tmp_path}")
    assert predict.main(cfg) == 0
    with open(tmp_path / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    with h5py.File(tmp_path / "faces" / "single_face.h5", "r") as f:
        n, found, present, frames = len(f["frame"]), int(f["present"][:].sum()), f["present"][:], f["frame"][:]
    assert len(rows) == n and found > 0.9 * n
    assert [int(r["frame"]) for r in rows] == (frames + 1).tolist(), "frames numbered from 1, as 00001.jpg"
    assert [r["face_present"] == "1" for r in rows] == present.tolist()
    assert all((r["confidence"] != "") == bool(p) for r, p in zip(rows, present, strict=True))
    valence = np.array([float(r["valence"]) for r in rows])
    assert np.isfinite(valence).all() and (np.abs(valence) <= 1).all()
    assert (tmp_path / "timeline.png").stat().st_size > 10_000
    assert (tmp_path / "abaw" / "mtl.txt").read_text().startswith("image,valence,arousal,expression,aus")
