"""Every user error is one ``error:`` line and exit status 1, found before any work starts; a value
outside a key's choices is refused naming the key, the value and the choices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models import STRUCTURES
from pipeline import evaluate, faces, features, predict, train
from pipeline.cli import run_stage
from pipeline.config import ConfigError, check_choices, load_config
from tests.synthetic import learnable_set, write_cache

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"train": train, "faces": faces, "features": features, "predict": predict, "evaluate": evaluate}


def one_line_error(stage: str, *argv: str) -> str:
    """Run ``python -m pipeline.<stage> argv`` in this process; its exit must be one ``error:`` line,
    status 1 (a string given to SystemExit is printed and exits 1)."""
    with pytest.raises(SystemExit) as done:
        run_stage(stage, STAGES[stage].main, list(argv))
    message = done.value.code
    assert isinstance(message, str), f"exit status {message!r}, not an error line"
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    return message


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return learnable_set(tmp_path_factory.mktemp("syn"), frames=32)


def syn_args(syn: dict[str, Path]) -> list[str]:
    return [f"runs_dir={syn['runs']}", "data.name=syn", f"data.annotations={syn['annotations']}", "extractors=[syn]"]


# Each stage's keys with a set of values, a wrong value of each, and the words the refusal must hold.
WRONG = [
    ("train", "schedule=cosin", "'schedule' = 'cosin': choose one of cosine, linear, constant"),
    ("train", "loss.expr_class_weights=Auto", "'loss.expr_class_weights' = 'Auto': choose one of auto, none"),
    ("train", "loss.au_pos_weight=balanced", "'loss.au_pos_weight' = 'balanced'"),
    ("train", "loss.va=mae", "'loss.va' = 'mae': choose one of ccc, mse"),
    ("train", "loss.weighting=learned", "'loss.weighting' = 'learned': choose one of fixed, uncertainty"),
    ("train", "model.structure=shard",
     "'model.structure' = 'shard': choose one of amtl, cross_attention, feedback, shared, task_specific"),
    ("train", "model.structure=cross_attention model.au_graph=cooc",
     "'model.au_graph' = 'cooc': choose one of null, learned, cooccurrence"),
    ("train", "model.tasks=[va,exp]", "'model.tasks' = 'exp': choose one of va, expr, au"),
    ("train", "data.format=abaw5", "'data.format' = 'abaw5'"),
    ("train", "device=gpu", "'device' = 'gpu': choose cpu, cuda, cuda:<index> or mps"),
    ("train", "optimizer=sgd", "'optimizer' = 'sgd': choose one of adamw, adam"),
    ("train", "schedule_unit=batch", "'schedule_unit' = 'batch': choose one of step, epoch"),
    ("train", "selection=best", "'selection' = 'best': choose one of p_mtl, per_task"),
    ("train", "train_windows=sliding", "'train_windows' = 'sliding': choose one of overlapping, consecutive"),
    ("train", "eval_windows=chunks", "'eval_windows' = 'chunks'"),
    ("train", "batches=clips", "'batches' = 'clips': choose one of windows, videos"),
    ("train", "clip_groups=layer", "'clip_groups' = 'layer': choose one of whole, task"),
    ("train", "init=xavier", "'init' = 'xavier': choose one of default, normal"),
    ("train", "loss.au=focal", "'loss.au' = 'focal': choose one of bce, asymmetric"),
    ("train", "loss.au_weight=auto", "'loss.au_weight' = 'auto': choose one of none, inverse_positive"),
    ("train", "loss.expr_reduction=sum", "'loss.expr_reduction' = 'sum': choose one of weighted_mean, mean"),
    ("train", "model.va_output=sigmoid", "'model.va_output' = 'sigmoid': choose one of tanh, linear"),
    ("train", "model.head_activation=silu", "'model.head_activation' = 'silu': choose one of gelu, relu"),
    ("train", "model.structure=feedback model.feedback_sources=[valence,v]",
     "'model.feedback_sources' = 'v': choose one of valence"),
    ("train", "model.structure=feedback model.feedback_targets=[a]", "'model.feedback_targets' = 'a'"),
    ("train", "model.structure=feedback model.feedback_from=logits",
     "'model.feedback_from' = 'logits': choose one of branch, head"),
    ("train", "encoder=transformer encoder.norm=mid", "'encoder.norm' = 'mid': choose one of pre, post"),
    ("train", "encoder=transformer encoder.activation=tanh", "'encoder.activation' = 'tanh'"),
    ("train", "data.expressions=basic6", "'data.expressions' = 'basic6': choose one of abaw8, basic7"),
    ("train", "stages=[[au],[exp]]", "'stages' = [['au'], ['exp']]: each stage a non-empty list of the model's tasks"),
    ("faces", "subject=middle", "'subject' = 'middle': choose one of auto, main, left, right"),
    ("faces", "template=vgg", "'template' = 'vgg': choose one of arcface"),
    ("faces", "compression=zip", "'compression' = 'zip': choose one of gzip, lzf, "),
    ("faces", "device=cuda1", "'device' = 'cuda1'"),
    ("features", "dtype=float64", "'dtype' = 'float64': choose one of float16, float32"),
    ("predict", "subject=auto", "'subject' = 'auto': choose one of main, left, right"),
    ("evaluate", "split=test", "'split' = 'test': choose one of train, val"),
    ("evaluate", "format=abaw9", "'format' = 'abaw9'"),
]


@pytest.mark.parametrize(("stage", "override", "words"), WRONG, ids=[w[1] for w in WRONG])
def test_a_value_outside_its_choices_is_refused_before_any_work(stage: str, override: str, words: str,
                                                                 tmp_path: Path) -> None:
    # every input points nowhere: the choice must be refused before anything is read
    nowhere = {"train": ["data.annotations=/no/labels", "runs_dir=/no/runs"],
               "faces": ["videos=/no/videos", f"out_dir={tmp_path / 'faces'}"],
               "features": ["faces_dir=/no/faces", f"out_dir={tmp_path / 'features'}"],
               "predict": ["video=/no/clip.mp4", "checkpoint=/no/best.pt"],
               "evaluate": ["predictions=/no/predictions"]}[stage]
    message = one_line_error(stage, *nowhere, *override.split(" "))
    assert words in message
    assert not (tmp_path / "faces").exists() and not (tmp_path / "features").exists()


def test_every_declared_choice_names_a_key_of_its_stage_config() -> None:
    # a CHOICES entry for a key that no longer exists would check nothing; a structure's options are
    # in the config when it is the one chosen
    for stage, module in STAGES.items():
        variants = [[]] if stage != "train" else [["encoder=transformer", f"model.structure={s}"] for s in STRUCTURES]
        configs = [load_config(stage, overrides=v) for v in variants]
        for key in module.CHOICES:
            def has(cfg, key=key) -> bool:
                node = cfg
                for part in key.split("."):
                    if part not in node:
                        return False
                    node = node[part]
                return True
            assert any(has(cfg) for cfg in configs), f"{stage}: CHOICES names {key!r}, which its config lacks"
        for cfg in configs:
            check_choices(cfg, module.CHOICES)  # and the shipped defaults are among the choices


def test_choices_are_exact() -> None:
    check = lambda value: check_choices({"k": value}, {"k": ("auto", "none", None)})
    check("auto"), check(None)
    for wrong in ("Auto", "auto ", 0, False, ["auto", "Auto"]):
        with pytest.raises(ConfigError, match="'k'"):
            check(wrong)


@pytest.mark.parametrize("extractor", ["iresnet18", "onet"])
def test_missing_weights_file(extractor: str, tmp_path: Path) -> None:
    message = one_line_error("features", f"extractor={extractor}", "extractor.weights=/no/such.pth",
                             f"faces_dir={tmp_path}", f"out_dir={tmp_path / 'out'}")
    assert "weights file /no/such.pth not found" in message
    assert not (tmp_path / "out").exists()


def test_missing_feature_cache(syn: dict[str, Path]) -> None:
    message = one_line_error("train", *syn_args(syn), "extractors=[iresnet50]")
    assert f"{syn['runs'] / 'syn' / 'features' / 'iresnet50.h5'}: no feature cache" in message


def test_feature_cache_of_another_extractor(syn: dict[str, Path], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_cache(runs / "syn" / "features" / "iresnet50.h5", {"v": (np.zeros((3, 4)), np.ones(3, bool))})
    (runs / "syn" / "features" / "iresnet50.h5").rename(runs / "syn" / "features" / "onet.h5")
    message = one_line_error("train", *syn_args(syn), f"runs_dir={runs}", "extractors=[onet]")
    assert "onet.h5: written by extractor 'iresnet50', not 'onet'" in message


def test_missing_annotations(syn: dict[str, Path], tmp_path: Path) -> None:
    message = one_line_error("train", *syn_args(syn), f"data.annotations={tmp_path}")
    assert f"{tmp_path}: no annotation files" in message


def test_labels_of_other_videos_than_the_features(syn: dict[str, Path], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_cache(runs / "syn" / "features" / "syn.h5", {"elsewhere": (np.zeros((3, 4)), np.ones(3, bool))})
    message = one_line_error("train", *syn_args(syn), f"runs_dir={runs}")
    assert "no train video has both labels" in message and "syn.h5" in message


def test_predict_before_any_training(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0")
    message = one_line_error("predict", f"video={clip}", f"checkpoint={tmp_path / 'train' / 'gru' / 'best.pt'}")
    assert "best.pt" in message and "train a model first" in message


def test_predict_a_missing_video(tmp_path: Path) -> None:
    message = one_line_error("predict", f"video={tmp_path / 'gone.mp4'}", "checkpoint=x.pt")
    assert "gone.mp4" in message and "no such file" in message


def test_predict_with_a_file_that_is_no_checkpoint(tmp_path: Path) -> None:
    clip, bad = tmp_path / "clip.mp4", tmp_path / "best.pt"
    clip.write_bytes(b"\0")
    bad.write_text("not a checkpoint")
    message = one_line_error("predict", f"video={clip}", f"checkpoint={bad}")
    assert f"{bad}: not a usable checkpoint" in message


def test_evaluate_missing_predictions(tmp_path: Path) -> None:
    assert str(tmp_path / "none") in one_line_error("evaluate", f"predictions={tmp_path / 'none'}")


def test_an_option_of_another_structure_is_one_line_before_any_data_is_read() -> None:
    message = one_line_error("train", "data.annotations=/no/labels", "runs_dir=/no/runs", "model.structure=shared",
                             "model.au_neighbours=8")
    assert message == "error: config key 'model.au_neighbours' is an option of model.structure amtl, not of 'shared'"


class NeedsWidth:
    """A plug-in encoder whose ``width`` has no default."""

    def __init__(self, d_in: int, width: int) -> None:
        self.out_dim = width


def needs_weights(weights: str, size: int = 112) -> None:
    """A plug-in extractor's factory whose weights file must be given."""


