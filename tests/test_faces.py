"""The face stage on real clips: faces throughout, none, appearing, leaving, two people, broken files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
from test_video import decodable, garble, truncate

from pipeline import faces
from pipeline.config import load_config
from pipeline.faces import config_hash, export_cropped, main, outputs_for
from pipeline.hdf5 import h5_is_done
from pipeline.vision.detect import FaceDetector
from pipeline.vision.track import Detections, choose_track, follow, link, subject_tracks
from pipeline.vision.video import iter_chunks, open_video, shrunk

FAST = ["stride=8", "detect_size=320", "chunk=16", "min_face=40"]


def faces_cfg(videos, out_dir, *extra, annotations=""):
    return load_config("faces", None, [f"data.videos={videos}", f"data.annotations={annotations}",
                                       f"out_dir={out_dir}", *FAST, *extra])


def side_by_side(left: Path, right: Path, dst: Path, n: int = 17) -> Path:
    """A clip of two real people: the first ``n`` frames of ``left`` beside those of ``right``."""
    clips = []
    for src in (left, right):
        with av.open(str(src)) as c:
            frames = (f.to_ndarray(format="rgb24")[:360, :640] for f in c.decode(video=0))
            clips.append([f for _, f in zip(range(n), frames, strict=False)])
    with av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 1280, 360, "yuv420p"
        for a, b in zip(*clips, strict=True):
            both = np.ascontiguousarray(np.concatenate([a, b], axis=1))
            out.mux(stream.encode(av.VideoFrame.from_ndarray(both, format="rgb24")))
        out.mux(stream.encode())
    return dst


@pytest.fixture(scope="module")
def run(pyfeat_clips, tmp_path_factory):
    """One run of the stage over a folder of good and bad videos."""
    root = tmp_path_factory.mktemp("faces")
    videos, ann = root / "videos", root / "annotations" / "VA_Estimation_Challenge" / "Train_Set"
    videos.mkdir()
    ann.mkdir(parents=True)
    for name in ("single_face.mp4", "no_face.mp4", "face_noface.mov", "noface_face.mov"):
        shutil.copy(pyfeat_clips / name, videos / name)
    truncate(pyfeat_clips / "single_face.mp4", videos / "cut.mp4")
    (videos / "notes.mp4").write_text("not a video\n")
    garble(pyfeat_clips / "single_face.mp4", videos / "garbled.mp4", first=60)
    side_by_side(pyfeat_clips / "single_face.mp4", pyfeat_clips / "WolfgangLanger_Pexels.mp4",
                 videos / "two.mp4")
    for side in ("left", "right"):
        (ann / f"two_{side}.txt").write_text("valence,arousal\n" + "0.1,0.2\n" * 17)
    cfg = faces_cfg(videos, root / "out", annotations=root / "annotations")
    status = main(cfg)
    return {"status": status, "out": root / "out", "videos": videos, "cfg": cfg, "root": root}


def read(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in f} | {"attrs": dict(f.attrs)}


@pytest.mark.real_video
def test_bad_files_fail_alone(run):
    assert run["status"] == 1
    failed = [json.loads(line) for line in (run["out"] / "failures.jsonl").read_text().splitlines()]
    assert [Path(r["item"]).name for r in failed] == ["notes.mp4"]
    for r in failed:
        assert Path(r["item"]).name in r["error"]
    chash = config_hash(run["cfg"])
    # cut.mp4 is cut short with its index in front: read up to the cut, not failed whole
    for name in ("single_face", "no_face", "face_noface", "noface_face", "two_left", "two_right", "garbled", "cut"):
        assert h5_is_done(run["out"] / f"{name}.h5", chash), name
    assert not (run["out"] / "two.h5").exists()
    assert not list(run["out"].glob("*.partial"))
    assert (run["out"] / "config.yaml").is_file()


@pytest.mark.real_video
def test_face_throughout(run, pyfeat_clips):
    import decord

    d = read(run["out"] / "single_face.h5")
    vr = decord.VideoReader(str(pyfeat_clips / "single_face.mp4"))
    a = d["attrs"]
    assert (a["n_frames"], a["width"], a["height"], a["stride"]) == (len(vr), 640, 360, 8)
    assert a["fps"] == pytest.approx(vr.get_avg_fps()) and a["subject"] == "main"
    np.testing.assert_array_equal(d["frame"], np.arange(0, len(vr), 8))
    assert np.all(np.diff(d["timestamp"]) > 0)
    assert d["present"].all() and not d["interpolated"].any() and not d["decode_error"].any()
    assert (d["score"] > 0.9).all() and (d["track"] == d["track"][0]).all()
    box, lm = d["box"], d["landmarks"]
    assert (box[:, :2] >= -5).all() and (box[:, 2] <= 645).all() and (box[:, 3] <= 365).all()
    assert ((lm >= box[:, None, :2]) & (lm <= box[:, None, 2:])).all()  # landmarks inside their box
    crops = d["crops_112"]
    assert crops.shape == (len(d["frame"]), 112, 112, 3) and crops.reshape(len(crops), -1).mean(1).min() > 30


@pytest.mark.real_video
def test_no_face_anywhere(run, pyfeat_clips, tmp_path):
    d = read(run["out"] / "no_face.h5")
    assert not d["present"].any() and (d["track"] == -1).all()
    assert np.isnan(d["box"]).all() and np.isnan(d["landmarks"]).all() and not d["crops_112"].any()
    alone = tmp_path / "v"
    alone.mkdir()
    shutil.copy(pyfeat_clips / "no_face.mp4", alone / "no_face.mp4")
    assert main(faces_cfg(alone, tmp_path / "out", "stride=12")) == 0


@pytest.mark.real_video
def test_header_promising_more_frames_than_decode(run):
    d = read(run["out"] / "garbled.h5")
    header, good = decodable(run["videos"] / "garbled.mp4")
    assert d["attrs"]["n_frames"] == header > len(good)
    np.testing.assert_array_equal(d["frame"], np.arange(0, header, 8))
    err = d["decode_error"]
    assert err[d["frame"] >= len(good)].all() and not err[0]
    # frames that did not decode hold no face, no crop and are not bridged over
    assert not d["present"][err].any() and not d["interpolated"][err].any() and (d["track"][err] == -1).all()
    assert not d["crops_112"][err].any() and np.isnan(d["box"][err]).all()
    assert d["present"][~err].all()


@pytest.mark.real_video
@pytest.mark.parametrize("name, first", [("face_noface", True), ("noface_face", False)])
def test_face_appears_or_leaves(run, name, first):
    present = read(run["out"] / f"{name}.h5")["present"]
    # ignore the last kept frame: the clip may end on a frame the face is just entering or leaving
    body = present[:-1]
    assert body[0] == first and body[-1] != first
    assert np.count_nonzero(np.diff(body.astype(int))) == 1, present


@pytest.mark.real_video
def test_two_people_left_and_right(run):
    left, right = read(run["out"] / "two_left.h5"), read(run["out"] / "two_right.h5")
    assert left["attrs"]["subject"] == "left" and right["attrs"]["subject"] == "right"
    assert left["present"].all() and right["present"].all()
    centre = lambda d: (d["box"][:, 0] + d["box"][:, 2]) / 2
    assert (centre(left) < 640).all() and (centre(right) > 640).all()
    assert (left["track"] != right["track"]).all()
    assert np.abs(left["crops_112"].astype(int) - right["crops_112"]).mean() > 20


@pytest.mark.real_video
def test_rerun_skips_finished_and_redoes_changed(run):
    path = run["out"] / "single_face.h5"
    before = path.stat().st_mtime_ns
    assert main(run["cfg"]) == 1  # the broken files still fail
    assert path.stat().st_mtime_ns == before
    changed = faces_cfg(run["videos"], run["out"], "max_gap=2", annotations=run["root"] / "annotations")
    changed.videos = str(run["videos"] / "single_face.mp4")
    assert main(changed) == 0
    assert path.stat().st_mtime_ns != before and h5_is_done(path, config_hash(changed))


@pytest.mark.real_video
def test_new_stage_version_redoes_finished_files(run, monkeypatch):
    path = run["out"] / "no_face.h5"
    cfg = faces_cfg(run["videos"] / "no_face.mp4", run["out"])
    before, old = path.stat().st_mtime_ns, config_hash(cfg)
    assert main(cfg) == 0 and path.stat().st_mtime_ns == before
    monkeypatch.setattr(faces, "VERSION", faces.VERSION + 1)
    assert config_hash(cfg) != old and not h5_is_done(path, config_hash(cfg))
    assert main(cfg) == 0
    assert path.stat().st_mtime_ns != before and h5_is_done(path, config_hash(cfg))


@pytest.mark.real_video
def test_export_then_import_cropped_aligned(run, tmp_path):
    src = run["out"] / "face_noface.h5"
    d = read(src)
    assert export_cropped(src, tmp_path / "cropped_aligned") == d["present"].sum()
    folder = tmp_path / "cropped_aligned" / "face_noface"
    names = sorted(p.name for p in folder.iterdir())
    assert names[0] == "00001.jpg" and names == [f"{k + 1:05d}.jpg" for k in d["frame"][d["present"]]]
    (folder / names[1]).unlink()  # a missing number becomes a frame without a face

    cfg = faces_cfg(run["videos"], tmp_path / "imported", f"import_cropped={tmp_path / 'cropped_aligned'}")
    assert main(cfg) == 0
    got = read(tmp_path / "imported" / "face_noface.h5")
    assert got["attrs"]["n_frames"] == d["attrs"]["n_frames"] and got["attrs"]["fps"] == d["attrs"]["fps"]
    kept = d["frame"][d["present"]]
    expect = np.zeros(d["attrs"]["n_frames"], bool)
    expect[kept] = True
    expect[kept[1]] = False
    np.testing.assert_array_equal(got["present"], expect)
    # JPEG loses a little, not more
    diff = np.abs(got["crops_112"][kept[0]].astype(int) - d["crops_112"][0])
    assert diff.mean() < 4


@pytest.mark.real_video
def test_shards_split_without_overlap(pyfeat_clips, tmp_path):
    videos = tmp_path / "v"
    videos.mkdir()
    for name in ("no_face.mp4", "single_face.mp4"):
        shutil.copy(pyfeat_clips / name, videos / name)
    made = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        assert main(faces_cfg(videos, out, "stride=24", f"shard={i}/2")) == 0
        made.append({p.stem for p in out.glob("*.h5")})
    assert made[0] | made[1] == {"no_face", "single_face"} and not made[0] & made[1]


def test_outputs_follow_annotation_names(tmp_path):
    cfg = faces_cfg(tmp_path, tmp_path / "out")
    annotated = {"a_left", "a_right", "b"}
    assert [(o.name, o.subject) for o in outputs_for(Path("v/a.mp4"), cfg, annotated)] == [
        ("a_left", "left"), ("a_right", "right")]
    assert [(o.name, o.subject) for o in outputs_for(Path("v/b.mp4"), cfg, annotated)] == [("b", "main")]
    named = outputs_for(Path("v/c_right.mp4"), cfg, set())
    assert [(o.name, o.subject) for o in named] == [("c_right", "right")]
    cfg.subject = "left"  # one of two persons, chosen by hand: named as the annotations name that person
    assert [(o.name, o.subject) for o in outputs_for(Path("v/a.mp4"), cfg, annotated)] == [("a_left", "left")]
    assert [(o.name, o.subject) for o in outputs_for(Path("v/c_left.mp4"), cfg, set())] == [("c_left", "left")]
    cfg.subject = "main"
    assert [(o.name, o.subject) for o in outputs_for(Path("v/a.mp4"), cfg, annotated)] == [("a", "main")]


def _face(x: float, size: float = 100.0, score: float = 0.99) -> Detections:
    box = np.array([[x, 50, x + size, 50 + size]], np.float32)
    unit = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]], np.float32)
    return Detections(box, np.array([score], np.float32), (box[:, None, :2] + unit * size).astype(np.float32))


def _frame(*faces: Detections) -> Detections:
    if not faces:
        return Detections.empty()
    keys = ("box", "score", "landmarks")
    return Detections(*(np.concatenate([getattr(f, k) for f in faces]) for k in keys))


def test_gaps_bridged_up_to_max_gap():
    # face moving right; missed for 2 frames, then for 6 frames
    seen = [0, 1, 2, 5, 6, 13, 14]
    dets = [_frame(_face(10 + 4 * t)) if t in seen else _frame() for t in range(15)]
    ids = link(dets, max_lost=10)
    sub = follow(dets, ids, choose_track(dets, ids), max_gap=3)
    np.testing.assert_array_equal(np.flatnonzero(sub.interpolated), [3, 4])
    np.testing.assert_array_equal(np.flatnonzero(sub.present), [0, 1, 2, 3, 4, 5, 6, 13, 14])
    np.testing.assert_allclose(sub.box[3, 0], 10 + 4 * 3, atol=1e-4)
    assert np.isnan(sub.landmarks[8]).all() and sub.track[8] == -1
    # a frame that could not be decoded is not bridged
    usable = np.ones(15, bool)
    usable[4] = False
    assert follow(dets, ids, 0, max_gap=3, usable=usable).present.tolist()[3:6] == [True, False, True]


def test_tracks_and_subject_choice():
    # a large face on the right throughout, a small one on the left for most frames
    big = lambda t: _face(400 - t, size=150)
    dets = [_frame(_face(20 + t, size=60), big(t)) if t < 8 else _frame(big(t)) for t in range(10)]
    ids = link(dets)
    main_id = ids[0][1]
    assert all(i[-1] == main_id for i in ids) and len({int(i[0]) for i in ids[:8]}) == 1
    assert choose_track(dets, ids, "main") == main_id
    assert choose_track(dets, ids, "right") == main_id
    assert choose_track(dets, ids, "left") == ids[0][0]
    assert choose_track([_frame()] * 3, [np.zeros(0, int)] * 3) == -1


def test_subject_who_leaves_and_returns_is_followed_on_both_sides_of_the_absence():
    # one face, gone for 20 frames (longer than a track survives), back as a new track
    dets = [_frame(_face(100 + t)) if not 10 <= t < 30 else _frame() for t in range(40)]
    ids = link(dets, max_lost=5)
    assert len({int(i[0]) for i in ids if len(i)}) == 2
    sub = follow(dets, ids, subject_tracks(dets, ids), max_gap=3)
    assert sub.present.tolist() == [not 10 <= t < 30 for t in range(40)]


def test_left_subject_returning_is_not_confused_with_the_right_one():
    # right face throughout; left face leaves for 20 frames and returns (a new track)
    right = lambda t: _face(400, size=100)
    left = lambda t: _face(50, size=60)
    dets = [_frame(left(t), right(t)) if not 10 <= t < 30 else _frame(right(t)) for t in range(40)]
    ids = link(dets, max_lost=5)
    sub_left = follow(dets, ids, subject_tracks(dets, ids, "left"), max_gap=3)
    sub_right = follow(dets, ids, subject_tracks(dets, ids, "right"), max_gap=3)
    assert sub_left.present.tolist() == [not 10 <= t < 30 for t in range(40)]
    assert (sub_left.box[sub_left.present, 0] < 100).all()
    assert sub_right.present.all() and (sub_right.box[:, 0] > 300).all()


def test_a_lone_false_detection_never_joins_the_subject():
    # a title card: one detection on its lettering (score 0.80), larger than the face; then the face
    # for 20 frames, away for 10 (longer than a track survives) and back, as sure as before, for 10
    face_at = lambda t: 10 <= t < 30 or t >= 40
    dets = [_frame(_face(300, size=200, score=0.80)) if t == 2 else _frame(_face(100 + t)) if face_at(t) else _frame()
            for t in range(50)]
    ids = link(dets, max_lost=5)
    stray, face, back = int(ids[2][0]), int(ids[10][0]), int(ids[40][0])
    assert len({stray, face, back}) == 3
    tracks = subject_tracks(dets, ids)
    assert sorted(tracks) == sorted([face, back]) and stray not in tracks
    sub = follow(dets, ids, tracks, max_gap=3)
    assert sub.present.tolist() == [face_at(t) for t in range(50)]
    # back for two kept frames is still the subject's; for one, not
    assert back in subject_tracks(dets[:42], ids[:42]) and back not in subject_tracks(dets[:41], ids[:41])


def test_a_lone_false_detection_is_not_chosen_over_a_brief_face():
    # the face is small and seen in 3 kept frames; the stray, seen once, is larger than their sum
    dets = [_frame(_face(300, size=400, score=0.80)) if t == 0 else _frame(_face(100, size=60)) if t >= 5
            else _frame() for t in range(8)]
    ids = link(dets)
    assert choose_track(dets, ids) == ids[5][0] and subject_tracks(dets, ids) == [ids[5][0]]
    assert choose_track(dets, ids, min_frames=1, min_score=0.0) == ids[0][0]  # what it was without the rule
    # with no face at all, neither a lone stray nor lettering found at 0.80 for many frames is the subject
    assert choose_track(dets[:5], ids[:5]) == -1 and subject_tracks(dets[:5], ids[:5]) == []
    held = [_frame(_face(300, size=200, score=0.80))] * 10
    assert subject_tracks(held, link(held)) == []
    # a video of one kept frame: a face throughout it is long enough, the score still counts
    assert subject_tracks(dets[5:6], link(dets[5:6])) == [0] and subject_tracks(dets[:1], link(dets[:1])) == []


@pytest.mark.real_video
def test_title_card_before_the_face_is_not_the_subject(pyfeat_clips):
    # at the detector's default size, MTCNN takes the lettering of noface_face.mov's title for a face
    # in frame 87 alone; the real face enters at frame 96
    cfg = load_config("faces")
    _, info = open_video(pyfeat_clips / "noface_face.mov")
    full, index = (info.height, info.width), np.arange(86, 98)
    frames = next(iter_chunks(None, info, len(index), frames=index, size=shrunk(full, cfg.detect_size))).frames
    dets = FaceDetector.from_config(cfg)(frames, full=full)
    assert [len(d) for d in dets[:10]] == [0, 1] + [0] * 8 and dets[1].score[0] < cfg.track.min_score
    ids = link(dets, cfg.track.max_lost, cfg.track.min_iou, cfg.track.max_landmark)
    tracks = subject_tracks(dets, ids, "main", cfg.track.min_frames, cfg.track.min_score)
    assert follow(dets, ids, tracks, cfg.max_gap).present.tolist() == (index >= 96).tolist()


def test_crop_sizes_are_the_extractors_own():
    # vit_tiny reads 224; ConvNeXt-B resizes to 256 for timm's centre crop of 224; the expression
    # network's 64 and the IResNet's 112 are read from the 112-pixel crops
    assert faces.crop_sizes([112], ["fer_xception", "iresnet50", "vit_tiny", "convnext_base"]) == [112, 224, 256]
    assert faces.crop_sizes([112, 224], ["vit_tiny"]) == [112, 224]
    assert faces.crop_sizes([112], []) == [112]
    with pytest.raises(faces.InputError, match="nope"):
        faces.crop_sizes([112], ["nope"])
    with pytest.raises(faces.InputError, match="sizes"):
        faces.crop_sizes([], [])


@pytest.mark.real_video
def test_an_extractors_crop_size_is_added_from_the_stored_landmarks(run, tmp_path, monkeypatch):
    """Faces found once for 112-pixel crops are given the 224-pixel crops a ViT reads without
    detecting again, equal to those of a run that wrote both sizes at once; the file is then done."""
    video, ann = run["videos"] / "two.mp4", run["root"] / "annotations"
    assert main(faces_cfg(video, tmp_path / "both", "sizes=[112,224]", annotations=ann)) == 0
    assert main(faces_cfg(video, tmp_path / "later", annotations=ann)) == 0
    before = {side: read(tmp_path / "later" / f"two_{side}.h5") for side in ("left", "right")}
    assert "crops_224" not in before["left"]

    def no_detection(*args, **kwargs):
        raise AssertionError("the faces were detected again")

    monkeypatch.setattr(FaceDetector, "from_config", no_detection)
    cfg = faces_cfg(video, tmp_path / "later", "extractors=[vit_tiny]", annotations=ann)
    assert main(cfg) == 0
    for side in ("left", "right"):
        both, later = read(tmp_path / "both" / f"two_{side}.h5"), read(tmp_path / "later" / f"two_{side}.h5")
        assert sorted(later) == sorted(both)
        for key in both.keys() - {"attrs"}:
            np.testing.assert_array_equal(later[key], both[key], err_msg=key)
            if key in before[side]:
                np.testing.assert_array_equal(later[key], before[side][key], err_msg=key)
        assert later["attrs"]["config_hash"] == both["attrs"]["config_hash"] == before[side]["attrs"]["config_hash"]
        assert json.loads(later["attrs"]["config"])["sizes"] == [112, 224]
        assert h5_is_done(tmp_path / "later" / f"two_{side}.h5", config_hash(cfg))
    mtime = (tmp_path / "later" / "two_left.h5").stat().st_mtime_ns
    assert main(cfg) == 0 and (tmp_path / "later" / "two_left.h5").stat().st_mtime_ns == mtime
