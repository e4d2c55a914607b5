"""A features run SIGKILLed part-way and resumed ends byte-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.bench.features import make_face_files
from pipeline.config import load_config
from pipeline.feature_cache import FeatureCache
from pipeline.features import main

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = 6
ARGS = ["extractor=onet", "batch_size=2"]  # small batches: many points at which to be killed


def start(faces: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pipeline.features", f"faces_dir={faces}", f"out_dir={out}", *ARGS]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]


def done_parts(parts: Path) -> list[Path]:
    return sorted(parts.glob("*.h5"))  # an unfinished part is named .<video>.h5.<pid>~<host>.partial


def partials(out: Path) -> list[Path]:
    return sorted(out.rglob("*.partial"))


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay: float) -> bool:
    """SIGKILL ``proc`` ``delay`` s after ``ready()``; False if it had already exited by then."""
    while not ready():
        if proc.poll() is not None:
            return False
        time.sleep(2e-4)  # leave the shared CPU to the run being watched
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return True


def assert_outputs_open(out: Path) -> None:
    """Every file not named .partial is a complete HDF5 file; the cache links only such parts."""
    for path in out.rglob("*.h5"):
        with h5py.File(path, "r") as f:
            assert bool(f.attrs.get("complete", False)), path
    cache = out / "onet.h5"
    if cache.exists():
        with h5py.File(cache, "r") as f:
            targets = [f.get(v, getlink=True).filename for v in f]
        assert all(t.endswith(".h5") and (out / t).is_file() for t in targets), targets


def read_all(out: Path) -> dict[str, tuple[bytes, bytes, bytes]]:
    cache = FeatureCache([out / "onet.h5"])
    arrays = {}
    for video in cache.videos:
        with h5py.File(out / "onet" / f"{video}.h5", "r") as f:  # the bytes as stored (float16)
            arrays[video] = tuple(f[k][:].tobytes() for k in ("features", "present", "frame"))
    return arrays


@pytest.mark.slow
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    faces = tmp_path / "faces"
    make_face_files(faces, videos=VIDEOS, frames=40, absent=0.2, sizes=[112], seed=3)
    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses, so that the arithmetic is the same
    try:
        assert main(load_config("features", None, [*ARGS, f"faces_dir={faces}", f"out_dir={reference}"])) == 0
    finally:
        torch.set_num_threads(threads)

    seed = int(time.time())
    rng = np.random.default_rng(seed)
    out, parts = tmp_path / "resumed", tmp_path / "resumed" / "onet"

    def linking() -> bool:
        return any(out.glob(".onet.h5.*.partial")) or len(done_parts(parts)) == VIDEOS

    kills = 0
    for moment in ("writing a part", "extracting", "linking"):
        base, delay = len(done_parts(parts)), 0.0
        if moment == "writing a part":  # at once, so the part is still under its temporary name
            ready = lambda: any(parts.glob(".*.partial")) or len(done_parts(parts)) >= 2
        elif moment == "extracting" and base < VIDEOS - 1:
            k = min(base + 1 + int(rng.integers(0, 2)), VIDEOS - 1)
            ready, delay = (lambda k=k: len(done_parts(parts)) >= k), float(rng.uniform(0, 0.005))
        else:
            ready = linking
        proc = start(faces, out)
        if kill_when(proc, ready, delay):
            kills += 1
            assert_outputs_open(out)
        else:
            finish(proc)
    assert kills == 3, f"only {kills} runs were killed before they finished (seed {seed})"

    # the worst leftover: a part killed after its last byte but before the rename into place
    planted = done_parts(parts)[-1]
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process of this host that has ended: its temporary files are litter
    leftover = planted.rename(parts / f".{planted.name}.{gone.pid}~{socket.gethostname()}.partial")
    left = partials(out)
    before = {p.name: p.stat().st_mtime_ns for p in done_parts(parts)}
    finish(start(faces, out))
    assert_outputs_open(out)
    after = {p.name: p.stat().st_mtime_ns for p in done_parts(parts)}
    assert all(after[name] == t for name, t in before.items()), "finished videos were recomputed"
    assert sorted(after) == sorted(p.name for p in done_parts(reference / "onet"))
    assert planted.name in after  # recomputed, not renamed into place
    assert leftover in left and not partials(out)  # and what killed runs left behind was cleared away

    expected, got = read_all(reference), read_all(out)
    assert sorted(got) == sorted(expected) and len(got) == VIDEOS
    for video in expected:
        assert got[video] == expected[video], f"{video} differs after kill and resume (seed {seed})"
