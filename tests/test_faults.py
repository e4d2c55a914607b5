"""Faults a long run meets on a shared machine: a second run on the same folder, a full disk, and
SIGKILL at random points of each stage of the faces -> features -> train chain (tests/test_faces.py,
tests/test_feature_kill.py and tests/test_train.py kill each stage once at a chosen point)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline import features, train
from pipeline.bench.features import make_face_files
from pipeline.config import load_config
from pipeline.labels import Labels
from pipeline.runs import RunLocked, stage_lock
from tests.faults import ROOT, finish, kill_after, stage
from tests.synthetic import learnable_set, write_annotations

FACES_FAST = ["stride=8", "detect_size=320", "chunk=16", "min_face=40", "data.annotations="]
FEATURES_FAST = ["extractor=onet", "batch_size=4"]
TRAIN_FAST = ["encoder.hidden=16", "encoder.layers=1", "window=8", "stride=4", "eval_stride=4", "batch_size=4",
              "lr=0.005", "patience=0", "extractors=[onet]", "deterministic=true", "data.format=abaw_tasks"]


# ---- two runs, one folder ------------------------------------------------------------------------

def hold_lock(folder: Path, shard: str = "") -> subprocess.Popen:
    """Another process holding ``folder``'s lock until it is killed."""
    code = ("import sys, time\nfrom pipeline.runs import stage_lock\n"
            "with stage_lock(sys.argv[1], sys.argv[2] or None):\n    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), shard], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_on_a_folder_is_refused_naming_the_holder_until_it_dies(tmp_path):
    holder = hold_lock(tmp_path / "out")
    try:
        with pytest.raises(RunLocked) as refused, stage_lock(tmp_path / "out"):
            pass
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and str(tmp_path / "out") in message
    finally:
        holder.kill()
        holder.wait()
    with stage_lock(tmp_path / "out") as lock:  # SIGKILL released it; the stale file does not block
        assert f"pid {os.getpid()}" in lock.read_text()


def test_shards_of_one_run_lock_apart(tmp_path):
    holder = hold_lock(tmp_path, "0/2")
    try:
        with stage_lock(tmp_path, "1/2"):  # the other shard works beside it
            with pytest.raises(RunLocked), stage_lock(tmp_path, "0/2"):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_features_stage_refuses_a_folder_another_run_holds(tmp_path):
    make_face_files(tmp_path / "faces", videos=2, frames=6, absent=0.0, sizes=[112])
    out = tmp_path / "features"
    holder = hold_lock(out)
    try:
        cfg = load_config("features", None, [*FEATURES_FAST, f"faces_dir={tmp_path / 'faces'}", f"out_dir={out}"])
        assert features.main(cfg) == 2
    finally:
        holder.kill()
        holder.wait()
    assert not list(out.rglob("*.h5"))


@pytest.mark.real_video
def test_faces_stage_refuses_a_folder_another_run_holds(pyfeat_clips, tmp_path):
    from pipeline.faces import main

    out = tmp_path / "faces"
    holder = hold_lock(out)
    try:
        cfg = load_config("faces", None, [*FACES_FAST, f"data.videos={pyfeat_clips / 'no_face.mp4'}", f"out_dir={out}"])
        status = main(cfg)
    finally:
        holder.kill()
        holder.wait()
    assert status != 0 and not list(out.glob("*.h5"))


def test_train_stage_refuses_a_folder_another_run_holds(tmp_path):
    syn = learnable_set(tmp_path / "syn", videos=6, frames=24)
    out = tmp_path / "train"
    holder = hold_lock(out)
    try:
        cfg = load_config("train", None, [*TRAIN_FAST, "extractors=[syn]", "epochs=1", f"runs_dir={syn['runs']}",
                                          f"out_dir={out}"])
        cfg.data.update(name="syn", annotations=str(syn["annotations"]))
        try:
            status = train.main(cfg)
        except (RunLocked, SystemExit) as e:
            status = e
    finally:
        holder.kill()
        holder.wait()
    assert status != 0 and not (out / "last.pt").exists()


def test_rerun_of_a_finished_training_run_succeeds(tmp_path):
    """A run killed after its last epoch, while scoring, is re-run from a last.pt at the final epoch."""
    syn = learnable_set(tmp_path / "syn", videos=6, frames=24)
    cfg = load_config("train", None, [*TRAIN_FAST, "extractors=[syn]", "epochs=2", f"runs_dir={syn['runs']}",
                                      f"out_dir={tmp_path / 'train'}"])
    cfg.data.update(name="syn", annotations=str(syn["annotations"]))
    assert train.main(cfg) == 0
    first = (tmp_path / "train" / "scores.json").read_text()
    status = train.main(cfg)
    assert status == 0 and (tmp_path / "train" / "scores.json").read_text() == first


# ---- a full disk ----------------------------------------------------------------------------------

def complete_files(folder: Path) -> list[str]:
    """Names of the HDF5 files under ``folder``; each must open and be marked complete."""
    names = []
    for path in sorted(folder.rglob("*.h5")):
        with h5py.File(path, "r") as f:
            assert bool(f.attrs.get("complete", False)), path
        names.append(str(path.relative_to(folder)))
    return names


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # HDF5 closing on a full disk
def test_features_on_a_full_disk_stop_cleanly_and_resume(small_disk, tmp_path):
    faces = tmp_path / "faces"
    make_face_files(faces, videos=4, frames=120, absent=0.1, sizes=[112], seed=1)
    reference = tmp_path / "reference"
    args = [*FEATURES_FAST, f"faces_dir={faces}"]
    assert features.main(load_config("features", None, [*args, f"out_dir={reference}"])) == 0

    out = small_disk(96)  # room for the config and about one part of ~62 KiB
    status = features.main(load_config("features", None, [*args, f"out_dir={out}"]))
    assert status == 1
    kept = [p for p in complete_files(out) if p.startswith("onet/")]
    assert len(kept) < 4 and not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp"))
    before = {p: (out / p).stat().st_mtime_ns for p in kept}  # the cache of links is rebuilt each run

    small_disk(4096, again=True)
    assert features.main(load_config("features", None, [*args, f"out_dir={out}"])) == 0
    assert all((out / p).stat().st_mtime_ns == t for p, t in before.items()), "finished parts were redone"
    for part in sorted((reference / "onet").glob("*.h5")):
        with h5py.File(part, "r") as a, h5py.File(out / "onet" / part.name, "r") as b:
            assert a["features"][:].tobytes() == b["features"][:].tobytes(), part.name


@pytest.mark.real_video
def test_faces_on_a_full_disk_fail_the_video_not_the_run(small_disk, pyfeat_clips, tmp_path):
    # In a child process: HDF5 that cannot close a file on a full disk crashed the interpreter at exit
    # (status 139) after the failure was reported; a crash here must not take the test runner down.
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("no_face.mp4", "single_face.mp4"):  # sorted: the small output comes first
        shutil.copy(pyfeat_clips / name, videos / name)
    out = small_disk(160)  # no_face.h5 is ~11 KiB, single_face.h5 ~290 KiB
    cmd = [sys.executable, "-m", "pipeline.faces", *FACES_FAST, f"data.videos={videos}", f"out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert complete_files(out) == ["no_face.h5"]
    assert not list(out.glob(".*partial")) and not list(out.glob("*.tmp"))
    failures = (out / "failures.jsonl").read_text()
    assert "single_face" in failures and "No space left" in failures
    assert done.returncode == 1, f"exit status {done.returncode}: {done.stderr[-500:]}"

    small_disk(4096, again=True)
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True).returncode == 0
    assert complete_files(out) == ["no_face.h5", "single_face.h5"]


# ---- SIGKILL at random points --------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, dict]:
    """Every complete HDF5 file under ``folder``: its datasets' bytes and its attributes."""
    out = {}
    for name in complete_files(folder):
        with h5py.File(folder / name, "r") as f:
            data = {}
            f.visititems(lambda k, v, data=data: data.__setitem__(k, v[()].tobytes())
                         if isinstance(v, h5py.Dataset) else None)
            attrs = {k: str(v) for k, v in f.attrs.items()}
            out[name] = {"data": data, "attrs": attrs}
    return out


def timed(proc: subprocess.Popen, marker: Path) -> tuple[float, float]:
    """Seconds from start until ``marker`` appears (the stage's own work begins) and until the end."""
    start, began = time.monotonic(), None
    while proc.poll() is None:
        if began is None and marker.exists():
            began = time.monotonic() - start
        time.sleep(0.005)
    finish(proc)
    return (began if began is not None else 0.0), time.monotonic() - start


def kill_at_random(args: tuple[str, ...], name: str, marker: Path, span: tuple[float, float],
                   rng: np.random.Generator, times: int, check: Path) -> int:
    """Start ``pipeline.<name>`` ``times`` times and SIGKILL each at a random moment of its work
    (``span`` as measured by ``timed``); after each kill every output under ``check`` must open.
    Returns how many runs were killed before they ended."""
    kills = 0
    for _ in range(times):
        proc = stage(name, *args)
        delay = float(rng.uniform(0.0, 0.9)) * max(span[1] - span[0], 0.1)
        if kill_after(proc, marker.exists, delay):
            kills += 1
            complete_files(check)
    return kills


def epochs_done(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def chain_labels(root: Path, videos: Path) -> Path:
    """ABAW per-task annotations with random valid labels, one row per frame of each video."""
    import av

    rng = np.random.default_rng(0)
    split = {"single_face": "train", "face_noface": "train", "WolfgangLanger_Pexels": "val"}
    for video, part in split.items():
        with av.open(str(next(videos.glob(f"{video}.*")))) as c:
            n = c.streams.video[0].frames
        lab = Labels(rng.uniform(-1, 1, (n, 2)).astype(np.float32), rng.integers(0, 8, n),
                     rng.integers(0, 2, (n, 12)))
        write_annotations(root, part, {video: lab})
    return root


@pytest.mark.slow
@pytest.mark.real_video
def test_chain_killed_at_random_points_ends_as_an_uninterrupted_one(pyfeat_clips, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("single_face.mp4", "face_noface.mov", "WolfgangLanger_Pexels.mp4"):
        shutil.copy(pyfeat_clips / name, videos / name)
    annotations = chain_labels(tmp_path / "annotations", videos)

    def chain(runs: Path) -> list[tuple[str, tuple[str, ...], Path]]:
        data = runs / "chain"
        return [
            ("faces", (*FACES_FAST, f"data.videos={videos}", f"out_dir={data / 'faces'}"), data / "faces"),
            ("features", (*FEATURES_FAST, f"faces_dir={data / 'faces'}", f"out_dir={data / 'features'}"),
             data / "features"),
            ("train", (*TRAIN_FAST, "epochs=12", "data.name=chain", f"data.annotations={annotations}",
                       f"runs_dir={runs}", f"out_dir={data / 'train'}"), data / "train"),
        ]

    marker = {"faces": "config.yaml", "features": "onet.yaml", "train": "config.yaml"}
    spans = {name: timed(stage(name, *args), folder / marker[name])
             for name, args, folder in chain(tmp_path / "reference")}
    seed = int(time.time())
    rng = np.random.default_rng(seed)
    for name, args, folder in chain(tmp_path / "killed"):
        if name == "train":  # within an epoch, at a random one: resuming must repeat it exactly
            kills = 0
            for _ in range(2):
                k = epochs_done(folder) + int(rng.integers(1, 4))
                kills += kill_after(stage(name, *args), lambda k=k, f=folder: epochs_done(f) >= k,
                                    float(rng.uniform(0, 0.2)))
        else:
            kills = kill_at_random(args, name, folder / marker[name], spans[name], rng, 2, folder)
            # and at the worst moment: an output fully written but still under its temporary name
            kills += kill_after(stage(name, *args), lambda f=folder: any(f.rglob(".*.partial")), 0.0)
        assert kills >= 1, f"{name}: no run was killed before it ended (seed {seed})"
        had_checkpoint = (folder / "last.pt").exists()
        err = finish(stage(name, *args))
        if name == "train" and had_checkpoint:
            assert "resuming from" in err, err[-2000:]

    ref, got = tmp_path / "reference" / "chain", tmp_path / "killed" / "chain"
    # the re-runs cleared away what the killed runs left half-written
    assert not list((got / "faces").rglob("*.partial")) and not list((got / "features").rglob("*.partial"))
    for sub in ("faces", "features/onet"):
        expected, found = snapshot(ref / sub), snapshot(got / sub)
        assert sorted(found) == sorted(expected) and expected, sub
        for name in expected:
            assert found[name]["data"] == expected[name]["data"], f"{sub}/{name} differs (seed {seed})"
            same = lambda attrs: {k: v for k, v in attrs.items() if k != "config"}  # config names out_dir
            assert same(found[name]["attrs"]) == same(expected[name]["attrs"]), f"{sub}/{name}"
    a = torch.load(ref / "train" / "best.pt", weights_only=True)
    b = torch.load(got / "train" / "best.pt", weights_only=True)
    assert a["epoch"] == b["epoch"]
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-5, atol=1e-6)
