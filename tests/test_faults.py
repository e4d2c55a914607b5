"""Faults a long run meets on a shared machine: a second run on the same folder, a full disk, and
SIGKILL at chosen and random points of each stage of the faces -> features -> train chain."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import import_module
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline import checkpoint, features, train
from pipeline.bench.features import make_face_files
from pipeline.config import load_config
from pipeline.feature_cache import FeatureCache
from pipeline.labels import Labels
from pipeline.runs import RunLocked, stage_lock
from tests.faults import ROOT, fault_seed, finish, kill_after, stage
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


def refused(name: str, args: list[str], out: Path, caplog: pytest.LogCaptureFixture,
            command_line: bool = False) -> None:
    """Stage ``name`` on ``out`` while another process holds it, by its ``main`` and, with
    ``command_line``, by ``python -m pipeline.<name>``: exit status 2, the message naming the folder
    and the holder, nothing written."""
    args = [*args, f"out_dir={out}"]
    holder = hold_lock(out)
    try:
        said = f"{out}: another run is writing here (pid {holder.pid} on {socket.gethostname()}"
        with caplog.at_level(logging.ERROR):
            assert import_module(f"pipeline.{name}").main(load_config(name, None, args)) == 2
        assert said in caplog.text
        if command_line:
            proc = stage(name, *args)
            printed = "".join(proc.communicate(timeout=120))
            assert proc.returncode == 2, printed[-2000:]
            assert said in printed
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_features_stage_refuses_a_folder_another_run_holds(tmp_path, caplog):
    make_face_files(tmp_path / "faces", videos=2, frames=6, absent=0.0, sizes=[112])
    refused("features", [*FEATURES_FAST, f"faces_dir={tmp_path / 'faces'}"], tmp_path / "out", caplog)


@pytest.mark.real_video
def test_faces_stage_refuses_a_folder_another_run_holds(pyfeat_clips, tmp_path, caplog):
    refused("faces", [*FACES_FAST, f"data.videos={pyfeat_clips / 'no_face.mp4'}"], tmp_path / "out", caplog)


def test_train_stage_refuses_a_folder_another_run_holds(tmp_path, caplog):
    """Also from the command line, whose exit status every stage takes from ``run_stage``."""
    syn = learnable_set(tmp_path / "syn", videos=6, frames=24)
    refused("train", [*TRAIN_FAST, "extractors=[syn]", "epochs=1", "data.name=syn",
                      f"data.annotations={syn['annotations']}", f"runs_dir={syn['runs']}"], tmp_path / "out", caplog,
            command_line=True)


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
        try:
            with h5py.File(path, "r") as f:
                complete = bool(f.attrs.get("complete", False))
        except OSError as e:
            raise AssertionError(f"{path} does not open: {e}") from None
        assert complete, f"{path} is not marked complete"
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


# ---- SIGKILL at chosen and random points -----------------------------------------------------------

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


def timed(proc: subprocess.Popen, marker: Path) -> float:
    """Seconds from the moment ``marker`` appears (the stage's own work begins) to the end."""
    start, began = time.monotonic(), None
    while proc.poll() is None:
        if began is None and marker.exists():
            began = time.monotonic() - start
        time.sleep(0.005)
    finish(proc)
    return time.monotonic() - start - (began or 0.0)


def finished(parts: Path) -> dict[str, tuple[int, int]]:
    """The finished outputs in ``parts`` (an unfinished one is named ``.<name>.<pid>~<host>.partial``),
    each with its inode and modification time."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts.glob("*.h5")}


def consistent(folder: Path) -> None:
    """What a killed run leaves in ``folder``: every output not named .partial opens and is
    complete, a cache of links points only at such outputs, every checkpoint loads."""
    complete_files(folder)
    for cache in folder.glob("*.h5"):
        with h5py.File(cache, "r") as f:
            links = [f.get(v, getlink=True) for v in f]
        targets = [link.filename for link in links if isinstance(link, h5py.ExternalLink)]
        assert all(t.endswith(".h5") and (folder / t).is_file() for t in targets), targets
    for ckpt in folder.glob("*.pt"):
        assert checkpoint.read(ckpt).model.state_dict, ckpt
    metrics = folder / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            json.loads(line)


def epochs_done(folder: Path) -> int:
    path = folder / "metrics.jsonl"  # rewritten whole after last.pt each epoch: its lines are the epochs saved
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_point(point: str, folder: Path, parts: Path, marker: Path, work: float, videos: int,
               rng: np.random.Generator) -> tuple[Callable[[], bool], float]:
    """When to SIGKILL a faces or features run writing ``parts`` under ``folder``: the condition,
    and the delay after it (random ones drawn from ``rng`` within the ``work`` seconds after
    ``marker`` appears)."""
    done = len(finished(parts))
    if point == "while writing":  # at once: under its temporary name, or (written too fast to see) just renamed
        return (lambda: any(parts.glob(".*.h5.*.partial")) or len(finished(parts)) > done), 0.0
    if point == "after an output finished":
        return (lambda: len(finished(parts)) > done), 0.0
    if point == "while linking":  # or, having missed that moment, with every part done
        return (lambda: any(folder.glob(".onet.h5.*.partial")) or len(finished(parts)) == videos), 0.0
    return marker.exists, float(rng.uniform(0.0, 0.9)) * work


def ended_writer_leftover(path: Path) -> Path:
    """Rename the finished ``path`` to the temporary name of a writer of this host that has ended:
    a run killed after the last byte of its output but before the rename."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    return path.rename(path.with_name(f".{path.name}.{gone.pid}~{socket.gethostname()}.partial"))


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


EPOCHS = 12


@pytest.mark.slow
@pytest.mark.real_video
def test_chain_killed_at_random_points_ends_as_an_uninterrupted_one(pyfeat_clips, tmp_path):
    """Faces and features are each SIGKILLed twice at random moments, while writing an output,
    just after an output is finished and (features) while linking its cache, then left an output
    renamed to the temporary name of an ended writer; training is killed twice inside random
    epochs. The moments come from ``fault_seed()``. After every kill the outputs open and are
    complete; no finished output is ever written again; each stage's re-run clears the leftovers,
    training resumes from ``last.pt``, and every face and feature file is byte-identical to an
    uninterrupted chain's, the best epoch, weights and scores the same."""
    videos = tmp_path / "videos"
    videos.mkdir()
    names = ("single_face.mp4", "face_noface.mov", "WolfgangLanger_Pexels.mp4")
    for name in names:
        shutil.copy(pyfeat_clips / name, videos / name)
    annotations = chain_labels(tmp_path / "annotations", videos)

    def chain(runs: Path) -> list[tuple[str, tuple[str, ...], Path]]:
        data = runs / "chain"
        return [
            ("faces", (*FACES_FAST, f"data.videos={videos}", f"out_dir={data / 'faces'}"), data / "faces"),
            ("features", (*FEATURES_FAST, f"faces_dir={data / 'faces'}", f"out_dir={data / 'features'}"),
             data / "features"),
            ("train", (*TRAIN_FAST, f"epochs={EPOCHS}", "data.name=chain", f"data.annotations={annotations}",
                       f"runs_dir={runs}", f"out_dir={data / 'train'}"), data / "train"),
        ]

    marker = {"faces": "config.yaml", "features": "onet.yaml", "train": "config.yaml"}
    work = {name: timed(stage(name, *args), folder / marker[name])
            for name, args, folder in chain(tmp_path / "reference")}
    seed = fault_seed()
    replay = f"(replay: FAULT_SEED={seed})"
    rng = np.random.default_rng(seed)
    for name, args, folder in chain(tmp_path / "killed"):
        if name == "train":  # at a random moment inside a random epoch, before the last ones
            history = (tmp_path / "reference" / "chain" / "train" / "metrics.jsonl").read_text().splitlines()
            seconds = float(np.median([json.loads(line)["seconds"] for line in history]))
            landed, unfinished = 0, 0
            for epoch in sorted(rng.choice(np.arange(1, EPOCHS - 2), 2, replace=False)):
                inside = float(rng.uniform(0, 1)) * seconds
                if kill_after(stage(name, *args), lambda e=epoch, f=folder: epochs_done(f) >= e, inside):
                    landed += 1
                    consistent(folder)
                    unfinished += checkpoint.read(folder / "last.pt").resume.epoch < EPOCHS - 1
            assert landed >= 1, f"train: no run was killed before it ended {replay}"
            assert unfinished, f"train: no run was killed before its last epoch {replay}"
            err = finish(stage(name, *args))
            assert "resuming from" in err, f"{err[-2000:]} {replay}"
            continue
        parts = folder / "onet" if name == "features" else folder
        # "while writing" first: it lands whatever the load, so that a random moment drawn late (the
        # reference run timed under heavier load than this one) cannot leave nothing to kill
        points = ["while writing", "at random", "after an output finished", "at random",
                  *(["while linking"] if name == "features" else [])]
        landed, carried = 0, 0
        for point in points:
            before = finished(parts)
            ready, delay = kill_point(point, folder, parts, folder / marker[name], work[name], len(names), rng)
            if kill_after(stage(name, *args), ready, delay):
                landed += 1
                consistent(folder)
            after = finished(parts)
            assert {k: after.get(k) for k in before} == before, f"{name}: a finished output was written again {replay}"
            carried += len(before)
        assert landed >= 1, f"{name}: no run was killed before it ended {replay}"
        assert carried, f"{name}: no finished output was there to keep across a kill {replay}"

        planted = sorted(finished(parts))[-1]
        leftover = ended_writer_leftover(parts / planted)
        before = finished(parts)
        finish(stage(name, *args))
        consistent(folder)
        after = finished(parts)
        assert {k: after.get(k) for k in before} == before, f"{name}: a finished output was written again {replay}"
        assert planted in after and not leftover.exists(), f"{name}: {leftover.name} was taken as done or left {replay}"
        assert not list(folder.rglob("*.partial")), f"{name}: the re-run left temporary files behind {replay}"

    ref, got = tmp_path / "reference" / "chain", tmp_path / "killed" / "chain"
    for sub in ("faces", "features/onet"):
        expected, found = snapshot(ref / sub), snapshot(got / sub)
        assert sorted(found) == sorted(expected) and expected, sub
        for name in expected:
            assert found[name]["data"] == expected[name]["data"], f"{sub}/{name} differs {replay}"
            same = lambda attrs: {k: v for k, v in attrs.items() if k != "config"}  # config names out_dir
            assert same(found[name]["attrs"]) == same(expected[name]["attrs"]), f"{sub}/{name} {replay}"
    linked = [FeatureCache([run / "features" / "onet.h5"]).videos for run in (ref, got)]
    assert linked[1] == linked[0], f"the cache links {linked[1]}, not {linked[0]} {replay}"
    a, b = checkpoint.read(ref / "train" / "best.pt"), checkpoint.read(got / "train" / "best.pt")
    assert a.resume.epoch == b.resume.epoch, replay
    for key, value in a.model.state_dict.items():
        torch.testing.assert_close(b.model.state_dict[key], value, rtol=1e-5, atol=1e-6, msg=f"{key} {replay}")
    scores = [json.loads((run / "train" / "scores.json").read_text())["p_mtl"] for run in (ref, got)]
    assert scores[1] == pytest.approx(scores[0], abs=1e-5), replay
