"""The built-in sample: ABAW layout, determinism, labels that follow the generator and the pixels."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.face_rig import build_rig, render
from pipeline.sample import (
    AUS,
    CHANNELS,
    EXPRESSIONS,
    MAX_OCCLUDED,
    MIN_VISIBLE,
    main,
)

HEADERS = {
    "VA_Estimation_Challenge": "valence,arousal",
    "EXPR_Recognition_Challenge": "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other",
    "AU_Detection_Challenge": "AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26",
}
SMALL = ["n_videos=4", "n_frames=60", "size=128", "val_videos=2", "events_per_video=5",
         "occlusion=0.5", "leave_frame=0.5"]


def small_config(out: Path, *extra: str):
    return load_config("sample", None, [f"out={out}", *SMALL, *extra])


def decode(path: Path) -> np.ndarray:
    """All frames (n, h, w, 3) uint8 RGB, decoded with PyAV."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def annotation(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=1)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sample") / "data"
    assert main(small_config(out)) == 0
    return out


def videos_of(root: Path) -> dict[str, list[str]]:
    folder = root / "annotations" / "EXPR_Recognition_Challenge"
    return {split: sorted(p.stem for p in (folder / split).glob("*.txt")) for split in ("Train_Set", "Validation_Set")}


def test_layout_and_headers_follow_abaw(sample: Path):
    splits = videos_of(sample)
    assert splits == {"Train_Set": ["sample_00", "sample_01"], "Validation_Set": ["sample_02", "sample_03"]}
    assert (sample / "sample.yaml").is_file() and (sample / "manifest.json").is_file()
    assert not list(sample.parent.glob("*.partial"))
    for split, videos in splits.items():
        for video in videos:
            frames = decode(sample / "videos" / f"{video}.mp4")
            assert frames.shape == (60, 128, 128, 3)
            for task, header in HEADERS.items():
                lines = (sample / "annotations" / task / split / f"{video}.txt").read_text().splitlines()
                assert lines[0] == header
                assert len(lines) == 61
            va = annotation(sample / "annotations" / "VA_Estimation_Challenge" / split / f"{video}.txt")
            assert va.shape == (60, 2)
            valid = (va > -5).all(1)
            assert ((va == -5).all(1) | valid).all() and (np.abs(va[valid]) <= 1).all()
            expr = annotation(sample / "annotations" / "EXPR_Recognition_Challenge" / split / f"{video}.txt")
            assert set(np.unique(expr)) <= set(range(-1, 8))
            au = annotation(sample / "annotations" / "AU_Detection_Challenge" / split / f"{video}.txt")
            assert au.shape == (60, 12) and set(np.unique(au)) <= {-1, 0, 1}
            assert ((au == -1).all(1) | (au >= 0).all(1)).all()


def test_every_split_holds_every_expression_and_au(sample: Path):
    for split, videos in videos_of(sample).items():
        expr = np.concatenate([annotation(sample / "annotations" / "EXPR_Recognition_Challenge" / split / f"{v}.txt")
                               for v in videos])
        au = np.concatenate([annotation(sample / "annotations" / "AU_Detection_Challenge" / split / f"{v}.txt")
                             for v in videos])
        assert set(np.unique(expr[expr >= 0]).astype(int)) == set(range(len(EXPRESSIONS))), split
        assert ((au == 1).sum(0) > 0).all(), f"{split}: no positive frame for {np.array(AUS)[(au == 1).sum(0) == 0]}"


def test_invalid_frames_are_exactly_the_flagged_ones(sample: Path):
    kinds = {"out": 0, "covered": 0}
    for split, videos in videos_of(sample).items():
        for video in videos:
            truth = np.load(sample / "truth" / f"{video}.npz")
            face_ok = truth["face_ok"]
            assert np.array_equal(face_ok, (truth["face_visible"] >= MIN_VISIBLE)
                                  & (truth["occluded"] <= MAX_OCCLUDED))
            kinds["out"] += int((truth["face_visible"] < MIN_VISIBLE).sum())
            kinds["covered"] += int((truth["occluded"] > MAX_OCCLUDED).sum())
            folder = sample / "annotations"
            va = annotation(folder / "VA_Estimation_Challenge" / split / f"{video}.txt")
            expr = annotation(folder / "EXPR_Recognition_Challenge" / split / f"{video}.txt")
            au = annotation(folder / "AU_Detection_Challenge" / split / f"{video}.txt")
            assert np.array_equal((va == -5).all(1), ~face_ok | truth["unlabelled_va"])
            assert np.array_equal(expr == -1, ~face_ok | truth["unlabelled_expr"])
            assert np.array_equal((au == -1).all(1), ~face_ok | truth["unlabelled_au"])
            # Where labelled, the files hold the generator's own labels.
            ok = expr >= 0
            assert np.array_equal(expr[ok], truth["expr"][ok])
            ok = (au >= 0).all(1)
            assert np.array_equal(au[ok], truth["au"][ok])
            ok = (va > -5).all(1)
            np.testing.assert_allclose(va[ok], truth["va"][ok], atol=1e-4)
    assert kinds["out"] > 0 and kinds["covered"] > 0, kinds


