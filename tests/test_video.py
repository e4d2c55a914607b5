"""Streaming decode: chunks, stride, timestamps, damaged stretches and unreadable files."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import av
import decord
import numpy as np
import pytest
import torch

from pipeline.vision.video import VideoError, chunk_frames, decode_threads, iter_chunks, open_video, prefetched, shrunk

pytestmark = pytest.mark.real_video


def _pyav_frames(path, n):
    """The first n frames and their times as PyAV decodes them."""
    with av.open(str(path)) as c:
        out = []
        for frame in c.decode(video=0):
            out.append((frame.to_ndarray(format="rgb24"), float(frame.time)))
            if len(out) == n:
                break
    return np.stack([f for f, _ in out]), np.array([t for _, t in out])


def test_chunks_cover_video_with_stride(pyfeat_clips):
    path = pyfeat_clips / "single_face.mp4"
    vr, info = open_video(path)
    assert (info.width, info.height, info.n_frames) == (640, 360, 72)
    chunks = list(iter_chunks(vr, info, chunk=10, stride=3))
    assert all(len(c.index) <= 10 for c in chunks)
    index = np.concatenate([c.index for c in chunks])
    np.testing.assert_array_equal(index, np.arange(0, 72, 3))
    assert not np.concatenate([c.error for c in chunks]).any()
    stamps = np.concatenate([c.timestamp for c in chunks])
    assert np.all(np.diff(stamps) > 0)

    ref, times = _pyav_frames(path, 7)
    first = chunks[0]
    np.testing.assert_allclose(first.timestamp[:3], times[[0, 3, 6]], atol=1e-3)
    # two decoders may round colour conversion differently, not more
    assert np.abs(first.frames[:3].astype(int) - ref[[0, 3, 6]]).mean() < 2


def test_chunks_decoded_small_and_bounded_in_bytes(pyfeat_clips):
    from torchvision.transforms.v2.functional import resize

    _, info = open_video(pyfeat_clips / "single_face.mp4")
    size = shrunk((info.height, info.width), 320)
    assert size == (180, 320) and shrunk((info.height, info.width), 4000) == (360, 640)  # never enlarged
    per = chunk_frames(32, 1.0, size)  # 1 MiB holds 6 frames of 180x320
    assert per == 6 and chunk_frames(32, 0.01, size) == 1
    chunks = list(iter_chunks(None, info, per, size=size))
    assert all(c.frames.shape[1:] == (180, 320, 3) and len(c.index) <= 6 for c in chunks)
    assert sum(len(c.index) for c in chunks) == info.n_frames
    whole = next(iter_chunks(None, info, 6))
    small = resize(torch.from_numpy(whole.frames).permute(0, 3, 1, 2), [180, 320], antialias=True)
    # scaled while decoding, the frames look like the full frames shrunk afterwards
    assert np.abs(chunks[0].frames.astype(int) - small.permute(0, 2, 3, 1).numpy()).mean() < 3


def test_explicit_frames(pyfeat_clips):
    vr, info = open_video(pyfeat_clips / "single_face.mp4")
    (c,) = iter_chunks(vr, info, chunk=8, frames=[5, 40, 41])
    np.testing.assert_array_equal(c.index, [5, 40, 41])
    np.testing.assert_array_equal(c.frames[1], vr[40].asnumpy())


class _Damaged:
    """A real reader whose frames in ``bad`` fail as a damaged stream does."""

    def __init__(self, vr, bad):
        self.vr, self.bad = vr, set(bad)

    def get_batch(self, index):
        if self.bad & set(index):
            raise decord.DECORDError("corrupt packet")
        return self.vr.get_batch(index)

    def __getitem__(self, i):
        if i in self.bad:
            raise RuntimeError("corrupt packet")
        return self.vr[i]

    def get_frame_timestamp(self, index):
        return self.vr.get_frame_timestamp(index)


def test_damaged_stretch_costs_only_its_frames(pyfeat_clips):
    vr, info = open_video(pyfeat_clips / "single_face.mp4")
    chunks = list(iter_chunks(_Damaged(vr, {17, 18}), info, chunk=16))
    error = np.concatenate([c.error for c in chunks])
    np.testing.assert_array_equal(np.flatnonzero(error), [17, 18])
    second = chunks[1]  # frames 16..31
    assert not second.frames[1:3].any()
    np.testing.assert_array_equal(second.frames[0], vr[16].asnumpy())
    np.testing.assert_array_equal(second.frames[3], vr[19].asnumpy())


def truncate(src, dst, keep=0.5):
    """A copy of ``src`` with the index up front, cut to ``keep`` of its bytes, as a failed copy leaves it."""
    whole = dst.with_name("whole_" + dst.name)
    with av.open(str(src)) as inp, av.open(str(whole), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    data = whole.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    whole.unlink()
    return dst


def garble(src, dst, first: int):
    """A copy of ``src`` whose video packets from ``first`` on carry random bytes of the same size:
    the container still lists every frame, but the decoder cannot make frames of the tail."""
    rng = np.random.default_rng(0)
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        packets = (p for p in inp.demux(inp.streams.video[0]) if p.dts is not None)
        for k, packet in enumerate(packets):
            if k >= first:
                junk = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
                junk.pts, junk.dts, junk.time_base = packet.pts, packet.dts, packet.time_base
                junk.is_keyframe = packet.is_keyframe
                packet = junk
            packet.stream = stream
            out.mux(packet)
    return dst


def decodable(path):
    """(header frame count, frames PyAV decodes before the stream breaks)."""
    with av.open(str(path)) as c:
        header, frames = c.streams.video[0].frames, []
        with contextlib.suppress(av.error.InvalidDataError):
            for frame in c.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
    return header, np.stack(frames)


def test_header_promising_more_frames_than_decode(pyfeat_clips, tmp_path):
    path = garble(pyfeat_clips / "single_face.mp4", tmp_path / "garbled.mp4", first=60)
    header, good = decodable(path)
    assert header == 72 and len(good) < header
    vr, info = open_video(path)
    assert info.n_frames == header
    chunks = list(iter_chunks(vr, info, chunk=16))
    error = np.concatenate([c.error for c in chunks])
    frames = np.concatenate([c.frames for c in chunks])
    assert len(error) == header
    # everything PyAV cannot decode is flagged, and what is flagged is one stretch reaching the end
    assert error[len(good):].all()
    first_bad = np.argmax(error)
    assert error[first_bad:].all() and not error[:first_bad].any() and first_bad > 0
    assert not frames[error].any()
    # the frames that are not flagged are the real ones
    assert np.abs(frames[:first_bad].astype(int) - good[:first_bad]).mean() < 2


def test_unreadable_files_name_themselves(pyfeat_clips, tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    for bad in (text, tmp_path / "missing.mp4"):
        with pytest.raises(VideoError, match=bad.name):
            open_video(bad)
    # cut short with its index in front: decord refuses it, PyAV reads the frames it still holds
    cut = truncate(pyfeat_clips / "single_face.mp4", tmp_path / "cut.mp4")
    reader, info = open_video(cut)
    assert reader is None and 0 < info.held < info.n_frames


def test_decoding_threads_change_no_pixel(pyfeat_clips):
    _, info = open_video(pyfeat_clips / "WolfgangLanger_Pexels.mp4")
    size = shrunk((info.height, info.width), 320)
    for s in (size, None):
        one, many = (np.concatenate([c.frames for c in iter_chunks(None, info, 16, size=s, threads=t)])
                     for t in (1, 4))
        assert one.shape[0] == info.n_frames and np.array_equal(one, many)


@pytest.mark.parametrize("depth", [1, 2])
def test_decoding_ahead_keeps_order_and_memory_bound(depth: int) -> None:
    produced = []

    def chunks():
        for k in range(12):
            produced.append(k)
            yield k

    got = []
    for k in prefetched(chunks(), depth):
        time.sleep(0.01)  # the thread decodes ahead while this chunk is worked on, no further
        assert len(produced) <= len(got) + 1 + depth
        got.append(k)
    assert got == list(range(12))


def test_decoding_ahead_raises_where_the_failing_chunk_would_come_and_stops_early() -> None:
    def failing():
        yield 0
        yield 1
        raise VideoError("clip.mp4: broken")

    got = []
    with pytest.raises(VideoError, match="clip.mp4: broken"):
        for k in prefetched(failing()):
            got.append(k)
    assert got == [0, 1]
    for k in prefetched(iter(range(100))):
        if k == 3:
            break
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name == "decode-ahead"]  # no thread left behind


def test_decoding_threads_are_the_process_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert decode_threads(3, {}) == 3
    assert decode_threads(0, {}) == 8  # at most 8: more gives a decoder little
    assert decode_threads(0, {"LOCAL_WORLD_SIZE": "4"}) == 4  # torchrun, 4 processes on this machine
    assert decode_threads(0, {"LOCAL_WORLD_SIZE": "32"}) == 1
