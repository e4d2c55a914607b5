"""The README's commands work as a newcomer types them: every command in a ```` ```bash ```` block
runs, in the README's order, in a copy of this checkout, after the README's own ``make demo``.

Blocks marked ```` ```bash long ```` hold the commands that take longer than a minute or two on the
built-in sample, need data or weights that are not here, or never end; :data:`LONG` names each of
them with its reason, and a command that moves there without being named fails the test. A
```` ```python ```` block whose first line is ``# <path>.py`` is a file the README asks you to write;
it is written into the copy first.

The copy runs on a smaller built-in sample (4 videos of 90 frames, one for validation) and trains 3
epochs where a run does not say otherwise, both given as a user's config folder
(``AFFECT_CONFIG_DIR``, :data:`SMALLER`), so that the commands run as typed in a few minutes; the
environment is this one's (``VENV=``), and fer's weights the ones ``make weights`` fetched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import CONFIG_DIR, ROOT

README = ROOT / "README.md"
BLOCK = re.compile(r"^```(bash long|bash|python)\n(.*?)^```", re.M | re.S)

# Every command of a `bash long` block, with why the test does not run it.
LONG = {
    "make test": "it is this test suite",
    "AFFECT_CONFIG_DIR=~/my_configs make train DATA=my_videos": "needs your own labelled videos",
    "make faces    DATA=affwild2 DEVICE=cuda": "needs Aff-Wild2 (licensed, not here) and a GPU",
    'make features DATA=affwild2 DEVICE=cuda EXTRACTOR=iresnet50 ARGS="extractor.weights=/ckpt/backbone.pth"':
        "needs Aff-Wild2, ArcFace weights and a GPU",
    "make train    DATA=affwild2 DEVICE=cuda EXTRACTOR=iresnet50 ENCODER=transformer": "needs Aff-Wild2 and a GPU",
    "make predict  VIDEO=new_clip.mp4 DEVICE=cuda CHECKPOINT=runs/affwild2/latest/transformer/best.pt":
        "needs a model trained on Aff-Wild2, and a GPU",
    "torchrun --standalone --nproc_per_node=4 -m pipeline.faces    data=affwild2 device=cuda": "needs 4 GPUs",
    "torchrun --standalone --nproc_per_node=4 -m pipeline.features data=affwild2 device=cuda extractor=iresnet50":
        "needs 4 GPUs and Aff-Wild2's faces",
    "torchrun --standalone --nproc_per_node=4 -m pipeline.train    data=affwild2 device=cuda extractors=[iresnet50]":
        "needs 4 GPUs and Aff-Wild2's features",
    'sbatch --array=0-7 --ntasks=2 --gpus-per-task=1 --wrap "srun python -m pipeline.faces data=affwild2 device=cuda"':
        "needs a Slurm cluster",
    "make sweep": "six trainings, about 7 minutes on the sample",
    'make sweep SWEEP="model.structure=shared,feedback lr=1e-3,3e-4 seed=0,1,2"': "twelve trainings",
    "make experiments": "eighteen trainings",
    "python -m pipeline.sweep experiment=mtl_gru,va_only seed=0,1,2 epochs=20": "six trainings",
    "tensorboard --logdir runs/sample/train": "a server that runs until stopped",
    "make train EXPERIMENT=zhang2022_transformer DATA=affwild2_mtl": "needs s-Aff-Wild2 and MAE/IResNet weights",
    "make reproduce RECIPE=zhang2022_transformer DATA=affwild2_mtl":
        "needs s-Aff-Wild2 and MAE/IResNet weights; hours on a GPU",
    'make train EXPERIMENT=zhang2022_transformer ARGS="epochs=2 extractors=[onet] cache_in_memory=true"':
        "the full-size transformer: minutes on this CPU, run by hand",
    "make bench DATA=affwild2 EXTRACTOR=mae_vit_base": "needs Aff-Wild2 and MAE weights",
    'make compare-init DATA=sample SEEDS=0,1,2 ARGS="epochs=5"': "fifteen trainings and three ensembles",
    "python -m pipeline.train experiment=mtl_gru init_from=runs/sample/latest/expr_only init_frozen=[encoder]":
        "needs a finished expr_only run",
    "make submit DATA=affwild2 TEST_DATA=affwild2_test LIST=CVPR_6th_ABAW_VA_test_set_example.txt OUT=sub/va.txt":
        "needs a run trained on Aff-Wild2, its test set's features and the organisers' sample file",
    "make submit TEST_DATA=affwild2_test LIST=MTL_Challenge_test_set_release.txt OUT=sub/mtl.txt LAYOUT=abaw_mtl "
    'RUNS="runs/affwild2_mtl/train/a runs/affwild2_mtl/train/b"':
        "needs two runs trained on s-Aff-Wild2, its test set's features and the organisers' list",
}
# The user's config folder the commands run with: a smaller sample, and fewer epochs for the runs
# that do not set their own (a recipe's epochs come from its file or the command, as typed).
SMALLER = {"sample.yaml": {"n_videos": 4, "n_frames": 90, "val_videos": 1}, "train.yaml": {"epochs": 3}}
# What a command must print besides exiting 0, where its output says it did its work.
PRINTS = {"make demo": "P_MTL", "make train": "Validation scores", "python -m pipeline.sweep": "Sweep over 3 runs",
          "make reproduce": "published (the paper's", "make predict": "written to",
          "python -m pipeline.features": "features: 4 done", "make submit": "submission: ",
          "python -m pipeline.submit --check": "a valid abaw_mtl submission"}


def blocks(kind: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(README.read_text()) if m.group(1) == kind]


def commands(kind: str) -> list[str]:
    """The commands of the README's blocks of ``kind``, without comments, in order."""
    lines = [line.split("  #", 1)[0].strip() for block in blocks(kind) for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def files() -> dict[str, str]:
    """The files the README shows: python blocks that start with ``# <path>.py``."""
    shown = {}
    for block in blocks("python"):
        first = block.splitlines()[0]
        if re.fullmatch(r"# [\w/]+\.py", first):
            shown[first[2:]] = block
    return shown


def test_the_long_commands_are_named_each_with_its_reason() -> None:
    marked = commands("bash long")
    assert marked and sorted(marked) == sorted(LONG), "a `bash long` command not named in LONG, or gone"
    assert all(LONG.values())
    assert "make demo" in commands("bash"), "the README's main command must run here"


def checkout_copy(dest: Path) -> Path:
    """The files of this checkout that git does not ignore (all but outputs and environments without
    git), with their times, so that Make finds the environment up to date."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    names = [n for n in listed.stdout.split("\0") if n] if listed.returncode == 0 else None
    if names is None:
        skip = shutil.ignore_patterns(".venv", ".cache", "runs", "data", ".git", "__pycache__")
        shutil.copytree(ROOT, dest, ignore=skip, copy_function=shutil.copy2)
        return dest
    for name in names:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.slow
def test_every_short_command_of_the_readme_runs_as_typed(tmp_path: Path, fer_weights: Path) -> None:
    work = checkout_copy(tmp_path / "checkout")
    configs = tmp_path / "my_configs"
    configs.mkdir()
    for name, changes in SMALLER.items():
        shipped = yaml.safe_load((CONFIG_DIR / name).read_text())
        (configs / name).write_text(yaml.safe_dump({**shipped, **changes}, sort_keys=False))
    for path, text in files().items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text(text)
    venv = Path(sys.executable).parents[1]
    env = {**os.environ, "AFFECT_CONFIG_DIR": str(configs), "VENV": str(venv),
           "AFFECT_WEIGHTS_DIR": str(fer_weights.parents[1]), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1"}
    env.pop("MAKEFLAGS", None)
    ran = []
    for command in commands("bash"):
        tick = time.perf_counter()
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        print(f"{time.perf_counter() - tick:6.1f} s  {command}")
        said = done.stdout + done.stderr
        assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{said[-3000:]}"
        assert "Nothing to be done" not in said, f"`{command}` did nothing"
        words = next((w for start, w in PRINTS.items() if command.startswith(start)), None)
        assert words is None or words in said, f"`{command}` did not print {words!r}:\n{said[-2000:]}"
        ran.append(command)
    assert len(ran) >= 7, ran