def test_truth_landmarks_match_a_face_detector(sample: Path):
    from facenet_pytorch import MTCNN

    truth = np.load(sample / "truth" / "sample_00.npz")
    frames = decode(sample / "videos" / "sample_00.mp4")
    detector = MTCNN(keep_all=False, device="cpu")
    checked = 0
    for i in np.flatnonzero(truth["face_ok"] & (truth["occluded"] == 0))[::15][:3]:
        _, _, points = detector.detect(frames[i], landmarks=True)
        assert points is not None, f"no face found in frame {i}"
        found = np.asarray(points[0].tolist(), dtype=np.float32)  # object arrays under numpy 2
        err = np.linalg.norm(found - truth["landmarks"][i], axis=-1)
        assert err.max() < 0.04 * 128, (i, err)
        checked += 1
    assert checked >= 2


def test_same_seed_same_sample_other_seed_differs(sample: Path, tmp_path: Path):
    again = tmp_path / "again"
    assert main(small_config(again)) == 0
    for txt in sorted((sample / "annotations").rglob("*.txt")):
        assert txt.read_bytes() == (again / txt.relative_to(sample)).read_bytes(), txt
    for video in ("sample_00", "sample_03"):
        assert np.array_equal(decode(sample / "videos" / f"{video}.mp4"), decode(again / "videos" / f"{video}.mp4"))

    other = tmp_path / "other"
    assert main(small_config(other, "seed=1", "n_videos=3", "val_videos=1", "n_frames=70")) == 0
    a = (sample / "annotations" / "AU_Detection_Challenge" / "Train_Set" / "sample_00.txt").read_text()
    b = (other / "annotations" / "AU_Detection_Challenge" / "Train_Set" / "sample_00.txt").read_text()
    assert a != b

    # Other settings replace an earlier sample in place, leaving no temporary folder behind.
    first = json.loads((other / "manifest.json").read_text())["config_hash"]
    assert main(small_config(other, "seed=2", "n_videos=3", "val_videos=1", "n_frames=70")) == 0
    assert json.loads((other / "manifest.json").read_text())["config_hash"] != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]


def test_rerun_skips_finished_output_and_refuses_foreign_folder(sample: Path, tmp_path: Path):
    manifest = sample / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert main(small_config(sample, "batch=8")) == 0  # batch does not change the output
    assert manifest.stat().st_mtime_ns == before

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not a sample")
    assert main(small_config(foreign)) == 1
    assert (foreign / "keep.txt").read_text() == "not a sample"


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="val_list"):
        main(load_config("sample", None, ["val_list=[nope]", "out=/nonexistent/x"]))
    with pytest.raises(ConfigError, match="n_frames"):
        main(load_config("sample", None, ["n_frames=20", "out=/nonexistent/x"]))


def region_change(name: str) -> tuple[float, float, float]:
    """Mean absolute pixel change one channel at full intensity makes in brows, eyes and mouth."""
    rig = build_rig(1.0)
    intensity = np.zeros((2, len(CHANNELS)), np.float32)
    intensity[1, CHANNELS.index(name)] = 1
    rgb, _ = render(rig, intensity, np.tile([0.0, 0.0, 0.0, 1.0], (2, 1)), 256)
    diff = (rgb[1] - rgb[0]).abs().mean(0)
    # Regions in output px of the face at rest (photo px -> (p - view corner) * 1.28).
    brows, eyes, mouth = diff[68:100, 80:190], diff[100:120, 80:190], diff[140:180, 90:160]
    return brows.mean().item(), eyes.mean().item(), mouth.mean().item()


@pytest.mark.parametrize("name, where", [("AU1", 0), ("AU2", 0), ("AU4", 0), ("AU7", 1), ("AU10", 2),
                                         ("AU12", 2), ("AU15", 2), ("AU23", 2), ("AU24", 2), ("AU26", 2)])
def test_each_action_unit_moves_its_own_region(name: str, where: int):
    change = region_change(name)
    assert change[where] > 0.02, change
    assert change[where] == max(change), change


def test_open_mouth_is_darker_than_closed(sample: Path):
    darker = []
    for video in ("sample_00", "sample_01", "sample_02", "sample_03"):
        truth = np.load(sample / "truth" / f"{video}.npz")
        frames = decode(sample / "videos" / f"{video}.mp4").astype(np.float32) / 255
        ok = truth["face_ok"] & (truth["occluded"] == 0)
        jaw = truth["intensity"][:, [CHANNELS.index("AU25"), CHANNELS.index("AU26")]].max(1)
        for i in np.flatnonzero(ok):
            left, right = truth["landmarks"][i, 3], truth["landmarks"][i, 4]
            cx, cy = (left + right) / 2
            half = 0.25 * np.linalg.norm(right - left)
            x0, y0 = int(cx - half), int(cy + 0.5 * half)
            patch = frames[i, y0:y0 + int(half), x0:x0 + int(2 * half)].mean()
            darker.append((jaw[i], patch))
    jaw, brightness = np.array(darker).T
    assert (jaw > 0.7).sum() >= 3 and (jaw == 0).sum() >= 10
    assert brightness[jaw > 0.7].mean() < brightness[jaw == 0].mean() - 0.1