def test_a_plug_in_that_cannot_be_used_is_one_line(tmp_path: Path) -> None:
    here = f"{__name__}"
    for args, said in [
        (["encoder=no_such_package.encoders:Enc"],
         "error: encoder plug-in 'no_such_package.encoders:Enc' cannot be imported: ModuleNotFoundError: "
         "No module named 'no_such_package'"),
        ([f"encoder={here}:Gone"], f"error: encoder plug-in '{here}:Gone': module '{here}' has no attribute 'Gone'"),
        ([f"encoder={here}:NeedsWidth"], f"error: encoder plug-in '{here}:NeedsWidth' needs encoder.width=..."),
        ([f"encoder={here}:NeedsWidth", "encoder.widht=3"],
         "error: unknown config key 'encoder.widht'; did you mean encoder.width?"),
    ]:
        assert one_line_error("train", "data.annotations=/no/labels", "runs_dir=/no/runs", *args) == said
    message = one_line_error("features", f"extractor={here}:needs_weights", f"faces_dir={tmp_path}",
                             f"out_dir={tmp_path / 'out'}")
    assert message == f"error: extractor plug-in '{here}:needs_weights' needs extractor.weights=..."
    assert not (tmp_path / "out").exists()


def test_unknown_experiment_lists_the_known_ones() -> None:
    message = one_line_error("train", "experiment=mtl_grus")
    assert "unknown experiment 'mtl_grus'" in message and "mtl_gru" in message


