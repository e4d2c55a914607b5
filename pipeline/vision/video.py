"""Streaming video decode with decord, or PyAV for files that decord cannot open (a download cut
short): memory bounded by the chunk size, damaged stretches and lost tails flagged."""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

log = logging.getLogger("pipeline")


class VideoError(RuntimeError):
    """A file that cannot be read as a video; the message names the file."""


@dataclass(frozen=True, eq=False)
class StreamIndex:
    """Where the frames of a file that decord cannot open lie, for PyAV to decode them.

    ``pts`` (m,) int64 presentation times of frames 0..m-1, the frames the file still holds, in
    ``time_base`` seconds; ``seek`` (m,) int64 the decode time of the key frame each is decoded from.
    """

    pts: np.ndarray
    seek: np.ndarray
    time_base: Fraction


@dataclass(frozen=True)
class VideoInfo:
    path: str
    fps: float
    n_frames: int
    width: int
    height: int
    # set when decord cannot open the file and PyAV reads it instead
    av_index: StreamIndex | None = field(default=None, repr=False, compare=False)

    @property
    def held(self) -> int:
        """Frames the file holds: all but those lost past a cut."""
        return self.n_frames if self.av_index is None else len(self.av_index.pts)


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


def _reader(path: str | Path, size: tuple[int, int] | None = None, threads: int = 1):
    import decord

    # decord scales while decoding: far cheaper than decoding whole frames and shrinking them after;
    # its frames are the same whatever the number of decoding threads
    h, w = size or (-1, -1)
    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads, width=w, height=h)


def decode_threads(threads: int, environ: Mapping[str, str] | None = None) -> int:
    """Decoding threads per reader: ``threads``, or for 0 this process's share of the machine's
    cores (:func:`pipeline.runs.cores_share`), at most 8: more gives one decoder little."""
    from pipeline.runs import cores_share

    return threads if threads > 0 else min(8, cores_share(environ))


