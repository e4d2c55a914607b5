"""HSEmotion's networks against the original package: a network built as HSEmotion trains it
(a timm EfficientNet whose classifier is replaced), random weights saved in the published format
(``torch.save(model)``), converted once to a state dict, gives the features, expression
probabilities and valence/arousal that ``hsemotion.HSEmotionRecognizer`` computes from the
published file, within 1e-5."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from features import build_extractor
from features.hsemotion import NETWORKS


def published(name: str, path: Path) -> None:
    """Random weights in the published layout: the whole module pickled, as HSEmotion's training
    notebooks build it (``timm.create_model``, then ``model.classifier = Linear(features, outputs)``)."""
    import timm

    arch, _, classes, va = NETWORKS[name]
    torch.manual_seed(len(name))
    model = timm.create_model(arch, pretrained=False)
    model.classifier = torch.nn.Linear(model.classifier.in_features, len(classes) + 2 * va)
    for m in model.modules():  # BatchNorm statistics away from 0/1, so that they matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.eval(), path)


@pytest.mark.parametrize("name", ["enet_b0_8_va_mtl", "enet_b2_8"])
def test_features_probabilities_and_va_equal_the_original_package(name: str, tmp_path: Path, monkeypatch,
                                                                 capsys) -> None:
    import hsemotion.facial_emotions as original

    from pipeline import convert

    home = tmp_path / "home"
    pt = home / ".hsemotion" / f"{name}.pt"  # where hsemotion looks for it before downloading
    published(name, pt)
    converted = tmp_path / f"{name}.safetensors"
    assert convert.main(["hsemotion", str(pt), str(converted)]) == 0  # python -m pipeline.convert hsemotion
    said = capsys.readouterr().out
    assert "no other code ran" in said and "EfficientNet" in said
    ours = build_extractor(name, weights=str(converted))

    monkeypatch.setenv("HOME", str(home))
    load = torch.load  # the package's own torch.load(path) of its published file, trusted here: we wrote it
    monkeypatch.setattr(original.torch, "load", lambda *a, **k: load(*a, **{**k, "weights_only": False}))
    theirs = original.HSEmotionRecognizer(model_name=name, device="cpu")

    size = ours.input_size
    crops = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    want_features = theirs.extract_multi_features(list(crops))
    _, want_scores = theirs.predict_multi_emotions(list(crops), logits=False)
    with torch.inference_mode():
        x = ours.preprocess(torch.from_numpy(crops))
        features = ours(x)
        heads = ours.heads(features)
    np.testing.assert_allclose(features.numpy(), want_features, atol=1e-5, rtol=1e-5)
    k = len(ours.classes)
    assert list(ours.classes) == [theirs.idx_to_class[i] for i in range(k)]
    np.testing.assert_allclose(heads["expr"].numpy(), want_scores[:, :k], atol=1e-5, rtol=1e-5)
    assert ("va" in heads) == theirs.is_mtl
    if theirs.is_mtl:
        np.testing.assert_allclose(heads["va"].numpy(), want_scores[:, k:], atol=1e-5, rtol=1e-5)
    assert ours.dim == {"tf_efficientnet_b0": 1280, "tf_efficientnet_b2": 1408}[NETWORKS[name][0]]


def test_a_published_pickle_is_refused_until_converted_and_a_foreign_one_is_not_converted(tmp_path: Path) -> None:
    import subprocess
    import sys

    from features import hsemotion

    pt = tmp_path / "enet_b0_8_best_afew.pt"
    published("enet_b0_8_best_afew", pt)
    with pytest.raises(ValueError, match=r"a whole pickled module .*python -m pipeline.convert hsemotion") as refused:
        build_extractor("enet_b0_8_best_afew", weights=str(pt))
    assert "\n" not in str(refused.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.nn.Linear(2, 2), "hook": os.system}, foreign)
    with pytest.raises(ValueError, match=r"needs (posix|nt).system, which is not a torch or timm module class"):
        hsemotion.convert(foreign, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    done = subprocess.run([sys.executable, "-m", "pipeline.convert", "hsemotion", str(foreign), str(tmp_path / "o")],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1


def test_zero_shot_prediction_of_a_real_clip_writes_expressions_and_va(pyfeat_clips: Path, tmp_path: Path) -> None:
    """`make predict VIDEO=<clip> ZERO_SHOT=enet_b0_8_va_mtl` (random weights here, the user's file
    in practice): expression and VA columns from the network's heads, AUs empty; the heads stored
    with the features are the network's on the face file's own crops."""
    import csv

    import h5py
    from safetensors.torch import save_file

    from pipeline import predict
    from pipeline.config import load_config

    name = "enet_b0_8_va_mtl"
    pt, weights = tmp_path / f"{name}.pt", tmp_path / f"{name}.safetensors"
    published(name, pt)
    save_file(torch.load(pt, weights_only=False).state_dict(), str(weights))  # our own file: trusted here
    out = tmp_path / "out"
    clip = pyfeat_clips / "single_face.mp4"
    assert predict.main(load_config("predict", overrides=[
        f"video={clip}", f"out_dir={out}", f"zero_shot={name}", f"extractor_weights.{name}={weights}",
        "smooth=1"])) == 0
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    with h5py.File(out / "faces" / "single_face.h5", "r") as f:
        present, crops = f["present"][:], f["crops_224"][:]  # the network's own size, not 112 upscaled
    with h5py.File(out / "features" / f"{name}.h5", "r") as f:
        stored_va, stored_p = f["single_face"]["valence_arousal"][:], f["single_face"]["probabilities"][:]
    assert len(rows) == len(present) and present.mean() > 0.9
    assert all(r["valence"] and r["arousal"] and r["expression"] and not r["AU1"] for r in rows)
    net = build_extractor(name, weights=str(weights))
    with torch.inference_mode():
        heads = net.heads(net(net.preprocess(torch.from_numpy(crops[present][:4]))))
    np.testing.assert_allclose(stored_va[present][:4], heads["va"].numpy(), atol=1e-5)
    np.testing.assert_allclose(stored_p[present][:4], heads["expr"].numpy(), atol=1e-5)
    # unsmoothed (smooth=1): each ABAW class is the network's class of that name, Contempt is Other
    k = int(np.flatnonzero(present)[0])
    for abaw, theirs in (("Other", "Contempt"), ("Happiness", "Happiness"), ("Neutral", "Neutral")):
        assert float(rows[k][f"p_{abaw}"]) == pytest.approx(stored_p[k, list(net.classes).index(theirs)], abs=1e-5)
    assert float(rows[k]["valence"]) == pytest.approx(float(np.clip(stored_va[k, 0], -1, 1)), abs=1e-5)
