"""Per-frame result tables in the field's formats: one row per frame of a face track, the face
stage's detection beside the model's decisions and probabilities.

Frames are numbered from 1, as ABAW names them (``00001.jpg``) and OpenFace counts them. The columns
of :data:`COLUMNS` (``format="abaw"``, the default), in this order:

- ``video``, ``frame`` (1-based), ``timestamp`` (seconds, from the video's own timestamps)
- ``face_present`` (1/0: the tracked face was detected or bridged), ``confidence`` (MTCNN's score)
- ``box_x1, box_y1, box_x2, box_y2`` (pixels) and the 5 landmarks as MTCNN orders them,
  ``lm1_x, lm1_y, ..., lm5_x, lm5_y``: the eye on the image's left, the eye on the image's right,
  the nose tip, the mouth corner on the image's left, the one on its right
- ``valence, arousal`` in [-1, 1]
- ``expression``: the class index of the arg-max (ABAW's numbering), then ``p_<class>`` for each
  class of the expression set (``p_Neutral, p_Anger, ..., p_Other``)
- ``AU1 ... AU26``: 0/1 decisions at the model's thresholds, then ``p_AU1 ... p_AU26``

Empty fields: no face (detection columns), or no model for that task. Frames without a face still
carry the predictions filled from the nearest frame with one, since ABAW scores every frame.

``format="openface"`` writes OpenFace 2's names and layout (``, `` between fields) for the columns
both have: ``frame, face_id, timestamp, confidence, success`` and ``AUxx_c`` for the AUs OpenFace
detects (all of ABAW's but AU24).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from models.abaw import AUS, EXPRESSIONS
from pipeline.atomic import atomic_output
from pipeline.metrics import binarise_au

LANDMARKS = tuple(f"lm{i}_{c}" for i in range(1, 6) for c in "xy")
BOX = ("box_x1", "box_y1", "box_x2", "box_y2")
FACE_COLUMNS = ("timestamp", "face_present", "confidence", *BOX, *LANDMARKS)
FORMATS = ("abaw", "openface")
OPENFACE_AUS = {au: f"AU{int(au[2:]):02d}_c" for au in AUS if au != "AU24"}  # OpenFace 2 has no AU24


def columns(expressions: Sequence[str] = EXPRESSIONS) -> tuple[str, ...]:
    """The table's columns for an expression set (ABAW's 8 by default)."""
    return ("video", "frame", *FACE_COLUMNS, "valence", "arousal", "expression",
            *(f"p_{c}" for c in expressions), *AUS, *(f"p_{a}" for a in AUS))


COLUMNS = columns()


def read_face_track(path: str | Path) -> dict[str, np.ndarray]:
    """The per-row detection arrays of a face file of the faces stage."""
    import h5py

    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in ("frame", "timestamp", "present", "score", "box", "landmarks")}


def frame_table(video: str, preds: Mapping[str, np.ndarray], face: Mapping[str, np.ndarray] | None = None,
                au_thresholds: np.ndarray | None = None,
                expressions: Sequence[str] = EXPRESSIONS) -> dict[str, np.ndarray]:
    """One video's rows as named columns (see the module docstring).

    ``preds``: ``frame`` (m,) 0-based frame indices and any of ``va`` (m, 2), ``expr`` (m, k)
    probabilities, ``au`` (m, 12) probabilities; ``face``: the face file's arrays
    (:func:`read_face_track`), matched by frame. Missing values are NaN.
    """
    frames = np.asarray(preds["frame"], np.int64)
    m = len(frames)
    nan = np.full(m, np.nan)
    table: dict[str, np.ndarray] = {"video": np.full(m, video, object), "frame": frames + 1}
    if face is not None:
        rows = np.minimum(np.searchsorted(face["frame"], frames), len(face["frame"]) - 1)
        if len(frames) and (face["frame"][rows] != frames).any():
            raise ValueError(f"{video}: predicted frames that the face track does not have")
        present = face["present"][rows].astype(bool)
        table["timestamp"] = face["timestamp"][rows].astype(np.float64)
        table["face_present"] = present.astype(np.int64)
        table["confidence"] = np.where(present, face["score"][rows], np.nan)
        box = np.where(present[:, None], face["box"][rows], np.nan)
        lms = np.where(present[:, None], face["landmarks"][rows].reshape(m, 10), np.nan)
        table.update({name: box[:, j] for j, name in enumerate(BOX)})
        table.update({name: lms[:, j] for j, name in enumerate(LANDMARKS)})
    else:
        table.update({name: nan for name in FACE_COLUMNS})
    va = None if preds.get("va") is None else np.asarray(preds["va"], np.float64)
    table["valence"] = nan if va is None else np.clip(va[:, 0], -1, 1)
    table["arousal"] = nan if va is None else np.clip(va[:, 1], -1, 1)
    expr = None if preds.get("expr") is None else np.asarray(preds["expr"])
    if expr is not None and expr.ndim == 2 and expr.shape[1] != len(expressions):
        raise ValueError(f"{video}: {expr.shape[1]} expression probabilities for {len(expressions)} classes")
    if expr is not None and expr.ndim == 2 and ((expr < 0) | (expr > 1)).any():
        raise ValueError(f"{video}: expression scores must be probabilities in [0, 1] (NaN where there is none)")
    if expr is None:
        table["expression"] = nan
    elif expr.ndim == 1:  # classes without their probabilities (-1: none)
        table["expression"] = np.where(expr >= 0, expr, np.nan)
    else:
        table["expression"] = np.where(np.isfinite(expr).all(1), np.nan_to_num(expr, nan=-1).argmax(1), np.nan)
    for j, name in enumerate(expressions):
        table[f"p_{name}"] = nan if expr is None or expr.ndim == 1 else expr[:, j].astype(np.float64)
    au = None if preds.get("au") is None else np.asarray(preds["au"], np.float64)
    decided = None if au is None else np.where(np.isnan(au), np.nan, binarise_au(np.nan_to_num(au), au_thresholds))
    for j, name in enumerate(AUS):
        table[name] = nan if au is None else decided[:, j]
    for j, name in enumerate(AUS):
        table[f"p_{name}"] = nan if au is None else au[:, j].astype(np.float64)
    return table


def _cell(value) -> str:
    if isinstance(value, str):
        return value
    if value is None or not np.isfinite(value):
        return ""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def openface_table(table: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenFace 2's columns from a table of :func:`frame_table` (one face per video: face_id 0)."""
    m = len(table["frame"])
    out = {"frame": table["frame"], "face_id": np.zeros(m, np.int64), "timestamp": table["timestamp"],
           "confidence": np.nan_to_num(table["confidence"], nan=0.0), "success": table["face_present"]}
    out.update({name: table[au] for au, name in OPENFACE_AUS.items()})
    return out


def write_table(path: str | Path, tables: Sequence[Mapping[str, np.ndarray]], format: str = "abaw") -> Path:
    """Write one or more videos' tables (:func:`frame_table`) as one csv, atomically. OpenFace's
    format holds one video per file."""
    if format not in FORMATS:
        raise ValueError(f"table format {format!r}: choose one of {', '.join(FORMATS)}")
    if format == "openface":
        if len(tables) != 1:
            raise ValueError(f"OpenFace's format holds one video per file, got {len(tables)}")
        tables, sep = [openface_table(tables[0])], ", "
    else:
        sep = ","
    names = list(tables[0]) if tables else list(COLUMNS)
    lines = [sep.join(names)]
    for table in tables:
        if list(table) != names:
            raise ValueError("tables with different columns cannot share a file")
        if "video" in table and any("," in str(v) for v in table["video"][:1]):
            raise ValueError(f"video name {table['video'][0]!r} contains a comma")
        cols = [table[c] for c in names]
        lines += [sep.join(_cell(c[i]) for c in cols) for i in range(len(table["frame"]))]
    with atomic_output(Path(path)) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return Path(path)
