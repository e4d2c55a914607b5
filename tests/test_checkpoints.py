"""Checkpoints are safe to share: they hold tensors and plain data, load without running code, and
predict refuses extractor weights other than the ones the model was trained on. One format, read
and written by ``pipeline.checkpoint`` alone; the flat layout written before it still loads and
predicts the same."""

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
from pipeline import checkpoint, predict
from pipeline.checkpoint import Checkpoint, Inference, ModelPart, Recipe, Resume, UnsafeCheckpoint, check_plain
from pipeline.config import InputError, load_config
from pipeline.data import Normaliser
from pipeline.inference import predict_features

ONET = Path(facenet_pytorch.__file__).parent / "data" / "onet.pt"


class RunsCode:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def small_checkpoint(path: Path, normaliser: dict | None = None, resume: Resume | None = None, **inference) -> Path:
    torch.manual_seed(0)
    model = MultiTaskModel(16, {"name": "gru", "hidden": 8, "layers": 1}, tasks=("va", "expr", "au"))
    checkpoint.save(path, Checkpoint(ModelPart.of(model), Recipe(extractors=["onet"]),
                                     Inference(normaliser=normaliser, window=8, eval_stride=4, **inference), resume))
    return path


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    good = torch.load(small_checkpoint(tmp_path / "good.pt"), weights_only=True)
    torch.save({**good, "note": RunsCode(marker)}, tmp_path / "bad.pt")
    with pytest.raises(UnsafeCheckpoint) as e:
        checkpoint.load(tmp_path / "bad.pt")
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
    resume = Resume(epoch=0, history=[{"epoch": 0, "val": {"p_mtl": 1.0}}], best=1.0, stale=0, task_best={},
                    task_epochs={}, loss_state={}, optimizer={}, scheduler={})
    path = small_checkpoint(tmp_path / "best.pt", normaliser={"mean": [0.0] * 16, "std": [1.0] * 16},
                            au_thresholds=[0.5] * 12, resume=resume)
    saved = torch.load(path, weights_only=True)  # plain data, in its four groups
    assert saved["format"] == checkpoint.FORMAT and {"model", "recipe", "inference", "resume"} <= set(saved)
    model, again = checkpoint.load(path)
    assert again.inference.au_thresholds == saved["inference"]["au_thresholds"] == [0.5] * 12
    assert again.resume == resume and model.tasks == ("va", "expr", "au")


LEGACY = Path(__file__).parent / "data" / "checkpoints_v1"


@pytest.mark.parametrize("run", ["shared_gru", "feedback_per_task"])
def test_a_checkpoint_in_the_flat_layout_loads_and_predicts_as_when_it_was_written(run: str) -> None:
    """Checkpoints written before the grouped format (every key at the top level, see
    ``tests/data/checkpoints_v1/README.md``) rebuild the same model, with the same per-task weights,
    normalisation and settings, and predict exactly the outputs recorded when they were written."""
    flat = torch.load(LEGACY / f"{run}_best.pt", weights_only=True)
    assert "format" not in flat and "model_args" in flat  # the old layout indeed
    model, ckpt = checkpoint.load(LEGACY / f"{run}_best.pt")
    assert ckpt.model.args == flat["model_args"] and ckpt.recipe.identity == flat["identity"]
    assert ckpt.recipe.extractors == flat["extractors"] == ["syn"] and ckpt.recipe.config == flat["config"]
    assert (ckpt.inference.window, ckpt.inference.eval_stride) == (flat["window"], flat["eval_stride"]) == (12, 6)
    assert ckpt.inference.au_thresholds == flat["au_thresholds"] and ckpt.inference.va_smoothing == flat["va_smoothing"]
    assert ckpt.resume.epoch == flat["epoch"] and ckpt.resume.history == flat["history"]
    assert isinstance(model, checkpoint.PerTaskModel) == (run == "feedback_per_task")
    recorded = np.load(LEGACY / "outputs.npz")
    out = predict_features(model, recorded["features"], recorded["present"],
                           Normaliser.from_state(ckpt.inference.normaliser), ckpt.inference.window,
                           ckpt.inference.eval_stride)
    for task in ("va", "expr", "au"):
        # bitwise on the machine that recorded them; another CPU model's fp32 kernels round the last
        # bit otherwise (6e-8 seen), while a wrong weight or normaliser is off by orders more
        np.testing.assert_allclose(out[task], recorded[f"{run}_{task}"], rtol=1e-5, atol=1e-6, err_msg=task)


def test_a_flat_last_checkpoint_resumes_its_loop(tmp_path: Path) -> None:
    """``last.pt`` in the flat layout holds the loop's state: it reads back as the resume group, and
    written again in the grouped format it reads the same."""
    flat = torch.load(LEGACY / "shared_gru_last.pt", weights_only=True)
    ckpt = checkpoint.read(LEGACY / "shared_gru_last.pt")
    assert ckpt.resume.optimizer["param_groups"] == flat["optimizer"]["param_groups"]
    assert ckpt.resume.scheduler == flat["scheduler"] and ckpt.resume.stale == flat["stale"]
    checkpoint.save(tmp_path / "last.pt", ckpt)
    again = checkpoint.read(tmp_path / "last.pt")
    assert again.resume.history == ckpt.resume.history and again.recipe == ckpt.recipe
    for key, value in ckpt.model.state_dict.items():
        assert torch.equal(again.model.state_dict[key], value)


def test_saving_anything_but_plain_data_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"checkpoint\.inference\.normaliser\.mean: numpy\.ndarray is not a tensor"):
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
    recipe = Recipe(**{k: v for k, v in recorded.items() if k != "copy"})
    return predict.extractor_weights(load_config("predict", overrides=list(overrides)), recipe)


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