def prefetched(chunks: Iterator[Chunk], depth: int = 1) -> Iterator[Chunk]:
    """``chunks`` decoded ``depth`` ahead in a thread of their own, so that decoding the next chunk
    overlaps the work on this one (decord and PyAV decode outside the GIL). At most ``depth``
    chunks are decoded or waiting beside the one being worked on; an error in decoding is raised
    here, where its chunk would have come; a consumer that stops early stops the thread."""
    ready: queue.Queue = queue.Queue()
    slots = threading.Semaphore(depth)  # a chunk is decoded only into a free slot
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            while True:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                ch = next(chunks, done)
                ready.put(ch)
                if ch is done:
                    return
                del ch
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            ready.put(e)

    worker = threading.Thread(target=produce, name="decode-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            del item
            slots.release()  # the consumer is done with this chunk: the next may be decoded
    finally:
        stop.set()
        worker.join()


def _decoded(ctx, packet) -> list:
    """The frames a PyAV ``packet`` completes (``None`` drains the decoder); none if it does not decode."""
    import av

    try:
        return ctx.decode(packet)
    except av.error.FFmpegError:
        return []


def _index_with_av(path: Path) -> tuple[int, float, tuple[int, int], StreamIndex] | None:
    """Frame count, rate, (h, w) and frame index of a file that decord cannot open, read with PyAV
    up to where it is cut or damaged; None if not one frame decodes there."""
    import av

    pts, dts, key, first, whole = [], [], [], None, True
    try:
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            try:
                for packet in c.demux(stream):
                    if packet.is_corrupt:  # the file ends inside this packet
                        whole = False
                        break
                    if packet.pts is None or packet.dts is None or packet.is_discard:
                        continue
                    pts.append(packet.pts)
                    dts.append(packet.dts)
                    key.append(packet.is_keyframe)
                    if first is None:  # one frame must decode for the file to count as a video
                        first = next(iter(_decoded(stream.codec_context, packet)), None)
            except av.error.FFmpegError:
                whole = False
            if first is None:
                first = next(iter(_decoded(stream.codec_context, None)), None)
            rate = stream.average_rate or stream.guessed_rate
            n = stream.frames
            if not n and stream.duration and rate:
                n = round(float(stream.duration * stream.time_base * rate))
            time_base = stream.time_base
    except (av.error.FFmpegError, IndexError):  # not a container, or one without a video stream
        return None
    if first is None:
        return None
    pts, dts, key = np.array(pts, np.int64), np.array(dts, np.int64), np.array(key, bool)
    key[0] = True  # decoding starts at the first packet, marked key or not
    n = max(n, len(pts))
    order = np.argsort(pts, kind="stable")
    shown = pts[order]  # (m,) frame k is the k-th in presentation order
    # each frame is decoded from the last key frame shown before it, so open GOPs decode too
    keys = np.flatnonzero(key)[np.argsort(pts[key])]
    seek = dts[keys][np.maximum(np.searchsorted(pts[keys], shown, side="right") - 1, 0)]
    if not whole or len(pts) < n:
        # a frame lost with the rest of the file decodes after the last whole packet, so it is
        # shown after that packet's decode time; the frames shown up to then are all here and
        # can be numbered, the few B-frames past it cannot
        held = int(np.searchsorted(shown, dts.max(), side="right"))
        shown, seek = shown[:held], seek[:held]
    if not len(shown):
        return None
    return n, float(rate) if rate else np.nan, (first.height, first.width), StreamIndex(shown, seek, time_base)


def open_video(path: str | Path):
    """Open ``path`` with decord (CPU, RGB) -> ``(reader, VideoInfo)``; raises VideoError.

    A file that decord cannot open but PyAV can partly decode (a download cut short with its index
    at the front) gives reader ``None`` and ``VideoInfo.av_index``: ``iter_chunks`` reads it with
    PyAV and flags the frames past what the file holds.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    vr, index = None, None
    try:
        vr = _reader(path)
        n = len(vr)
        fps = float(vr.get_avg_fps())
        h, w = vr[0].shape[:2] if n else (0, 0)
    except _decode_errors() as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        # decord prefixes "[time] source.cc:line: "; the reason follows
        reason = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", lines[0])
        found = _index_with_av(path)
        if found is None:
            raise VideoError(f"{path}: cannot be read as a video, truncated or not a video ({reason})") from None
        vr = None
        n, fps, (h, w), index = found
        if n > len(index.pts):
            log.warning("%s: %d of its %d frames are lost, the file is cut short or damaged after frame %d (%s); "
                        "the frames before are read with PyAV, the rest flagged decode_error",
                        path, n - len(index.pts), n, len(index.pts) - 1, reason)
        else:
            log.warning("%s: decord cannot open it (%s); read with PyAV", path, reason)
    if n == 0:
        raise VideoError(f"{path}: the video has no frames")
    if not np.isfinite(fps) or fps <= 0:
        fps = 30.0  # some containers carry no rate; timestamps still come from the stream
        log.warning("%s: no frame rate in the file, assuming %.0f fps", path, fps)
    return vr, VideoInfo(str(path), fps, n, int(w), int(h), index)


def _timestamps(vr, index: np.ndarray, fps: float) -> np.ndarray:
    try:
        ts = np.asarray(vr.get_frame_timestamp(index.tolist()), dtype=np.float64)
        ts = ts.reshape(len(index), -1)[:, 0]  # (t,) start times
    except (*_decode_errors(), IndexError, ValueError):
        ts = np.full(len(index), np.nan)
    bad = ~np.isfinite(ts)
    ts[bad] = index[bad] / fps
    return ts


def _av_timestamps(info: VideoInfo, index: np.ndarray) -> np.ndarray:
    """(t,) seconds of frames ``index`` from the stream's pts; past the cut, the file's rate goes on."""
    s = info.av_index
    last = len(s.pts) - 1
    return s.pts[np.minimum(index, last)] * float(s.time_base) + np.maximum(index - last, 0) / info.fps


def _av_frames(container, stream) -> Iterator:
    """PyAV frames from the container's position on, up to the first packet that is cut or
    damaged; the decoder is drained there, so the frames it holds back for reordering count."""
    import av

    ctx = stream.codec_context
    try:
        for packet in container.demux(stream):
            if packet.is_corrupt:
                break
            if packet.dts is not None:  # not the end-of-stream packet: the drain below ends it
                yield from _decoded(ctx, packet)
    except av.error.FFmpegError:
        pass
    yield from _decoded(ctx, None)


def _rgb_graph(stream, shape: tuple[int, int]):
    """A PyAV filter graph turning ``stream``'s frames into RGB of ``shape`` (h, w) with decord's
    filters (scale, then RGB) and the bilinear scaler its FFmpeg defaults to: the same pixels as
    decord's, so that every reader gives the detector the same frames."""
    import av

    rgb = av.filter.Graph()
    rgb.link_nodes(rgb.add_buffer(template=stream), rgb.add("scale", f"{shape[1]}:{shape[0]}:flags=bilinear"),
                   rgb.add("format", "rgb24"), rgb.add("buffersink")).configure()
    return rgb


def _read_av(info: VideoInfo, index: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Frames at ``index`` of a file PyAV reads -> ((t, h, w, 3) uint8 RGB scaled to ``shape``,
    (t,) bool error); frames past what the file holds or that do not decode are errors."""
    import av

    s = info.av_index
    out = np.zeros((len(index), *shape, 3), np.uint8)
    err = np.ones(len(index), bool)
    inside = np.flatnonzero(index < len(s.pts))  # positions of the frames the file still holds
    if not len(inside):
        return out, err
    # one seek per key frame reached; the frames decoded from the same key frame take one pass
    runs = np.split(inside, np.flatnonzero(np.diff(s.seek[index[inside]])) + 1)
    with av.open(info.path) as c:
        stream = c.streams.video[0]
        rgb = _rgb_graph(stream, shape)
        for run in runs:
            want = {int(s.pts[index[k]]): k for k in run}
            last = max(want)
            c.seek(int(s.seek[index[run[0]]]), stream=stream)
            for frame in _av_frames(c, stream):
                k = want.get(frame.pts)
                if k is not None:
                    rgb.push(frame)
                    out[k] = rgb.pull().to_ndarray()
                    err[k] = False
                if frame.pts is not None and frame.pts >= last:  # frames come in presentation order
                    break
    return out, err


class _Sequence:
    """One PyAV decoder reading a file front to back for one pass: frames asked for in increasing
    order are decoded once, in ``threads`` threads, continuing where the last chunk stopped; it
    seeks only past a gap that spans a key frame. Its pixels are decord's (the same filters:
    bilinear scale, then RGB), its frames are numbered by ``index`` (a :class:`StreamIndex` of
    the whole file), and it holds nothing decoded between chunks."""

    def __init__(self, path: str, index: StreamIndex, shape: tuple[int, int], threads: int) -> None:
        import av

        self.index, self.shape = index, shape
        self.container = av.open(path)
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"  # frame and slice threads: the same frames, sooner
        self.stream.thread_count = threads
        self.rgb = _rgb_graph(self.stream, shape)
        self.frames: Iterator | None = None
        self.last = -1  # the frame number decoded last

    def read(self, wanted: np.ndarray) -> np.ndarray | None:
        """Frames ``wanted`` (increasing) -> (t, h, w, 3) uint8, or None at the first sign of
        damage (a frame that does not decode, or decodes concealed): the caller reads on with
        decord, which salvages what it can of a damaged stretch."""
        s = self.index
        out = np.zeros((len(wanted), *self.shape, 3), np.uint8)
        for k, i in enumerate(int(i) for i in wanted):
            if i >= len(s.pts):
                return None
            if self.frames is None or i <= self.last or (i > self.last + 1 and s.seek[i] != s.seek[self.last]):
                # the first frame, one asked for again, or one past a key frame the decoder need not
                # reach frame by frame
                self.container.seek(int(s.seek[i]), stream=self.stream)
                self.frames = _av_frames(self.container, self.stream)
            target = int(s.pts[i])
            for frame in self.frames:
                if frame.pts is None or frame.pts < target:
                    continue
                if frame.pts != target or frame.is_corrupt:
                    return None
                self.rgb.push(frame)
                out[k] = self.rgb.pull().to_ndarray()
                break
            else:
                return None  # the decoder stopped at a damaged or cut packet
            self.last = i
        return out

    def close(self) -> None:
        self.frames = None
        self.container.close()


def _sequence(info: VideoInfo, shape: tuple[int, int], threads: int) -> _Sequence | None:
    """A sequential decoder of ``info``'s file, or None where PyAV numbers its frames otherwise
    than decord (then decord reads it, a reader per chunk)."""
    found = _index_with_av(Path(info.path))
    if found is None or len(found[3].pts) != info.n_frames:
        return None
    return _Sequence(info.path, found[3], shape, threads)


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
    size: tuple[int, int] | None = None, threads: int = 1,
) -> Iterator[Chunk]:
    """Yield the video in chunks of at most ``chunk`` kept frames.

    Kept frames are ``0, stride, 2*stride, ...`` or, if given, exactly ``frames`` (increasing).
    With ``vr=None`` the pass is read by one PyAV decoder front to back (:class:`_Sequence`, with
    ``threads`` threads), scaled while decoding to ``size`` (h, w) if given, with decord's
    pixels and timestamps; a file PyAV numbers otherwise is read by a decord reader per chunk,
    freed straight after. A file that decord cannot open (``info.av_index`` set) is read with PyAV
    a chunk at a time.
    """
    if frames is None:
        index = np.arange(0, info.n_frames, max(1, stride), dtype=np.int64)
    else:
        index = np.asarray(frames, np.int64)
    seq = _sequence(info, size or (info.height, info.width), threads) \
        if vr is None and info.av_index is None and len(index) else None
    if seq is not None:
        stamps = _timestamps(_reader(info.path), index, info.fps)  # decord's, from its index: nothing decoded
    try:
        for start in range(0, len(index), chunk):
            part = index[start : start + chunk]
            data = seq.read(part) if seq is not None else None
            if data is None and seq is not None:  # damage: decord reads this chunk and the rest
                log.info("%s: a damaged stretch from frame %d; read with decord from there", info.path, part[0])
                seq.close()
                seq = None
            if data is not None:
                yield Chunk(data, part, stamps[start : start + chunk], np.zeros(len(part), bool))
                del data
                continue
            yield _chunk_apart(vr, info, part, size, threads)
    finally:
        if seq is not None:
            seq.close()


def _chunk_apart(vr, info: VideoInfo, part: np.ndarray, size: tuple[int, int] | None, threads: int) -> Chunk:
    """Frames ``part`` read on their own: with PyAV for a file decord cannot open, else by ``vr``
    or a decord reader of the chunk's own."""
    if info.av_index is not None:
        data, err = _read_av(info, part, size or (info.height, info.width))
        stamps = _av_timestamps(info, part)
    else:
        # a decord 0.6 reader left idle keeps decoding ahead into memory, without bound on a long
        # video, so no reader outlives the chunk it reads
        reader = _reader(info.path, size, threads) if vr is None else vr
        data, err = _read(reader, part, size if vr is None and size else (info.height, info.width))
        stamps = _timestamps(reader, part, info.fps)
        del reader
    bad = err & (part < info.held)  # the frames lost past a cut were reported on opening
    if bad.any():
        log.warning("%s: %d of %d frames from frame %d could not be decoded",
                    info.path, bad.sum(), len(part), part[0])
    return Chunk(data, part, stamps, err)
