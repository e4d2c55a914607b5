"""Per-frame predictions to files in the ABAW submission layouts, and back.

Written predictions of one video are a mapping with optional ``frame`` (m,) int (default
``0..m-1``) and any of ``va`` (m, 2) float, ``expr`` (m, k) logits/probabilities over the k classes
of an expression set (8 for ABAW's, 7 for ``basic7``; see :data:`~pipeline.labels.EXPRESSION_SETS`)
or (m,) classes, ``au`` (m, 12) probabilities. Valence and arousal are clipped to [-1, 1];
expressions become the arg-max class; AUs are thresholded (default 0.5); the csv keeps the
probabilities beside the decisions, so that thresholds can be tuned later.

Layouts:

- ``mtl``: one txt, header ``image,valence,arousal,expression,aus``, a row
  ``video/00001.jpg,v,a,expr,au1,...,au12`` per predicted frame (the ABAW MTL submission).
- ``tasks``: ``<folder>/VA_Estimation_Challenge/<video>.txt``, ``EXPR_Recognition_Challenge/``,
  ``AU_Detection_Challenge/``, one row per frame from frame 0 under the per-task headers (the ABAW
  uni-task submission; the same layout as the annotations). The expression header lists the class
  set's names, one class index per row. Frames without a prediction are written as -5 / -1 with a
  warning, since row i must be frame i.
- ``task_files`` (read only; :mod:`pipeline.submit` writes them): the ABAW5-ABAW10 uni-task
  submission, one file per challenge, header ``image_location,valence,arousal`` (or the 8
  expression names, or the 12 AUs), rows ``video/00001.jpg,<values>``; a folder may hold one per task.
- ``csv``: the per-frame table of :mod:`pipeline.tables`: ``video,frame`` (from 1), the face's
  detection, ``valence,arousal,expression``, each class's probability, ``AU1,...,AU26`` decisions and
  their probabilities. Read back, only the prediction columns count.

:func:`read_predictions` reads any of these into dense arrays per video, indexed by frame:
``va`` (n, 2) float32 and ``au`` (n, 12) float32 with NaN, ``expr`` (n,) int64 with -1 where a
frame has no prediction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from models.abaw import AUS, EXPRESSION_SETS, EXPRESSIONS, INVALID, TASKS
from pipeline.atomic import atomic_output
from pipeline.labels import (
    TASK_DIRS,
    TASK_HEADERS,
    AnnotationError,
    expression_set,
    group_rows,
    read_frame_csv,
    read_mtl_file,
    read_task_file,
)
from pipeline.metrics import binarise_au, dense_predictions

log = logging.getLogger(__name__)

Preds = Mapping[str, np.ndarray]
MTL_HEADER_LINE = "image,valence,arousal,expression,aus"
CSV_COLUMNS = ("valence", "arousal", "expression", *AUS)


def _frames(pred: Preds, video: str) -> np.ndarray:
    n = next((len(pred[t]) for t in TASKS if pred.get(t) is not None), 0)
    frames = np.asarray(pred["frame"], np.int64) if pred.get("frame") is not None else np.arange(n)
    if len(frames) != n:
        raise ValueError(f"{video}: {len(frames)} frame indices for {n} predictions")
    if len(frames) and (frames.min() < 0 or len(np.unique(frames)) < len(frames)):
        raise ValueError(f"{video}: frame indices must be distinct and >= 0")
    return frames


def _checked_frames(pred: Preds, video: str) -> np.ndarray:
    """The frame indices of ``pred`` (:func:`_frames`), its AU probabilities checked to lie in [0, 1]."""
    frames = _frames(pred, video)
    au = np.asarray(pred["au"], np.float64) if pred.get("au") is not None else np.zeros(0)
    if ((au < 0) | (au > 1)).any():
        raise ValueError(f"{video}: AU probabilities must lie in [0, 1] (NaN where there is none)")
    return frames


def _rows(
    pred: Preds, video: str, au_thresholds: np.ndarray | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(frames (m,), dense predictions over 0..max frame) with VA clipped and AUs binarised."""
    frames = _checked_frames(pred, video)
    dense = dense_predictions(pred, int(frames.max()) + 1 if len(frames) else 0)
    dense["va"] = np.clip(dense["va"], -1.0, 1.0)
    dense["au_bin"] = binarise_au(dense["au"], au_thresholds)
    return frames, dense


