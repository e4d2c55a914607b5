"""Damaged and unusual inputs made from real clips with PyAV, and a way to kill a run part-way at
moments a seed replays."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def first_frames(src: Path, n: int) -> list[np.ndarray]:
    """The first ``n`` frames of ``src`` as (h, w, 3) uint8 RGB."""
    out = []
    with av.open(str(src)) as c:
        for frame in c.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == n:
                break
    return out


def encode(frames: Iterable[np.ndarray], dst: Path, rate: int = 25, pts: Sequence[int] | None = None,
           time_base: Fraction | None = None, gop: int = 12) -> Path:
    """Frames (h, w, 3) uint8 RGB -> an H.264 mp4 with a key frame every ``gop`` frames; ``pts`` in
    ``time_base`` units gives a variable rate."""
    with av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.options = {"preset": "ultrafast", "g": str(gop)}
        if time_base is not None:
            stream.codec_context.time_base = time_base
        for k, img in enumerate(frames):
            if k == 0:
                stream.height, stream.width = img.shape[:2]
                stream.pix_fmt = "yuv420p"
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = int(pts[k]), time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return dst


def remux(src: Path, dst: Path, index_first: bool) -> Path:
    """``src``'s video packets in a new mp4 whose index (moov) is at the front or at the end."""
    options = {"movflags": "faststart"} if index_first else {}
    with av.open(str(src)) as inp, av.open(str(dst), "w", options=options) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return dst


def cut(src: Path, dst: Path, keep: float) -> Path:
    """The first ``keep`` of ``src``'s bytes, as an interrupted copy leaves a file."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def scramble(src: Path, dst: Path, start: float = 0.45, stop: float = 0.55, seed: int = 0) -> Path:
    """``src`` with random bytes over ``start:stop`` of its length (container index intact)."""
    data = bytearray(src.read_bytes())
    a, b = int(len(data) * start), int(len(data) * stop)
    data[a:b] = np.random.default_rng(seed).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def fault_seed() -> int:
    """The seed of a test's random kill moments: ``FAULT_SEED`` from the environment replays a run,
    else a fresh one. Printed, so that pytest shows it with a failure."""
    seed = int(os.environ.get("FAULT_SEED") or secrets.randbelow(2**32))
    print(f"kill moments drawn from FAULT_SEED={seed}; set it in the environment to replay them")
    return seed


def stage(name: str, *args: str) -> subprocess.Popen:
    """``python -m pipeline.<name> args...`` on one thread, output kept for the error message."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", f"pipeline.{name}", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a run that must succeed; returns its standard error."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (out + err)[-3000:]
    return err


def kill_after(proc: subprocess.Popen, ready: Callable[[], bool], delay: float) -> bool:
    """SIGKILL ``proc`` ``delay`` s after ``ready()`` holds; False if it exited before that."""
    while not ready():
        if proc.poll() is not None:
            proc.communicate()
            return False
        time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is not None:
        proc.communicate()
        return False
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    return True
