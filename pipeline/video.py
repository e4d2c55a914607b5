"""Streaming video decode with decord: memory bounded by the chunk size, damaged stretches flagged."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("pipeline")


class VideoError(RuntimeError):
    """A file that cannot be read as a video; the message names the file."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    fps: float
    n_frames: int
    width: int
    height: int


@dataclass
class Chunk:
    """Consecutive kept frames of one video.

    ``frames`` (t, h, w, 3) uint8 RGB, zeros where ``error``; ``index`` (t,) int64 frame numbers;
    ``timestamp`` (t,) float64 seconds; ``error`` (t,) bool, True where decoding failed.
    """

    frames: np.ndarray
    index: np.ndarray
    timestamp: np.ndarray
    error: np.ndarray


def _decode_errors() -> tuple[type[BaseException], ...]:
    import decord

    # DECORDError is not a RuntimeError subclass, so both are needed
    return (RuntimeError, decord.DECORDError)


def _reader(path: str | Path, size: tuple[int, int] | None = None):
    import decord

    # decord scales while decoding: far cheaper than decoding whole frames and shrinking them after
    h, w = size or (-1, -1)
    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1, width=w, height=h)


def open_video(path: str | Path):
    """Open ``path`` with decord (CPU, RGB) -> ``(reader, VideoInfo)``; raises VideoError."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    try:
        vr = _reader(path)
        n = len(vr)
        fps = float(vr.get_avg_fps())
        h, w = vr[0].shape[:2] if n else (0, 0)
    except _decode_errors() as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        # decord prefixes "[time] source.cc:line: "; the reason follows
        reason = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", lines[0])
        raise VideoError(f"{path}: cannot be read as a video, truncated or not a video ({reason})") from None
    if n == 0:
        raise VideoError(f"{path}: the video has no frames")
    if not np.isfinite(fps) or fps <= 0:
        fps = 30.0  # some containers carry no rate; timestamps still come from the stream
        log.warning("%s: no frame rate in the file, assuming %.0f fps", path, fps)
    return vr, VideoInfo(str(path), fps, n, int(w), int(h))


def _timestamps(vr, index: np.ndarray, fps: float) -> np.ndarray:
    try:
        ts = np.asarray(vr.get_frame_timestamp(index.tolist()), dtype=np.float64)
        ts = ts.reshape(len(index), -1)[:, 0]  # (t,) start times
    except (*_decode_errors(), IndexError, ValueError):
        ts = np.full(len(index), np.nan)
    bad = ~np.isfinite(ts)
    ts[bad] = index[bad] / fps
    return ts


def _numpy(batch) -> np.ndarray:
    """A decord NDArray as a NumPy array sharing its memory: ``asnumpy`` would copy a whole chunk."""
    from torch.utils.dlpack import from_dlpack

    return from_dlpack(batch.to_dlpack()).numpy()


def _read(vr, index: Sequence[int], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Frames at ``index`` -> ((t, h, w, 3) uint8, (t,) bool error); retries one by one on failure."""
    errors = _decode_errors()
    try:
        frames = _numpy(vr.get_batch(list(index)))
        if frames.shape[1:3] == shape:
            return frames, np.zeros(len(index), bool)
    except errors:
        pass
    # a damaged stretch: salvage what decodes so that only the broken frames are lost
    out = np.zeros((len(index), *shape, 3), np.uint8)
    err = np.ones(len(index), bool)
    for k, i in enumerate(index):
        try:
            frame = vr[int(i)].asnumpy()
        except errors:
            continue
        if frame.shape[:2] == shape:
            out[k], err[k] = frame, False
    return out, err


def shrunk(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """(h, w) ``size`` scaled down, never up, to ``longest`` pixels on the longer side."""
    h, w = size
    s = min(1.0, longest / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def chunk_frames(chunk: int, chunk_mb: float, size: tuple[int, int]) -> int:
    """Frames per chunk: at most ``chunk``, and at most ``chunk_mb`` MiB of (h, w) RGB frames."""
    return max(1, min(chunk, int(chunk_mb * 2**20 // (size[0] * size[1] * 3))))


def iter_chunks(
    vr, info: VideoInfo, chunk: int = 64, stride: int = 1, frames: Sequence[int] | None = None,
    size: tuple[int, int] | None = None,
) -> Iterator[Chunk]:
    """Yield the video in chunks of at most ``chunk`` kept frames.

    Kept frames are ``0, stride, 2*stride, ...`` or, if given, exactly ``frames``. With ``vr=None``
    each chunk is read by a reader of its own, opened from ``info.path`` and freed straight after;
    such readers can decode straight to ``size`` (h, w) instead of the video's own size.
    """
    if frames is None:
        index = np.arange(0, info.n_frames, max(1, stride), dtype=np.int64)
    else:
        index = np.asarray(frames, np.int64)
    for start in range(0, len(index), chunk):
        part = index[start : start + chunk]
        # a decord 0.6 reader left idle keeps decoding ahead into memory, without bound on a long
        # video, so no reader outlives the chunk it reads
        reader = _reader(info.path, size) if vr is None else vr
        data, err = _read(reader, part, size if vr is None and size else (info.height, info.width))
        stamps = _timestamps(reader, part, info.fps)
        del reader
        if err.any():
            log.warning("%s: %d of %d frames from frame %d could not be decoded",
                        info.path, err.sum(), len(part), part[0])
        yield Chunk(data, part, stamps, err)
        del data  # the next chunk decodes without this one's frames still held here
