"""Bad inputs, one case each: a clear error naming the file and the problem, the other inputs' work
kept, and an exit status that says something failed. Damaged videos are made from real clips."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import h5py
import numpy as np
import pytest

from pipeline import features
from pipeline.bench.features import make_face_files
from pipeline.config import ConfigError, load_config
from pipeline.data import SequenceDataset, feature_paths
from pipeline.feature_cache import FeatureCache
from pipeline.labels import Labels
from tests.faults import ROOT, cut, encode, first_frames, remux, scramble
from tests.synthetic import write_cache

FACES_FAST = ["stride=8", "detect_size=320", "chunk=16", "min_face=40", "data.annotations="]
VFR_PTS = np.cumsum([0] + [1, 3, 1, 2] * 5)[:20] * 10  # in 1/250 s: gaps of 40, 120, 40 and 80 ms


# ---- videos through the face stage ---------------------------------------------------------------

@pytest.fixture(scope="module")
def matrix(pyfeat_clips, tmp_path_factory):
    """One face-stage run over a list naming a good clip and every kind of bad video."""
    from pipeline.faces import main

    root = tmp_path_factory.mktemp("bad_videos")
    v = root / "videos"
    v.mkdir()
    src = pyfeat_clips / "single_face.mp4"
    shutil.copy(src, v / "good.mp4")
    shutil.copy(pyfeat_clips / "no_face.mp4", v / "no_face.mp4")
    (v / "empty.mp4").write_bytes(b"")
    (v / "notes.mp4").write_text("not a video\n")
    cut(remux(src, root / "index_end.mp4", index_first=False), v / "cut_index_end.mp4", 0.6)
    cut(remux(src, root / "index_front.mp4", index_first=True), v / "cut_index_front.mp4", 0.5)
    scramble(src, v / "scrambled.mp4")
    frames = first_frames(src, 20)
    encode(frames[:1], v / "one_frame.mp4")
    encode(frames, v / "vfr.mp4", pts=VFR_PTS, time_base=Fraction(1, 250))
    listed = root / "videos.txt"
    names = sorted(p.name for p in v.iterdir()) + ["missing.mp4"]
    listed.write_text("".join(f"videos/{n}\n" for n in names))
    out = root / "faces"
    status = main(load_config("faces", None, [*FACES_FAST, f"data.videos={listed}", f"out_dir={out}"]))
    failed = {Path(r["item"]).name: r["error"] for r in map(json.loads, (out / "failures.jsonl").open())}
    return {"status": status, "out": out, "failed": failed, "videos": v}


def faces_of(matrix, name: str) -> dict:
    with h5py.File(matrix["out"] / f"{name}.h5", "r") as f:
        assert f.attrs["complete"]
        return {k: f[k][:] for k in f} | dict(f.attrs)


@pytest.mark.real_video
@pytest.mark.parametrize("name, reason", [
    ("missing.mp4", "no such file"),
    ("empty.mp4", "cannot be read as a video"),
    ("notes.mp4", "cannot be read as a video"),
    ("cut_index_end.mp4", "cannot be read as a video"),
])
def test_unreadable_video_fails_alone_naming_itself(matrix, name, reason):
    assert matrix["status"] == 1
    error = matrix["failed"][name]
    assert name in error and reason in error
    assert not (matrix["out"] / f"{Path(name).stem}.h5").exists()
    assert not list(matrix["out"].glob(".*partial"))


@pytest.mark.real_video
def test_good_video_is_kept_beside_the_bad_ones(matrix, pyfeat_clips):
    good = faces_of(matrix, "good")
    assert len(good["frame"]) == 9 and good["present"].all()
    assert sorted(matrix["failed"]) == sorted(["missing.mp4", "empty.mp4", "notes.mp4", "cut_index_end.mp4"])


@pytest.mark.real_video
def test_corrupted_middle_loses_only_the_frames_that_do_not_decode(matrix):
    d = faces_of(matrix, "scrambled")
    good = faces_of(matrix, "good")
    err = d["decode_error"]
    assert err.any() and not err[0], err  # the damage is flagged, the start before it is kept
    assert not d["present"][err].any() and not d["crops_112"][err].any()
    ok = ~err
    np.testing.assert_array_equal(d["present"][ok], good["present"][ok])
    assert np.abs(d["box"][ok & d["present"]] - good["box"][ok & d["present"]]).max() < 2.0


def decoded_before_the_cut(path: Path) -> int:
    """How many frames PyAV decodes of ``path`` before its stream breaks."""
    n = 0
    with av.open(str(path)) as c, contextlib.suppress(av.error.FFmpegError):
        for _ in c.decode(video=0):
            n += 1
    return n


@pytest.mark.real_video
def test_cut_short_with_index_in_front_loses_only_the_frames_past_the_cut(matrix, tmp_path, caplog):
    """decord refuses the file; the frames before the cut are read with PyAV, the rest flagged."""
    from pipeline.faces import main

    video = matrix["videos"] / "cut_index_front.mp4"
    held = decoded_before_the_cut(video)
    assert 0 < held < 72
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        status = main(load_config("faces", None, [*FACES_FAST, f"data.videos={video}", f"out_dir={tmp_path}"]))
    assert status == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(video) in m and f"{72 - held} of its 72 frames are lost" in m for m in warned), warned
    with h5py.File(tmp_path / "cut_index_front.h5", "r") as f:
        assert f.attrs["complete"] and f.attrs["n_frames"] == 72
        d = {k: f[k][:] for k in f}
    good = faces_of(matrix, "good")
    np.testing.assert_array_equal(d["frame"], good["frame"])
    err = d["decode_error"]
    np.testing.assert_array_equal(err, d["frame"] >= held)  # all that decodes is kept, only that
    assert err.any() and not d["present"][err].any() and not d["crops_112"][err].any()
    ok = ~err
    assert d["present"][ok].all()
    np.testing.assert_allclose(d["timestamp"][ok], good["timestamp"][ok], atol=1e-6)
    assert np.all(np.diff(d["timestamp"]) > 0)
    # PyAV scales and converts as decord does: measured 0 difference in boxes and crops
    assert np.abs(d["box"][ok] - good["box"][ok]).max() < 0.5
    assert np.abs(d["crops_112"][ok].astype(int) - good["crops_112"][ok]).mean() < 0.5


@pytest.mark.real_video
def test_video_without_a_face_is_done_with_no_face(matrix):
    d = faces_of(matrix, "no_face")
    assert len(d["frame"]) > 0 and not d["present"].any() and (d["track"] == -1).all()


@pytest.mark.real_video
def test_one_frame_video(matrix):
    d = faces_of(matrix, "one_frame")
    assert d["frame"].tolist() == [0] and d["n_frames"] == 1 and d["present"].all()


@pytest.mark.real_video
def test_variable_frame_rate_keeps_each_frames_own_time(matrix):
    d = faces_of(matrix, "vfr")
    with av.open(str(matrix["videos"] / "vfr.mp4")) as c:
        times = np.array([float(f.time) for f in c.decode(video=0)])
    assert len(times) == 20 and d["n_frames"] == 20
    np.testing.assert_allclose(d["timestamp"], times[d["frame"]], atol=1e-3)
    assert len(set(np.round(np.diff(times), 3))) > 1  # the clip really is of variable rate


@pytest.mark.slow
@pytest.mark.real_video
def test_4k_video_memory_does_not_grow_with_its_length(pyfeat_clips, tmp_path):
    """Peak memory of the face stage over 4K clips of 8, 24 and 48 frames, decoded 4 at a time.

    Measured in four runs on a quiet machine: 981-1005, 1030 and 1055-1079 MB, so the 48-frame
    peak was 51-75 MB (2-3 frames of 23.7 MB) above the smaller of the others. The peak of one
    clip has varied by up to 242 MB (ten frames, 1058-1300 MB) from run to run with the timing of
    decord's decoding when the machine was busy. The limit, 16 frames (379 MB), sits 137 MB above
    that spread; memory that grew with the length would add 24 frames, 569 MB, from 24 to 48."""
    frame = first_frames(pyfeat_clips / "single_face.mp4", 1)[0]
    big = np.kron(frame, np.ones((6, 6, 1), np.uint8))  # 2160 x 3840
    # the child's own peak: ru_maxrss would carry over the forked test runner's resident memory
    code = ("import sys\nfrom pathlib import Path\nfrom pipeline.config import load_config\n"
            "from pipeline.faces import main\nfrom pipeline.cli import command_line_process\n"
            "command_line_process('faces')\nPath('/proc/self/clear_refs').write_text('5')\n"
            "status = main(load_config('faces', None, sys.argv[1:]))\n"
            "lines = Path('/proc/self/status').read_text().splitlines()\n"
            "print('peak', next(ln.split()[1] for ln in lines if ln.startswith('VmHWM')), status)\n")
    peaks = {}
    for n in (8, 24, 48):
        video = encode((np.roll(big, 8 * k, axis=1) for k in range(n)), tmp_path / f"k{n}.mp4")
        args = [*FACES_FAST, "stride=1", "chunk=4", "batch_size=4", f"data.videos={video}",
                f"out_dir={tmp_path / 'out'}"]
        done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                              env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        _, kib, status = done.stdout.split()[-3:]
        assert status == "0", done.stderr[-2000:]
        peaks[n] = int(kib) / 1024
        with h5py.File(tmp_path / "out" / f"k{n}.h5", "r") as f:
            assert f.attrs["width"] == 3840 and f["present"][:].all()
    frame_mb = big.nbytes / 2**20
    grown = peaks[48] - min(peaks[8], peaks[24])
    assert grown < 16 * frame_mb, f"peak MB by length: {peaks}; one frame is {frame_mb:.0f} MB"
    assert max(peaks.values()) < 1500, peaks


# ---- labels and windows --------------------------------------------------------------------------

def labels_of(n: int) -> Labels:
    return Labels(np.full((n, 2), 0.5, np.float32), np.ones(n, np.int64), np.ones((n, 12), np.int64))


@pytest.mark.parametrize("rows, warning", [(30, "the last 10 frames have no label"),
                                           (55, "15 rows are past the video's end")])
def test_label_rows_not_matching_the_frames_warn_naming_the_video(tmp_path, caplog, rows, warning):
    feats = np.random.default_rng(0).normal(size=(40, 4))
    cache = FeatureCache([write_cache(tmp_path / "c.h5", {"vid7": (feats, np.ones(40, bool))})])
    with caplog.at_level(logging.WARNING):
        ds = SequenceDataset(cache, {"vid7": labels_of(rows)}, ["vid7"], length=40, stride=40)
    assert any("vid7" in r.getMessage() and warning in r.getMessage() for r in caplog.records), caplog.text
    expr = ds[0]["expr"].numpy()
    assert (expr[: min(rows, 40)] == 1).all() and (expr[rows:] == -1).all()


def test_video_shorter_than_the_window_gives_one_padded_window(tmp_path):
    cache = FeatureCache([write_cache(tmp_path / "c.h5", {"one": (np.ones((1, 4)), np.ones(1, bool))})])
    ds = SequenceDataset(cache, {"one": labels_of(1)}, ["one"], length=24, stride=8)
    assert len(ds) == 1
    item = ds[0]
    assert item["x"].shape == (24, 4) and item["mask"].sum() == 1 and item["steps"] == 1
    assert item["expr"].tolist() == [1] + [-1] * 23


# ---- feature caches ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused_naming_file_video_and_frame(tmp_path, bad):
    feats = np.zeros((10, 4))
    feats[6, 2] = bad
    present = np.ones(10, bool)
    path = write_cache(tmp_path / "c.h5", {"good": (np.zeros((10, 4)), present), "broken": (feats, present)})
    cache = FeatureCache([path])
    assert cache.read("good")[0].shape == (10, 4)
    with pytest.raises(ValueError, match=r"c\.h5: video 'broken' has non-finite features .* row 6, frame 6"):
        cache.read("broken")
    absent = present.copy()
    absent[6] = False  # a frame without a face is never read as a feature
    path = write_cache(tmp_path / "d.h5", {"broken": (feats, absent)})
    assert FeatureCache([path]).read("broken")[1].sum() == 9


def test_cache_of_another_extractor_is_refused(tmp_path):
    write_cache(tmp_path / "runs" / "d" / "features" / "iresnet50.h5", {"v": (np.zeros((3, 4)), np.ones(3, bool))})
    (tmp_path / "runs" / "d" / "features" / "iresnet50.h5").rename(tmp_path / "runs" / "d" / "features" / "onet.h5")
    with pytest.raises(ValueError, match="onet.h5: written by extractor 'iresnet50', not 'onet'"):
        feature_paths(tmp_path / "runs", "d", ["onet"])
    assert feature_paths(tmp_path / "runs", "d", ["mae_vit_base"])[0].name == "mae_vit_base.h5"  # not made yet


def test_cache_made_with_another_config_is_recomputed(tmp_path, caplog):
    faces = tmp_path / "faces"
    make_face_files(faces, videos=2, frames=8, absent=0.0, sizes=[112])
    args = ["extractor=onet", f"faces_dir={faces}", f"out_dir={tmp_path / 'out'}"]
    assert features.main(load_config("features", None, args)) == 0
    with caplog.at_level(logging.INFO):
        assert features.main(load_config("features", None, [*args, "dtype=float32"])) == 0
    assert sum("stale: made with config" in r.getMessage() for r in caplog.records) == 2
    with h5py.File(tmp_path / "out" / "onet" / "synthetic_00.h5", "r") as f:
        assert f["features"].dtype == np.float32


# ---- output folders and configs ------------------------------------------------------------------

@pytest.fixture
def read_only(tmp_path):
    """A read-only folder, one that even root cannot write: a tmpfs mounted ``ro``."""
    folder = tmp_path / "ro"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        folder.chmod(0o555)  # enough for a user other than root
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


def test_read_only_output_folder_stops_features_with_a_clear_message(read_only, tmp_path, caplog):
    make_face_files(tmp_path / "faces", videos=1, frames=4, absent=0.0, sizes=[112])
    cfg = load_config("features", None, ["extractor=onet", f"faces_dir={tmp_path / 'faces'}",
                                         f"out_dir={read_only / 'features'}"])
    assert features.main(cfg) == 2
    said = caplog.messages[-1]
    assert said.startswith("features: stopped: ")
    assert f"{read_only / 'features'}: cannot write to the output folder" in said
    assert "Read-only" in said or "Permission denied" in said


@pytest.mark.real_video
def test_read_only_output_folder_stops_faces_with_a_clear_message(read_only, pyfeat_clips, caplog):
    from pipeline.faces import main

    cfg = load_config("faces", None, [*FACES_FAST, f"data.videos={pyfeat_clips / 'no_face.mp4'}",
                                      f"out_dir={read_only / 'faces'}"])
    assert main(cfg) == 2
    assert "faces: stopped: " in caplog.text
    assert f"{read_only / 'faces'}: cannot write to the output folder" in caplog.text
    assert "Read-only" in caplog.text or "Permission denied" in caplog.text


def test_misspelled_key_in_a_config_file_is_refused_naming_file_and_key(tmp_path):
    path = tmp_path / "my_features.yaml"
    path.write_text("extractor: onet\nbatchsize: 8\n")
    with pytest.raises(ConfigError, match=r"my_features\.yaml: unknown config key 'batchsize'; did you mean batch_s"):
        load_config("features", path)
    path.write_text("extractor: onet\nbatch_size: 8\n")
    assert load_config("features", path).batch_size == 8
    nested = tmp_path / "my_faces.yaml"
    nested.write_text("track:\n  max_lsot: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'track.max_lsot'; did you mean track.max_lost"):
        load_config("faces", nested)


def test_misspelled_key_on_the_command_line_exits_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline.features", "batchsize=8"], cwd=ROOT,
                          capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert done.stderr.strip() == "error: unknown config key 'batchsize'; did you mean batch_size?"
