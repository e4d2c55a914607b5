"""Video splits for tests: the videos of a split without reading their labels, video lists, and
folds by recording (both people of a two-person video on the same side)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.labels import _check_split, _resolve, _task_files, load_annotations


def split_videos(root: str | Path, split: str, fmt: str = "auto") -> list[str]:
    """Names of the videos of ``split``; for the per-task layout without reading the files."""
    _check_split(split)
    root, fmt = _resolve(root, fmt)
    if fmt == "abaw_tasks":
        return sorted(set().union(*(f.keys() for f in _task_files(root, split).values())))
    return sorted(load_annotations(root, split, fmt))


def read_video_list(source: str | Path | Sequence[str]) -> list[str]:
    """Video names from a config list, or a text file with one name per line (``#`` comments)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: video list not found")
        names = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    else:
        names = [str(s).strip() for s in source]
    names = [n for n in names if n]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"video list names {', '.join(dup[:5])} more than once")
    return names


def recording_of(video: str) -> str:
    """The recording a video entry comes from: both people of a two-person video share one."""
    for side in ("_left", "_right"):
        if video.endswith(side):
            return video[: -len(side)]
    return video


def folds(videos: Sequence[str], k: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """``k`` (train, val) pairs splitting ``videos`` by recording, each video in exactly one val.

    Both people of a two-person video stay on the same side. Recordings are shuffled with
    ``seed`` and dealt to the fold with the fewest videos so far, so fold sizes differ little.
    """
    groups: dict[str, list[str]] = {}
    for v in sorted(set(videos)):
        groups.setdefault(recording_of(v), []).append(v)
    if not 2 <= k <= len(groups):
        raise ValueError(f"cannot make {k} folds from {len(groups)} recordings; need 2 <= k <= {len(groups)}")
    order = list(groups)
    np.random.default_rng(seed).shuffle(order)
    bins: list[list[str]] = [[] for _ in range(k)]
    for rec in sorted(order, key=lambda r: -len(groups[r])):  # stable: ties keep the shuffled order
        min(bins, key=len).extend(groups[rec])
    return [(sorted(v for j, b in enumerate(bins) if j != i for v in b), sorted(bins[i])) for i in range(k)]
