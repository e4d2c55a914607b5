"""Outputs that appear whole or not at all: every file or folder a stage writes is made under a
temporary name beside its place and renamed there once complete, so a killed run never leaves
anything a reader takes as finished."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline")

PARTIAL = re.compile(r"\.(?P<pid>\d+)~(?P<host>[^~/]+)\.partial$")  # what atomic_output names


def _partial(path: Path, what: str = "") -> Path:
    return path.with_name(f".{path.name}{what}.{os.getpid()}~{socket.gethostname()}.partial")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    The block writes a file there or makes a folder; a folder replaces an older one whole (the
    old one is moved aside, then removed). A killed or failed writer leaves at most a
    ``.partial`` file or folder, which no reader takes as done and :func:`sweep_partials` removes
    once its writer is gone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(path)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir() and not path.is_symlink():
            old = _partial(path, ".old")
            path.rename(old)
            tmp.rename(path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    return True


def sweep_partials(folder: str | Path) -> int:
    """Delete the ``.partial`` files and folders under ``folder`` whose writer, a process on this
    host, is gone (killed runs leave them; one can be as large as what it was becoming). Those of
    live processes and of other hosts sharing the folder are left alone. Returns how many went."""
    host, gone = socket.gethostname(), 0
    for p in sorted(Path(folder).rglob(".*.partial")):
        m = PARTIAL.search(p.name)
        if m and m["host"] == host and not _alive(int(m["pid"])) and os.path.lexists(p):
            _remove(p)
            gone += 1
    if gone:
        log.info("%s: removed %d temporary files left by killed runs", folder, gone)
    return gone


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old file or the new one."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def _json_ready(value: Any) -> Any:
    """``value`` with NaN and infinities as ``null``: JSON has no NaN, and strict readers refuse it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as strict JSON (NaN, an undefined score, becomes ``null``), atomically."""
    write_text(path, json.dumps(_json_ready(data), indent=2, sort_keys=False, allow_nan=False) + "\n")