def _va_text(va: np.ndarray) -> str:
    return f"{INVALID['va']:g},{INVALID['va']:g}" if np.isnan(va).any() else f"{va[0]:.6f},{va[1]:.6f}"


def _write_lines(path: Path, lines: list[str]) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def write_mtl(path: str | Path, preds: Mapping[str, Preds], au_thresholds: np.ndarray | None = None) -> Path:
    """All videos' predictions as one ABAW multi-task submission file; every task is needed.
    A frame without a prediction for a task gets that task's -5 / -1."""
    lines = [MTL_HEADER_LINE]
    for video, pred in preds.items():
        missing = [t for t in TASKS if pred.get(t) is None]
        if missing:
            raise ValueError(f"{video}: no {', '.join(missing)} predictions for the multi-task file")
        frames, d = _rows(pred, video, au_thresholds)
        for f in frames:
            cells = [f"{video}/{f + 1:05d}.jpg", _va_text(d["va"][f]), str(d["expr"][f])]
            lines.append(",".join(cells + [str(x) for x in d["au_bin"][f]]))
    return _write_lines(Path(path), lines)


def _expression_names(pred: Preds, video: str, expressions: str | None) -> tuple[str, ...]:
    """The class set of a video's expression predictions: ``expressions``, else the set with as
    many classes as the scores have columns (ABAW's 8 for predictions given as classes)."""
    expr = pred.get("expr")
    width = np.shape(expr)[1] if expr is not None and np.ndim(expr) == 2 else None
    if expressions is not None:
        names = expression_set(expressions)
        if width is not None and width != len(names):
            raise ValueError(f"{video}: {width} expression scores per frame for the {len(names)} classes "
                             f"of {expressions}")
        return names
    if width is None:
        return EXPRESSIONS
    names = next((n for n in EXPRESSION_SETS.values() if len(n) == width), None)
    if names is None:
        sizes = ", ".join(f"{k} ({len(v)})" for k, v in EXPRESSION_SETS.items())
        raise ValueError(f"{video}: {width} expression scores per frame; the class sets are {sizes}")
    return names


def write_task_files(
    folder: str | Path,
    preds: Mapping[str, Preds],
    tasks: tuple[str, ...] | None = None,
    au_thresholds: np.ndarray | None = None,
    expressions: str | None = None,
) -> list[Path]:
    """One txt per video per task (default: those predicted) under ``folder/<task folder>/``.

    Row i is frame i from 0 to the last predicted frame; frames without a prediction are -5 / -1.
    The expression header names the classes of the set ``expressions`` (default: the set with as
    many classes as the scores have columns). Returns the files written.
    """
    written = []
    for video, pred in preds.items():
        frames, d = _rows(pred, video, au_thresholds)
        names = _expression_names(pred, video, expressions)
        if len(d["expr"]) and d["expr"].max() >= len(names):
            raise ValueError(f"{video}: expression class {d['expr'].max()} is outside the {len(names)} classes "
                             f"{','.join(names)}")
        if len(d["expr"]) > len(frames):
            log.warning("%s: %d of %d frames lack a prediction; written as -5/-1", video,
                        len(d["expr"]) - len(frames), len(d["expr"]))
        for task in tasks or TASKS:
            if pred.get(task) is None:
                if tasks:
                    raise ValueError(f"{video}: no {task} predictions to write")
                continue
            if task == "va":
                body = [_va_text(r) for r in d["va"]]
            elif task == "expr":
                body = [str(x) for x in d["expr"]]
            else:
                body = [",".join(str(x) for x in r) for r in d["au_bin"]]
            header = names if task == "expr" else TASK_HEADERS[task]
            path = Path(folder) / TASK_DIRS[task][0] / f"{video}.txt"
            written.append(_write_lines(path, [",".join(header), *body]))
    return written


def write_csv(path: str | Path, preds: Mapping[str, Preds], au_thresholds: np.ndarray | None = None,
              faces: Mapping[str, Mapping[str, np.ndarray]] | None = None, format: str = "abaw") -> Path:
    """All videos' predictions as one table of :mod:`pipeline.tables` (frames from 1; decisions,
    probabilities and, given each video's face track in ``faces``, the detections). Frames without
    a prediction for a task have empty fields."""
    from pipeline.tables import frame_table, write_table

    tables = []
    for video, pred in preds.items():
        frames = _checked_frames(pred, video)
        expr = pred.get("expr")
        classes = EXPRESSIONS[: expr.shape[1]] if expr is not None and np.ndim(expr) == 2 else EXPRESSIONS
        face = None if faces is None else faces[video]
        tables.append(frame_table(video, {**pred, "frame": frames}, face, au_thresholds, classes))
    return write_table(path, tables, format)


