"""Face detection on video: keyframes with facenet-pytorch's whole MTCNN, O-net re-fits in between.

The reference throughout is facenet-pytorch's own MTCNN run on every frame of real clips.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from einops import rearrange

from pipeline.vision.detect import Anchor, FaceDetector
from pipeline.vision.track import Detections, iou
from pipeline.vision.video import iter_chunks, open_video

pytestmark = pytest.mark.real_video


def frames_of(path, stop: int | None = None) -> np.ndarray:
    _, info = open_video(path)
    stop = min(stop or info.n_frames, info.n_frames)
    return np.concatenate([c.frames for c in iter_chunks(None, info, 64, frames=np.arange(stop))])


def run(frames: np.ndarray, **kw) -> tuple[list[Detections], int]:
    det = FaceDetector(min_face=32, **kw)
    out = [d for s in range(0, len(frames), 32) for d in det(frames[s : s + 32])]
    return out, det.full


@pytest.fixture(scope="module")
def whole_cascade(pyfeat_clips) -> Callable[[str, int | None], tuple[np.ndarray, list[Detections]]]:
    """The frames of a clip (up to ``stop``) and the whole cascade's detections on every frame,
    computed once per clip for the module."""
    done: dict[tuple[str, int | None], tuple[np.ndarray, list[Detections]]] = {}

    def reference(name: str, stop: int | None = None) -> tuple[np.ndarray, list[Detections]]:
        if (name, stop) not in done:
            frames = frames_of(pyfeat_clips / name, stop)
            ref, full = run(frames, keyframe=1)
            assert full == len(frames)
            done[name, stop] = frames, ref
        return done[name, stop]

    return reference


def largest(d: Detections) -> int:
    return int(np.argmax((d.box[:, 2] - d.box[:, 0]) * (d.box[:, 3] - d.box[:, 1])))


def compare(ref: list[Detections], got: list[Detections]) -> tuple[float, float, float]:
    """Share of the reference's largest faces matched (IoU >= 0.8), the median landmark distance of
    the matches in face sizes, and the share of frames where only ``got`` has a face."""
    hits, dist, ghosts = 0, [], 0
    for a, b in zip(ref, got, strict=True):
        if not len(a):
            ghosts += bool(len(b))
            continue
        if not len(b):
            continue
        k = largest(a)
        overlap = iou(a.box[k : k + 1], b.box)[0]
        j = int(np.argmax(overlap))
        if overlap[j] >= 0.8:
            hits += 1
            size = max(a.box[k, 2] - a.box[k, 0], a.box[k, 3] - a.box[k, 1])
            dist.append(np.linalg.norm(a.landmarks[k] - b.landmarks[j], axis=-1).mean() / size)
    with_face = sum(bool(len(a)) for a in ref)
    return hits / max(with_face, 1), float(np.median(dist)) if dist else np.inf, ghosts / len(ref)


def test_keyframe_1_is_facenet_on_every_frame(whole_cascade):
    from facenet_pytorch import MTCNN

    frames, ours = whole_cascade("single_face.mp4")
    frames, ours = frames[:24], ours[:24]
    boxes, probs, points = MTCNN(keep_all=True, min_face_size=32).detect(frames, landmarks=True)
    for d, b, p, q in zip(ours, boxes, probs, points, strict=True):
        np.testing.assert_allclose(d.box, np.asarray(b, np.float32).reshape(-1, 4), atol=1e-3)
        np.testing.assert_allclose(d.landmarks, np.asarray(q, np.float32).reshape(-1, 5, 2), atol=1e-3)
        np.testing.assert_allclose(d.score, np.asarray(p, np.float32).reshape(-1), atol=1e-6)


@pytest.mark.parametrize("name, stop", [("WolfgangLanger_Pexels.mp4", 240), ("single_face.mp4", None)])
def test_following_finds_the_faces_the_whole_cascade_finds(whole_cascade, name, stop):
    frames, ref = whole_cascade(name, stop)
    got, full = run(frames, keyframe=10)
    found, dist, ghosts = compare(ref, got)
    assert found >= 0.99 and ghosts == 0
    assert dist < 0.03  # landmarks within 3% of the face's size of where the whole cascade puts them
    assert full <= 0.2 * len(frames)  # and most frames really were only followed


def test_a_face_that_enters_is_found_at_once_and_one_that_leaves_is_let_go(whole_cascade):
    for name in ("noface_face.mov", "face_noface.mov"):
        frames, ref = whole_cascade(name)
        got, full = run(frames, keyframe=10)
        present = np.array([bool(len(d)) for d in ref])
        assert 0.2 < present.mean() < 0.8, name  # the clip has both
        found, _, ghosts = compare(ref, got)
        # with no face to follow, every frame gets the whole cascade: nothing is found late
        assert found >= 0.99, name
        assert ghosts <= 0.01, name  # a face that left is not re-fitted onto the background
        assert full < len(frames), name


def test_reset_starts_a_new_video_with_a_keyframe(pyfeat_clips):
    frames = frames_of(pyfeat_clips / "single_face.mp4", 12)
    det = FaceDetector(min_face=32, keyframe=10)
    det(frames)
    first = det.full
    assert first < len(frames)
    det.reset()
    assert det.full == 0
    det(frames[5:7])  # without the reset the second frame of a new video would only be followed
    assert det.full >= 1 and len(det._prior) == 1


def test_refit_keeps_a_face_and_rejects_the_background(pyfeat_clips):
    frames = frames_of(pyfeat_clips / "single_face.mp4", 2)
    det = FaceDetector(min_face=32)
    (face,) = [d for d in det(frames[:1])]
    assert len(face) == 1
    image = rearrange(torch.from_numpy(frames[1]), "h w c -> c h w")
    squares = Anchor.of(face).squares(face.landmarks)
    side = squares[0, 2] - squares[0, 0]
    background = squares.copy()
    background[0, [0, 2]] = [0, side] if squares[0, 0] > side else [frames.shape[2] - side, frames.shape[2]]
    background[0, [1, 3]] = [0, side]
    got, ok = det.cascade.refit(image, np.concatenate([squares, background]))
    assert ok.tolist() == [True, False] and len(got) == 1
    assert np.linalg.norm(got.landmarks[0] - face.landmarks[0], axis=-1).mean() < 0.05 * side


def test_anchor_places_the_square_the_keyframe_gave():
    rng = np.random.default_rng(0)
    marks = rng.uniform(100, 200, (3, 5, 2)).astype(np.float32)
    boxes = np.concatenate([marks.min(1) - 20, marks.max(1) + 30], 1).astype(np.float32)
    faces = Detections(boxes, np.ones(3, np.float32), marks)
    anchor = Anchor.of(faces)
    sq = anchor.squares(marks)
    np.testing.assert_allclose(sq[:, 2] - sq[:, 0], sq[:, 3] - sq[:, 1], atol=1e-3)  # squares
    np.testing.assert_allclose((sq[:, :2] + sq[:, 2:]) / 2, (boxes[:, :2] + boxes[:, 2:]) / 2, atol=1e-3)
    np.testing.assert_allclose(sq[:, 2] - sq[:, 0], (boxes[:, 2:] - boxes[:, :2]).max(1), atol=1e-3)
    # landmarks that move carry the square with them, size unchanged
    moved = anchor.squares(marks + np.float32([7, -3]))
    np.testing.assert_allclose(moved - sq, np.tile([7, -3], 2)[None].repeat(3, 0), atol=1e-3)