def test_a_missing_faces_folder_is_a_user_error(tmp_path: Path) -> None:
    message = one_line_error("features", f"faces_dir={tmp_path / 'gone'}", f"out_dir={tmp_path / 'out'}")
    assert f"{tmp_path / 'gone'}: no such folder" in message
    assert not (tmp_path / "out").exists()


def test_a_missing_videos_folder_is_a_user_error(tmp_path: Path) -> None:
    message = one_line_error("faces", f"videos={tmp_path / 'gone'}", f"out_dir={tmp_path / 'out'}", "data.annotations=")
    assert f"{tmp_path / 'gone'}: no such folder" in message
    assert not list((tmp_path / "out").glob("*.h5"))


# Per stage, a misspelled key and a value outside its choices, given to the real command; every input
# points nowhere. The features stage's misspelled key is tests/test_bad_inputs.py's.
COMMAND_LINE = [
    ("faces", "batchsize=8", "error: unknown config key 'batchsize'; did you mean batch_size"),
    ("faces", "subject=middle", "error: config key 'subject' = 'middle': choose one of auto, main, left, right"),
    ("features", "dtype=float64", "error: config key 'dtype' = 'float64': choose one of float16, float32"),
    ("train", "batchsize=8", "error: unknown config key 'batchsize'; did you mean batch_size"),
    ("train", "schedule=cosin", "error: config key 'schedule' = 'cosin': choose one of cosine, linear, constant"),
    ("evaluate", "splits=val", "error: unknown config key 'splits'; did you mean split"),
    ("evaluate", "split=test", "error: config key 'split' = 'test': choose one of train, val"),
    ("predict", "smoth=3", "error: unknown config key 'smoth'; did you mean smooth"),
    ("predict", "subject=auto", "error: config key 'subject' = 'auto': choose one of main, left, right"),
]


@pytest.mark.parametrize(("stage", "override", "line"), COMMAND_LINE, ids=[f"{c[0]}-{c[1]}" for c in COMMAND_LINE])
def test_the_process_prints_one_line_and_exits_1_before_loading_data(stage: str, override: str, line: str,
                                                                    tmp_path: Path) -> None:
    nowhere = {"faces": ["videos=/no/videos", f"out_dir={tmp_path / 'out'}"],
               "features": ["faces_dir=/no/faces", f"out_dir={tmp_path / 'out'}"],
               "train": ["data.annotations=/no/labels", f"runs_dir={tmp_path / 'runs'}"],
               "evaluate": ["predictions=/no/predictions", f"output={tmp_path / 'out' / 'scores.json'}"],
               "predict": ["video=/no/clip.mp4", "checkpoint=/no/best.pt", f"out_dir={tmp_path / 'out'}"]}[stage]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", *nowhere, override], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 1, done.stderr[-2000:]
    (said,) = done.stderr.strip().splitlines()
    assert said.startswith(line), said
    assert not list(tmp_path.iterdir())
