"""Alignment: Umeyama against scikit-image, the warp against scikit-image, real faces against the template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.transform import SimilarityTransform
from skimage.transform import warp as sk_warp

from pipeline.vision.align import align_faces, apply_affine, footprint, template, umeyama, warp


def test_umeyama_matches_scikit_image():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 500, (6, 5, 2)).astype(np.float32)
    dst = template("arcface", 112)
    mats = umeyama(torch.from_numpy(src), torch.from_numpy(dst)).numpy()
    for s, m in zip(src, mats, strict=True):
        ref = SimilarityTransform.from_estimate(s.astype(np.float64), dst.astype(np.float64))
        np.testing.assert_allclose(m, ref.params[:2], atol=1e-4)


def test_umeyama_recovers_a_similarity_without_reflection():
    angle, scale, shift = 0.4, 0.37, np.array([12.0, -7.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = np.random.default_rng(1).uniform(0, 300, (1, 5, 2))
    dst = src[0] @ (scale * rot).T + shift
    m = umeyama(torch.tensor(src), torch.tensor(dst))
    np.testing.assert_allclose(m[0, :, :2].numpy(), scale * rot, atol=1e-5)
    np.testing.assert_allclose(m[0, :, 2].numpy(), shift, atol=1e-3)
    moved = apply_affine(m, torch.tensor(src, dtype=torch.float32))[0].numpy()
    np.testing.assert_allclose(moved, dst, atol=1e-3)
    assert torch.det(m[:, :, :2]).item() > 0


def test_the_arcface_template_is_insightfaces_published_one():
    """The 112-px points of insightface's ``arcface_dst`` (python-package/insightface/utils/face_align.py);
    crops from any other template would not be the ones ArcFace backbones were trained on."""
    published = [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
    np.testing.assert_allclose(template("arcface", 112), published, atol=1e-4)


def test_template_sizes():
    t112, t224 = template("arcface", 112), template("arcface", 224)
    # the 224 template is the 112 one at twice the scale
    np.testing.assert_allclose(t224 - t224.mean(0), 2 * (t112 - t112.mean(0)), atol=1e-4)
    assert (t224 > 0).all() and (t224 < 224).all()
    with pytest.raises(ValueError, match="arcface"):
        template("nope")


def test_warp_matches_scikit_image():
    rng = np.random.default_rng(2)
    frame = (rng.uniform(0, 1, (1, 90, 120, 3)) * 255).astype(np.uint8)
    m = torch.tensor([[[0.8, -0.2, 5.0], [0.2, 0.8, -10.0]]])
    ours = warp(torch.from_numpy(frame), m, 64)[0].numpy().astype(float)
    full = np.vstack([m[0].numpy(), [0, 0, 1]])
    ref = sk_warp(frame[0], np.linalg.inv(full), output_shape=(64, 64), order=1, preserve_range=True)
    inside = ref.sum(-1) > 0
    assert inside.mean() > 0.5
    assert np.abs(ours - ref)[inside].mean() < 1.0


def test_warp_reads_only_what_the_crop_covers_and_matches_scikit_image_at_the_edges():
    rng = np.random.default_rng(3)
    frames = torch.from_numpy((rng.uniform(0, 1, (4, 200, 300, 3)) * 255).astype(np.uint8))
    a = torch.tensor([[0.5, -0.1], [0.1, 0.5]])
    # inside, across the left edge, across the bottom-right corner, wholly outside
    shifts = torch.tensor([[-60.0, -40.0], [10.0, -30.0], [-120.0, -80.0], [500.0, 0.0]])
    m = torch.cat([a.expand(4, 2, 2), shifts[:, :, None]], 2)
    ours = warp(frames, m, 64).numpy().astype(float)
    for k in range(3):
        full = np.vstack([m[k].numpy(), [0, 0, 1]])
        ref = sk_warp(frames[k].numpy(), np.linalg.inv(full), output_shape=(64, 64), order=1, preserve_range=True)
        inside = ref.sum(-1) > 0
        assert inside.mean() > 0.1 and np.abs(ours[k] - ref)[inside].mean() < 1.0, k
    assert ours[3].max() == 0 and (ours[1] == 0).any() and (ours[1] > 0).any()
    region = footprint(m, 64, (200, 300))
    assert (region[3, 2] - region[3, 0]) == 0  # nothing of the frame is read for the crop outside it
    assert ((region[:3, 2:] - region[:3, :2]) < [150, 150]).all()  # a part of the frame, not all of it


@pytest.mark.real_video
def test_real_faces_land_on_the_template(pyfeat_clips):
    from pipeline.vision.detect import FaceDetector
    from pipeline.vision.video import iter_chunks, open_video

    det = FaceDetector(min_face=40)
    lms, frames = [], []
    for name in ("single_face.mp4", "WolfgangLanger_Pexels.mp4"):
        vr, info = open_video(pyfeat_clips / name)
        (chunk,) = iter_chunks(vr, info, chunk=64, frames=np.linspace(0, info.n_frames - 1, 6).astype(int))
        found = det(chunk.frames)
        assert all(len(d) == 1 for d in found), name
        lms.append(np.stack([d.landmarks[0] for d in found]))
        frames.append(chunk.frames)
    lm = np.concatenate(lms)
    t112 = template("arcface", 112)

    # the eyes, which fix scale and rotation, land within 3 px; mouth and nose differ with face shape
    mats = umeyama(torch.from_numpy(lm), torch.from_numpy(t112))
    aligned = apply_affine(mats, torch.from_numpy(lm)).numpy()
    err = np.linalg.norm(aligned - t112, axis=-1)  # (b, 5)
    assert np.median(err[:, :2], axis=0).max() < 3.0
    assert np.median(err.mean(1)) < 4.0
    # no similarity transform does better: these residuals are scikit-image's least-squares optimum
    for p, e in zip(lm.astype(np.float64), err, strict=True):
        ref = SimilarityTransform.from_estimate(p, t112.astype(np.float64))
        np.testing.assert_allclose(e, np.linalg.norm(ref(p) - t112, axis=-1), atol=1e-2)

    # the crops really show the face there: a detector run on them finds the landmarks within 3 px.
    # The crop is widened so that the detector sees the whole head.
    wide = t112 + 56
    mats = umeyama(torch.from_numpy(lm), torch.from_numpy(wide))
    expect = apply_affine(mats, torch.from_numpy(lm)).numpy()
    for k, fr in enumerate(frames):
        rows = slice(6 * k, 6 * k + 6)
        crops = warp(torch.from_numpy(fr), mats[rows], 224).numpy()
        again = np.stack([d.landmarks[np.argmax(d.score)] for d in det(crops)])
        assert np.linalg.norm(again - expect[rows], axis=-1).mean() < 3.0

    crops = align_faces(frames[0], lms[0], 112)
    assert crops.shape == (6, 112, 112, 3) and crops.dtype == np.uint8 and crops.mean() > 30
