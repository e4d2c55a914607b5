"""The pipeline as a Python library, for notebooks and scripts::

    from pipeline import api

    track = api.detect_faces("clip.mp4")              # faces stage: detections and aligned crops
    feats = api.extract(track, "fer_xception")        # features stage: (n, 128), NaN rows without a face
    table = api.predict("clip.mp4")                   # a pandas DataFrame, the columns of predictions.csv
    model, contents = api.load("runs/.../best.pt")    # a trained model and what its checkpoint holds

Each call runs the stage's own code with its config (the YAMLs in ``configs/``, ``settings``
overriding keys as ``key=value`` does on the command line), in a temporary folder unless
``out_dir`` is given. Importing or calling this module changes no process-wide setting: log
handlers and the allocator option are the command line's business.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from pipeline import checkpoint as checkpoints
from pipeline.checkpoint import Checkpoint
from pipeline.config import InputError, load_config
from pipeline.feature_cache import FeatureCache


class StageFailed(RuntimeError):
    """A stage could not process the input, or an input or setting cannot be used; the message
    names the file or key and the reason."""


@contextlib.contextmanager
def _as_stage_failed() -> Iterator[list[str]]:
    """Turn a user error (a missing file, a bad setting, a checkpoint that is not one) into
    :class:`StageFailed`; yields the list the stages' error lines of the block are gathered in."""
    errors: list[str] = []
    handler = _Collect(errors)
    logger = logging.getLogger("pipeline")
    logger.addHandler(handler)
    try:
        yield errors
    except (InputError, FileNotFoundError, ValueError) as e:
        raise StageFailed(str(e)) from None
    finally:
        logger.removeHandler(handler)


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@dataclass
class FaceTrack:
    """The faces stage's result for one video: per kept frame, its index (from 0), timestamp,
    whether the followed face is there, its box (x1, y1, x2, y2), 5 landmarks and detector score.
    ``crops`` reads the aligned 112x112 RGB crops from ``path`` (the stage's HDF5 file)."""

    video: str
    path: Path
    frame: np.ndarray
    timestamp: np.ndarray
    present: np.ndarray
    box: np.ndarray
    landmarks: np.ndarray
    score: np.ndarray
    attrs: dict[str, Any]
    _folder: tempfile.TemporaryDirectory | None = field(default=None, repr=False)  # removed with the track

    @property
    def crops(self) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            return f["crops_112"][:]

    def __len__(self) -> int:
        return len(self.frame)


def _settings(settings: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value) if isinstance(value, list | dict | bool) else value}"
            for key, value in settings.items()]


def _folder(out_dir: str | Path | None) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return Path(out_dir), None
    tmp = tempfile.TemporaryDirectory(prefix="affect-")
    return Path(tmp.name), tmp


def _failed(stage: str, target: str | Path, failures: Path, errors: list[str]) -> StageFailed:
    """The stage's reason: its failure record for the input, else its last error line."""
    reasons = errors[-1:]
    if failures.is_file():
        reasons = [json.loads(line)["error"] for line in failures.read_text().splitlines() if line.strip()]
    return StageFailed(f"{target}: the {stage} stage failed" + (f": {reasons[-1]}" if reasons else ""))


def detect_faces(video: str | Path, device: str = "cpu", out_dir: str | Path | None = None,
                 **settings: Any) -> FaceTrack:
    """Detect, track and align the main face of ``video`` with the faces stage (``configs/faces.yaml``;
    ``settings`` such as ``stride=2`` or ``subject="left"`` override its keys)."""
    from pipeline import faces

    video = Path(video)
    if not video.is_file():
        raise StageFailed(f"{video}: no such video")
    folder, tmp = _folder(out_dir)
    with _as_stage_failed() as errors:
        cfg = faces.resolve(load_config("faces", overrides=[
            f"videos={video}", f"out_dir={folder}", f"device={device}", "data.name=api", "data.annotations=",
            "shard=", *_settings(settings)]))
        if faces.main(cfg) != 0:
            raise _failed("faces", video, folder / "failures.jsonl", errors)
    path = folder / f"{video.stem}.h5"
    with h5py.File(path, "r") as f:
        arrays = {k: f[k][:] for k in ("frame", "timestamp", "present", "box", "landmarks", "score")}
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    return FaceTrack(video.stem, path, **arrays, attrs=attrs, _folder=tmp)


def extract(faces: FaceTrack, extractor: str = "fer_xception", weights: str | Path | None = None,
            device: str = "cpu", out_dir: str | Path | None = None, **settings: Any) -> np.ndarray:
    """Features of every frame of a face track from the features stage: (n, dim) float32, NaN rows
    where there is no face. ``weights``: the extractor's weights file (its default if None)."""
    from pipeline import features

    folder, tmp = _folder(out_dir)
    with tmp or contextlib.nullcontext(), _as_stage_failed() as errors:
        cfg = features.resolve(load_config("features", overrides=[
            f"extractor={extractor}", f"faces_dir={faces.path}", f"out_dir={folder}", f"device={device}", "shard=",
            *([f"extractor.weights={weights}"] if weights else []), *_settings(settings)]))
        if features.main(cfg) != 0:
            raise _failed("features", faces.path, folder / f"{cfg.extractor.name}.failures.jsonl", errors)
        cache = FeatureCache([folder / f"{cfg.extractor.name}.h5"])
        feats, present, _ = cache.read(faces.video)
        cache.close()
    feats[~present] = np.nan
    return feats


def predict(video: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
            out_dir: str | Path | None = None, **settings: Any):
    """``video`` through faces, features and the model of ``checkpoint`` (without one: the
    ``fer_xception`` network's expressions alone), as ``make predict`` does; returns the rows of
    ``predictions.csv`` (columns in :mod:`pipeline.tables`) as a pandas DataFrame. With
    ``out_dir`` the stage's files (timeline, ABAW layouts, faces, features) stay there."""
    import pandas as pd

    from pipeline import predict as stage

    folder, tmp = _folder(out_dir)
    with tmp or contextlib.nullcontext(), _as_stage_failed() as errors:
        cfg = load_config("predict", overrides=[
            f"video={video}", f"checkpoint={checkpoint or ''}", f"out_dir={folder}", f"device={device}",
            *_settings(settings)])
        if stage.main(cfg) != 0:
            raise _failed("predict", video, folder / "faces" / "failures.jsonl", errors)
        tables = sorted(folder.glob("predictions*.csv"))
        return pd.concat([pd.read_csv(p, skipinitialspace=True) for p in tables], ignore_index=True)


def load(checkpoint: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Checkpoint]:
    """A trained model rebuilt from its checkpoint (loaded as tensors and plain data only), in eval
    mode, and the checkpoint's contents (:class:`pipeline.checkpoint.Checkpoint`: the recipe with
    the training config and extractors, the normalisation, thresholds and smoothing, ...)."""
    with _as_stage_failed():
        return checkpoints.load(checkpoint, device)
