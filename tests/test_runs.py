"""``h5_writer``: files as plain h5py writes them, and a full disk that fails the file, not the process."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import atomic, hdf5
from pipeline.hdf5 import h5_is_done, h5_writer
from tests.faults import ROOT, kill_after


def crops(n: int, seed: int = 0) -> np.ndarray:
    """(n, 112, 112, 3) uint8 that gzip cannot shrink, so that every frame costs ~37 KiB on disk."""
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), np.uint8)


def fill(f: h5py.File, frames: np.ndarray) -> None:
    """Write as the faces stage does: one gzip chunk per frame, a frame at a time, then the marker."""
    f.create_dataset("crops_112", frames.shape, np.uint8, chunks=(1, 112, 112, 3), compression="gzip",
                     compression_opts=4)
    f["frame"] = np.arange(len(frames), dtype=np.int64)
    f["present"] = np.ones(len(frames), bool)
    for i, frame in enumerate(frames):
        f["crops_112"][i] = frame  # a new dataset object each time: its close flushes the chunk cache
    f["present"][1] = False
    f.attrs["config_hash"] = "abc"
    f.attrs["complete"] = True


def contents(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        data = {k: (v.dtype.str, v.shape, v[()].tobytes()) for k, v in f.items()}
        return {"data": data, "attrs": {k: str(v) for k, v in f.attrs.items()},
                "chunks": f["crops_112"].chunks, "compression": f["crops_112"].compression}


def open_files() -> int:
    return h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)


def test_h5_writer_files_read_back_as_plain_h5py_writes_them(tmp_path):
    frames = crops(12)
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        fill(f, frames)
    with h5_writer(tmp_path / "ours.h5") as f:
        fill(f, frames)
        assert f.filename == str(tmp_path / "ours.h5")
    assert contents(tmp_path / "ours.h5") == contents(tmp_path / "plain.h5")
    with h5py.File(tmp_path / "ours.h5", "r") as f:
        assert np.array_equal(f["crops_112"][:], frames) and not f["present"][1]
    assert h5_is_done(tmp_path / "ours.h5", "abc")


def test_h5_writer_finishes_writes_the_system_cuts_short(tmp_path, monkeypatch):
    pwrite = os.pwrite
    monkeypatch.setattr(hdf5.os, "pwrite", lambda fd, data, offset: pwrite(fd, bytes(data[:3000]), offset))
    frames = crops(3)
    with h5_writer(tmp_path / "a.h5") as f:
        fill(f, frames)
    monkeypatch.undo()
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert np.array_equal(f["crops_112"][:], frames)


def test_h5_writer_on_a_full_disk_closes_then_raises_naming_the_file(tmp_path, monkeypatch):
    room, refused = 60_000, 0  # the disk takes this many bytes, the last write only in part
    pwrite = os.pwrite

    def full_disk(fd: int, data, offset: int) -> int:
        nonlocal room, refused
        if room == 0:
            refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(len(data), room)
        room -= n
        return pwrite(fd, bytes(data[:n]), offset)

    monkeypatch.setattr(hdf5.os, "pwrite", full_disk)
    path, finished, before = tmp_path / "a.h5", False, open_files()
    with pytest.raises(OSError) as failed:
        with h5_writer(path) as f:
            fill(f, crops(8))
            finished = True  # later writes are dropped, so the block runs on to its end
    assert failed.value.errno == errno.ENOSPC
    assert str(path) in str(failed.value) and "No space left on device" in str(failed.value)
    assert finished and not f.id.valid and open_files() == before  # HDF5 let go of it
    assert refused == 1  # after the error, nothing more was tried


def test_h5_writer_passes_other_errors_through(tmp_path):
    with pytest.raises(KeyError), h5_writer(tmp_path / "a.h5") as f:
        f["x"] = np.zeros(3)
        f["missing"]
    assert not f.id.valid


FILL_UNTIL_FULL = """
import sys
from pathlib import Path
import numpy as np
from pipeline.atomic import atomic_output
from pipeline.hdf5 import h5_writer
out, n = Path(sys.argv[1]), int(sys.argv[2])
frames = np.random.default_rng(0).integers(0, 256, (16, 112, 112, 3), np.uint8)
try:
    with atomic_output(out / "big.h5") as tmp, h5_writer(tmp) as f:
        f.create_dataset("crops_112", (n, 112, 112, 3), np.uint8, chunks=(1, 112, 112, 3), compression="gzip")
        for i in range(n):
            f["crops_112"][i] = frames[i % 16]
        f.attrs["complete"] = True
except OSError as e:
    print(f"failed: {e}", flush=True)
with atomic_output(out / "small.h5") as tmp, h5_writer(tmp) as f:
    f["x"] = np.arange(10)
    f.attrs["complete"] = True
print("done", flush=True)
"""


def run_child(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", FILL_UNTIL_FULL, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_full_tmpfs_fails_the_file_and_the_process_exits_cleanly(small_disk):
    # In a child process: a plain h5py.File here crashes the interpreter at exit (status 139).
    disk = small_disk(256)
    child = run_child(str(disk), "24")  # ~900 KiB of crops
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, f"exit status {child.returncode}: {err[-2000:]}"
    lines = out.splitlines()
    assert lines[0].startswith(f"failed: [Errno {errno.ENOSPC}] No space left on device: '{disk}/.big.h5."), out + err
    assert lines[0].endswith(".partial'") and lines[1] == "done"
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
    assert sorted(p.name for p in disk.iterdir()) == ["small.h5"]  # the failed file freed its space
    with h5py.File(disk / "small.h5", "r") as f:
        assert f.attrs["complete"] and list(f["x"][:]) == list(range(10))


def test_sigkill_mid_write_leaves_only_a_partial_file(tmp_path):
    def growing() -> bool:
        return any(p.stat().st_size > 200_000 for p in tmp_path.glob(".big.h5.*.partial"))

    child = run_child(str(tmp_path), "100000")
    assert kill_after(child, growing, 0.05), "the writer ended before it could be killed"
    names = [p.name for p in tmp_path.iterdir()]
    assert len(names) == 1 and names[0].startswith(".big.h5.") and names[0].endswith(".partial"), names


def test_sweep_removes_what_ended_writers_of_this_host_left_and_nothing_else(tmp_path):
    from pipeline.atomic import atomic_output, sweep_partials

    ended = subprocess.Popen(["true"])
    ended.wait()
    host = socket.gethostname()
    (tmp_path / "sub").mkdir()
    litter = [tmp_path / f".a.h5.{ended.pid}~{host}.partial", tmp_path / "sub" / f".b.h5.{ended.pid}~{host}.partial"]
    keep = [tmp_path / f".c.h5.{os.getpid()}~{host}.partial",  # a live writer: this very process
            tmp_path / f".d.h5.{ended.pid}~elsewhere.example.org.partial",  # another host's process
            tmp_path / ".e.h5.12345.partial", tmp_path / "f.h5"]  # not ours to judge
    for p in litter + keep:
        p.write_bytes(b"x")
    with atomic_output(tmp_path / "g.h5") as tmp:  # what atomic_output names its files, it can sweep
        assert atomic.PARTIAL.search(tmp.name)["host"] == host
        tmp.write_bytes(b"x")
        assert sweep_partials(tmp_path) == 2
    assert not any(p.exists() for p in litter) and all(p.exists() for p in keep)
    assert (tmp_path / "g.h5").exists()
