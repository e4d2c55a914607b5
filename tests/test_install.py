"""The project installed as a package (not editable) into a fresh environment works away from the
source tree: its configs come from the package data and its commands run on a real clip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import ROOT

SOURCES = ("pipeline", "features", "models", "configs", "pyproject.toml", "README.md")


@pytest.mark.slow
@pytest.mark.real_video
def test_a_non_editable_install_runs_affect_predict_on_a_real_clip(tmp_path: Path, pyfeat_clips: Path,
                                                                   fer_weights: Path) -> None:
    src = tmp_path / "src"
    for name in SOURCES:  # a copy, so that nothing can be imported from the checkout by accident
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                          if (ROOT / name).is_dir() else {}))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # the fresh environment borrows this one's installed dependencies (torch alone is gigabytes)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    fresh = Path(subprocess.run([venv / "bin" / "python", "-c", purelib], capture_output=True, text=True,
                                check=True).stdout.strip())
    (fresh / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--no-index", "--quiet", str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.rmtree(src)  # the installed package must stand on its own

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "AFFECT_WEIGHTS_DIR": str(fer_weights.parents[1])}
    env.pop("PYTHONPATH", None)
    where = subprocess.run([venv / "bin" / "python", "-c", "import pipeline.config as c; print(c.__file__); "
                            "print(c.CONFIG_DIR); print(c.CHECKOUT)"], cwd=work, env=env, capture_output=True,
                           text=True, check=True).stdout.split()
    assert where[0].startswith(str(fresh)) and where[1] == str(fresh / "pipeline" / "configs") and where[2] == "False"

    clip = pyfeat_clips / "single_face.mp4"
    done = subprocess.run([venv / "bin" / "affect-predict", f"video={clip}", f"out_dir={work / 'out'}"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no model for valence/arousal and action units" in done.stdout
    table = pd.read_csv(work / "out" / "predictions.csv")
    assert len(table) == 72 and table["p_Happiness"].iloc[24:67].mean() > 0.5
    assert (work / "out" / "timeline.png").is_file()
    assert not (work / ".cache").exists() and not (work / "runs").exists(), "nothing written beside the caller"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3])


@pytest.mark.slow
def test_a_plain_install_resolves_the_tested_stack(tmp_path: Path) -> None:
    """``pip install .`` without ``constraints.txt``, in a clean environment, chooses the stack the
    tests run on: the pinned facenet-pytorch and decord, torch and torchvision at the pinned versions or
    newer, numpy 2. (Unbounded, pip took facenet-pytorch 2.6.0, which pins torch < 2.3 and numpy < 2,
    and installed torch 2.2.2 with numpy 1.26.)"""
    import tomllib

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                           "--report", str(report), *dependencies], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    pinned = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    for name in ("facenet-pytorch", "decord"):
        assert chosen[name] == pinned[name], (name, chosen[name], pinned[name])
    for name in ("torch", "torchvision"):
        assert _version(chosen[name]) >= _version(pinned[name]), (name, chosen[name], pinned[name])
    assert _version(chosen["numpy"]) >= (2,), chosen["numpy"]
