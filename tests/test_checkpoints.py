"""Checkpoints are safe to share: they hold tensors and plain data, load without running code, and
predict refuses extractor weights other than the ones the model was trained on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import facenet_pytorch
import numpy as np
import pytest
import torch

from features.base import sha256_file
from models import MultiTaskModel
from pipeline import predict
from pipeline.config import InputError, load_config
from pipeline.inference import UnsafeCheckpoint, check_plain, load_checkpoint, save_checkpoint

ONET = Path(facenet_pytorch.__file__).parent / "data" / "onet.pt"


class RunsCode:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def small_checkpoint(path: Path, **extra) -> Path:
    torch.manual_seed(0)
    model = MultiTaskModel(16, {"name": "gru", "hidden": 8, "layers": 1}, tasks=("va", "expr", "au"))
    save_checkpoint(path, model, extractors=["onet"], window=8, eval_stride=4, **extra)
    return path


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    good = torch.load(small_checkpoint(tmp_path / "good.pt"), weights_only=True)
    torch.save({**good, "note": RunsCode(marker)}, tmp_path / "bad.pt")
    with pytest.raises(UnsafeCheckpoint) as e:
        load_checkpoint(tmp_path / "bad.pt")
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "bad.pt") in message and "would run code" in message
    assert "open" in message, "the message names what the file wanted to call"
    assert not marker.exists(), "loading must not have run the pickled call"

    # and on the command line: one error line, exit 1, still nothing run
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0")
    done = subprocess.run([sys.executable, "-m", "pipeline.predict", f"video={video}",
                           f"checkpoint={tmp_path / 'bad.pt'}", f"out_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "bad.pt: refused" in lines[-1]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_what_training_saves_loads_as_plain_data(tmp_path: Path) -> None:
    path = small_checkpoint(tmp_path / "best.pt", normaliser={"mean": [0.0] * 16, "std": [1.0] * 16},
                            au_thresholds=[0.5] * 12, history=[{"epoch": 0, "val": {"p_mtl": 1.0}}])
    ckpt = torch.load(path, weights_only=True)
    model, again = load_checkpoint(path)
    assert again["au_thresholds"] == ckpt["au_thresholds"] and model.tasks == ("va", "expr", "au")


def test_saving_anything_but_plain_data_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"checkpoint\.normaliser\.mean: numpy\.ndarray is not a tensor"):
        small_checkpoint(tmp_path / "x.pt", normaliser={"mean": np.zeros(16), "std": [1.0] * 16})
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(TypeError, match=r"checkpoint\.history\[1\]: pathlib\.\w*Path"):
        check_plain({"history": [1, Path("x")]})


@pytest.fixture
def recorded(tmp_path: Path) -> dict:
    """A checkpoint whose onet features came from a copy of ONet's weights at a path of its own."""
    copy = tmp_path / "trained" / "onet.pt"
    copy.parent.mkdir()
    shutil.copy(ONET, copy)
    return {"extractors": ["onet"],
            "stage_configs": {"features:onet": {"extractor": {"name": "onet", "weights": str(copy)}}},
            "feature_attrs": [{"extractor": "onet", "weights_sha256": sha256_file(copy), "weights_file": "onet.pt"}],
            "copy": copy}


def weights_for(recorded: dict, *overrides: str) -> dict[str, str]:
    return predict.extractor_weights(load_config("predict", overrides=list(overrides)), recorded)


def test_predict_uses_the_recorded_weights_or_a_byte_identical_copy(recorded: dict, tmp_path: Path) -> None:
    assert weights_for(recorded) == {"onet": str(recorded["copy"])}
    mine = tmp_path / "elsewhere" / "my_onet.pt"
    mine.parent.mkdir()
    shutil.copy(ONET, mine)
    assert weights_for(recorded, f"extractor_weights.onet={mine}") == {"onet": str(mine)}


def test_other_or_missing_extractor_weights_are_refused(recorded: dict, tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    state = torch.load(ONET, weights_only=True)
    state["dense5.bias"] = state["dense5.bias"] + 1e-3  # one layer retrained a little
    torch.save(state, other)
    with pytest.raises(InputError) as e:
        weights_for(recorded, f"extractor_weights.onet={other}")
    message = str(e.value)
    assert "\n" not in message and str(other) in message and "refused" in message
    assert sha256_file(other)[:16] in message and sha256_file(ONET)[:16] in message

    recorded["copy"].unlink()
    with pytest.raises(InputError, match=r"onet weights .*trained/onet\.pt not found.*extractor_weights\.onet="):
        weights_for(recorded)
    with pytest.raises(InputError, match=r"extractor_weights: iresnet50 not among the checkpoint's extractors"):
        weights_for(recorded, f"extractor_weights.iresnet50={ONET}")