# ---- reading ----------------------------------------------------------------------------------


def _empty(n: int) -> dict[str, np.ndarray]:
    return {
        "va": np.full((n, 2), np.nan, np.float32),
        "expr": np.full(n, -1, np.int64),
        "au": np.full((n, len(AUS)), np.nan, np.float32),
    }


def _from_sentinels(va: np.ndarray, expr: np.ndarray, au: np.ndarray) -> dict[str, np.ndarray]:
    """Arrays with the annotation sentinels -> prediction arrays with NaN / -1 for missing."""
    va = np.where((va == INVALID["va"]).any(1, keepdims=True), np.nan, va).astype(np.float32)
    au = np.where((au == INVALID["au"]).any(1, keepdims=True), np.nan, au).astype(np.float32)
    return {"va": va, "expr": np.asarray(expr, np.int64), "au": au}


def read_tasks(folder: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Per-task prediction txts under ``folder/<task folder>/`` -> dense predictions per video.

    A video is the txt's path under its task folder without ``.txt``: ``<video>`` in the flat
    layout, ``<dataset>/<video>`` where a run over several data sets wrote them (as
    :func:`write_task_files` writes videos so named)."""
    folder = Path(folder)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for task in TASKS:
        for d in TASK_DIRS[task]:
            for path in sorted((folder / d).rglob("*.txt")):
                video = path.relative_to(folder / d).with_suffix("").as_posix()
                parts.setdefault(video, {})[task] = read_task_file(path, task)
    out = {}
    for video, arrays in parts.items():
        pred = _empty(max(len(a) for a in arrays.values()))
        dense = _from_sentinels(
            arrays.get("va", np.full((0, 2), INVALID["va"])),
            arrays.get("expr", np.full(0, INVALID["expr"])),
            arrays.get("au", np.full((0, len(AUS)), INVALID["au"])),
        )
        for task in arrays:
            pred[task][: len(dense[task])] = dense[task]
        out[video] = pred
    return out


def read_mtl(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """An ABAW multi-task prediction file -> dense predictions per video."""
    return {v: _from_sentinels(lab.va, lab.expr, lab.au) for v, lab in read_mtl_file(path).items()}


def read_csv_predictions(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """A ``video,frame,...`` prediction csv -> dense predictions per video; empty fields are missing,
    AU values are probabilities in [0, 1]."""
    from pipeline.tables import COLUMNS

    path = Path(path)
    known = (*CSV_COLUMNS, *(c for c in COLUMNS[2:] if c not in CSV_COLUMNS))  # the table's other columns
    videos, frames, cols, line_no = read_frame_csv(path, known)
    if len(frames) and frames.min() < 1:
        first = int(np.argmin(frames))
        raise AnnotationError(f"{path}:{int(line_no[first])}: frame {frames[first]}: frames are numbered from 1, "
                              "as ABAW names them (00001.jpg)")
    frames = frames - 1
    k = len(EXPRESSIONS)
    checks = [("valence", np.isfinite, "a finite number"), ("arousal", np.isfinite, "a finite number"),
              ("expression", lambda x: np.isin(x, np.arange(k)), f"a class in 0..{k - 1}")]
    checks += [(a, lambda x: (x >= 0) & (x <= 1), "a probability in [0, 1]") for a in (*AUS, *(f"p_{a}" for a in AUS))]
    for name, ok, want in checks:
        if name in cols:
            x = cols[name]
            bad = np.flatnonzero(~np.isnan(x) & ~ok(np.nan_to_num(x, nan=0.0)))
            if len(bad):
                raise AnnotationError(f"{path}:{int(line_no[bad[0]])}: {name} = {x[bad[0]]:g} is not {want}")
    out: dict[str, dict[str, np.ndarray]] = {}
    for video, rows in group_rows(path, videos, frames, line_no).items():
        f = frames[rows]
        pred = _empty(int(f.max()) + 1)
        for j, name in enumerate(("valence", "arousal")):
            if name in cols:
                pred["va"][f, j] = cols[name][rows]
        pred["va"][np.isnan(pred["va"]).any(1)] = np.nan  # a frame needs both values
        if "expression" in cols:
            pred["expr"][f] = np.nan_to_num(cols["expression"][rows], nan=-1).astype(np.int64)
        for j, name in enumerate(AUS):  # the probability where the table has it, else the decision
            source = f"p_{name}" if f"p_{name}" in cols else name
            if source in cols:
                pred["au"][f, j] = cols[source][rows]
        pred["au"][np.isnan(pred["au"]).any(1)] = np.nan
        out[video] = pred
    return out


TASK_FILE_HEADERS = {"va": "image_location,valence,arousal", "expr": "image_location," + ",".join(EXPRESSIONS),
                     "au": "image_location," + ",".join(AUS)}  # ABAW5-ABAW10: one file per challenge


def _first_line(path: Path) -> str:
    with open(path, errors="replace") as f:
        return f.readline().strip()


def read_task_submissions(paths: list[Path]) -> dict[str, dict[str, np.ndarray]]:
    """ABAW5-style files, one per challenge (header ``image_location,...``, rows
    ``video/00001.jpg,<values>``) -> dense predictions per video; a folder may hold one per task."""
    rows: dict[str, dict[str, dict[int, list[float]]]] = {}
    for path in paths:
        header = _first_line(path)
        task = next((t for t, h in TASK_FILE_HEADERS.items() if h == header), None)
        if task is None:
            raise AnnotationError(f"{path}:1: header {header!r} is none of " + " | ".join(TASK_FILE_HEADERS.values()))
        width = {"va": 2, "expr": 1, "au": len(AUS)}[task]
        for number, line in enumerate(path.read_text().splitlines()[1:], start=2):
            if not line.strip():
                continue
            image, *cells = line.strip().split(",")
            video, _, name = image.rpartition("/")
            if not video or not name.endswith(".jpg") or not name[:-4].isdigit() or int(name[:-4]) < 1:
                raise AnnotationError(f"{path}:{number}: {image!r} is not an image name such as video/00001.jpg")
            try:
                values = [float(c) for c in cells]
            except ValueError:
                values = []
            if len(values) != width:
                raise AnnotationError(f"{path}:{number}: {len(cells)} values, {width} expected for {task}")
            rows.setdefault(video, {}).setdefault(task, {})[int(name[:-4]) - 1] = values
    out = {}
    for video, tasks in rows.items():
        pred = _empty(max(max(f) for f in tasks.values()) + 1)
        for task, by_frame in tasks.items():
            frames = np.fromiter(by_frame, np.int64)
            values = np.asarray(list(by_frame.values()), np.float64)
            if task == "va":
                dense = _from_sentinels(values, np.zeros(0), np.zeros((0, len(AUS))))["va"]
                pred["va"][frames] = dense
            elif task == "expr":
                pred["expr"][frames] = values[:, 0].astype(np.int64)
            else:
                pred["au"][frames] = _from_sentinels(np.zeros((0, 2)), np.zeros(0), values)["au"]
        out[video] = pred
    return out


def detect_layout(path: str | Path) -> tuple[str, Path]:
    """The layout of a prediction file or folder, and the file (or folder) to read."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv", path
        return ("task_files" if _first_line(path).startswith("image_location,") else "mtl"), path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such prediction file or folder")
    if any((path / d).is_dir() for dirs in TASK_DIRS.values() for d in dirs):
        return "tasks", path
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".txt", ".csv") and p.is_file())
    if files and all(p.suffix.lower() == ".txt" and _first_line(p).startswith("image_location,") for p in files):
        return "task_files", path  # one submission file per challenge
    if len(files) == 1:
        return detect_layout(files[0])
    raise AnnotationError(
        f"{path}: expected per-task folders (VA_Estimation_Challenge/ ...) or a single .txt/.csv "
        f"prediction file, found {len(files)} files"
    )


def read_predictions(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Predictions in any layout (see the module docstring) -> dense arrays per video."""
    layout, path = detect_layout(path)
    if layout == "task_files":
        return read_task_submissions(sorted(path.glob("*.txt")) if path.is_dir() else [path])
    return {"mtl": read_mtl, "tasks": read_tasks, "csv": read_csv_predictions}[layout](path)
