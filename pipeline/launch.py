"""Training runs started as processes of their own, the way a scheduler starts them: a sweep or a
benchmark runs ``python -m pipeline.train`` with a config file and overrides, and finds the run's
results in the folder its identity names (:func:`pipeline.identity.run_folder`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from pipeline.config import ROOT


def train_command(config: str | None, overrides: list[str]) -> list[str]:
    """The command line that trains the run of ``config`` (or ``configs/train.yaml``) with ``overrides``."""
    return [sys.executable, "-m", "pipeline.train", *([config] if config else []), *overrides]


def train_process(config: str | None, overrides: list[str], env: Mapping[str, str] | None = None,
                  log: Path | None = None) -> int:
    """Train one run in a child process and return its exit status (0 done or done before, 1 a
    user error, 2 its folder could not be used). The child's output goes where this process's
    goes, or to the file ``log``; it finds this package first on its path, and inherits the
    environment (the user's config folder included) with ``env`` on top."""
    child = {**os.environ, **(env or {})}
    child["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), child.get("PYTHONPATH")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    if log is None:
        return subprocess.run(train_command(config, overrides), env=child).returncode
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        done = subprocess.run(train_command(config, overrides), env=child, stdout=out, stderr=subprocess.STDOUT)
    return done.returncode
