"""Per-frame annotations of Aff-Wild2 style data sets, and their video splits.

Arrays keep the ABAW sentinels: ``va`` (n, 2) float32 with -5 where invalid, ``expr`` (n,) int64 in
0..7 with -1 invalid, ``au`` (n, 12) int64 in {0, 1} with -1 invalid. Frame ``i`` is 0-based: the
first row after a header, and the image ``00001.jpg``, are frame 0.

Expression class sets (:data:`EXPRESSION_SETS`): ``abaw8``, ABAW's eight classes, and ``basic7``,
the seven basic emotions without Other. Every set is a prefix of :data:`EXPRESSIONS`, so a class
keeps its ABAW index in every set and a model of k classes outputs the first k;
:func:`restrict_expressions` marks frames of the classes outside a set invalid. A per-task
expression file may carry the header of any set; its values must then lie in that set.

Formats read by :func:`load_annotations`:

- ``abaw_tasks`` (ABAW3 and later): ``VA_Estimation_Challenge/``, ``EXPR_Recognition_Challenge/``
  (ABAW3 calls it ``EXPR_Classification_Challenge/``) and ``AU_Detection_Challenge/``, each with
  ``Train_Set/`` and ``Validation_Set/`` holding one txt per video. Two-person videos have
  ``<video>_left.txt`` / ``<video>_right.txt``; each is its own entry under that stem.
- ``abaw3_mtl``: ``MTL_Challenge/train_set.txt`` and ``validation_set.txt``;
  ``abaw4_mtl`` (ABAW4, ABAW7): ``training_set_annotations*.txt`` and
  ``validation_set_annotations*.txt``. Both have the header ``image,valence,arousal,expression,aus``
  (the 12 AU names are accepted in place of ``aus``) and rows of 16 fields
  ``video/00001.jpg,v,a,expr,au1,...,au12``. Only some frames are listed; the others are invalid.
- ``csv``: ``<root>/<split>.csv`` (or ``root`` itself when it is a csv file) with columns ``video``,
  ``frame`` and any of ``valence``, ``arousal``, ``expression`` and the 12 AU names. Frames not
  listed, and empty fields, are invalid.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.abaw import AUS, EXPRESSION_SETS, EXPRESSIONS, INVALID, TASKS

log = logging.getLogger(__name__)


# Each task's folder of per-video files, as the editions name it: ABAW6 and later (written here),
# ABAW3-ABAW5 (EXPR_Classification_Challenge), ABAW2 (*_Set).
TASK_DIRS = {
    "va": ("VA_Estimation_Challenge", "VA_Set"),
    "expr": ("EXPR_Recognition_Challenge", "EXPR_Classification_Challenge", "EXPR_Set"),
    "au": ("AU_Detection_Challenge", "AU_Set"),
}
TASK_HEADERS = {"va": ("valence", "arousal"), "expr": EXPRESSIONS, "au": AUS}
SPLIT_DIRS = {"train": "Train_Set", "val": "Validation_Set"}
MTL_FILES = {
    "abaw3_mtl": {"train": "MTL_Challenge/train_set.txt", "val": "MTL_Challenge/validation_set.txt"},
    "abaw4_mtl": {"train": "training_set_annotations*.txt", "val": "validation_set_annotations*.txt"},
}
MTL_HEADER = ("image", "valence", "arousal", "expression")
FORMATS = ("auto", "abaw_tasks", "abaw3_mtl", "abaw4_mtl", "csv")


class AnnotationError(ValueError):
    """An annotation file that cannot be used; the message names the file and line."""


@dataclass
class Labels:
    """Labels of the n frames of one video (or of several, concatenated).

    ``va`` (n, 2) float32, ``expr`` (n,) int64, ``au`` (n, 12) int64, with the ABAW sentinels.
    """

    va: np.ndarray
    expr: np.ndarray
    au: np.ndarray

    def __post_init__(self) -> None:
        self.va = np.asarray(self.va, np.float32).reshape(-1, 2)
        self.expr = np.asarray(self.expr, np.int64).reshape(-1)
        self.au = np.asarray(self.au, np.int64).reshape(-1, len(AUS))
        if not len(self.va) == len(self.expr) == len(self.au):
            raise ValueError(
                f"label lengths differ: va {len(self.va)}, expr {len(self.expr)}, au {len(self.au)}"
            )

    def __len__(self) -> int:
        return len(self.expr)

    @classmethod
    def empty(cls, n: int) -> Labels:
        """n frames, every task invalid."""
        return cls(
            np.full((n, 2), INVALID["va"], np.float32),
            np.full(n, INVALID["expr"], np.int64),
            np.full((n, len(AUS)), INVALID["au"], np.int64),
        )

    def valid(self, task: str) -> np.ndarray:
        """(n,) bool: frames labelled for ``task``; for ``au`` every one of the 12 must be labelled."""
        if task == "va":
            return (self.va != INVALID["va"]).all(1)
        if task == "expr":
            return self.expr != INVALID["expr"]
        if task == "au":
            return (self.au != INVALID["au"]).all(1)
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")

    def fit(self, n_frames: int, name: str = "") -> Labels:
        """These labels cut or padded to ``n_frames``: labels past the last frame are dropped, frames
        past the last label are invalid. A change in length logs one warning naming ``name``."""
        n = len(self)
        if n == n_frames:
            return self
        rule = f"dropped the last {n - n_frames}" if n > n_frames else f"the last {n_frames - n} are invalid"
        log.warning("%s: %d label rows for %d frames; %s", name or "labels", n, n_frames, rule)
        if n > n_frames:
            return Labels(self.va[:n_frames], self.expr[:n_frames], self.au[:n_frames])
        return concat([self, Labels.empty(n_frames - n)])

    def counts(self) -> dict[str, int]:
        """Number of labelled frames per task."""
        return {task: int(self.valid(task).sum()) for task in TASKS}


def expression_set(name: str) -> tuple[str, ...]:
    """The class names of the expression set ``name`` (a key of :data:`EXPRESSION_SETS`)."""
    if name not in EXPRESSION_SETS:
        raise ValueError(f"expression set {name!r}: choose one of {', '.join(EXPRESSION_SETS)}")
    return EXPRESSION_SETS[name]


def restrict_expressions(labels: Labels, name: str) -> Labels:
    """A copy of ``labels`` where frames labelled with a class outside the set ``name`` are invalid
    (-1); the kept classes keep their indices. ``basic7`` drops Other (7)."""
    k = len(expression_set(name))
    expr = np.where(labels.expr >= k, INVALID["expr"], labels.expr)
    return Labels(labels.va.copy(), expr, labels.au.copy())


def concat(labels: Iterable[Labels]) -> Labels:
    """Labels of several videos one after the other."""
    labels = list(labels)
    if not labels:
        return Labels.empty(0)
    return Labels(*(np.concatenate([getattr(lab, task) for lab in labels]) for task in TASKS))


# ---- reading ----------------------------------------------------------------------------------


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise AnnotationError(f"{path}: file not found")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise AnnotationError(f"{path}: empty file, expected a header line")
    return lines


def _split_header(line: str) -> list[str]:
    return [h.strip() for h in line.split(",")]


def _bad_header(path: Path, got: Sequence[str], want: str) -> AnnotationError:
    return AnnotationError(f"{path}:1: header {','.join(got)!r}, expected {want!r}")


def _to_float(path: Path, rows: list[list[str]], width: int, first_line: int = 2) -> np.ndarray:
    """Rows of ``width`` numeric strings -> (n, width) float64; an empty field is NaN."""
    try:
        return np.array([[float(x) if x.strip() else np.nan for x in r] for r in rows], np.float64).reshape(
            len(rows), width
        )
    except ValueError:
        for i, r in enumerate(rows):
            for x in r:
                try:
                    float(x) if x.strip() else None
                except ValueError:
                    raise AnnotationError(f"{path}:{first_line + i}: {x.strip()!r} is not a number") from None
        raise


def _check_values(path: Path, task: str, values: np.ndarray, lines: np.ndarray, columns: str = "",
                  n_classes: int = len(EXPRESSIONS)) -> None:
    """Refuse values outside the task's range (expression classes 0..n_classes-1); ``lines`` gives
    each row's line number."""
    v = values if values.ndim == 2 else values[:, None]
    if task == "va":
        bad = ~((np.abs(v) <= 1.0) | (v == INVALID["va"]))
        want = "in [-1, 1] or -5"
    elif task == "expr":
        bad = ~np.isin(v, np.arange(-1, n_classes))
        want = f"an integer in 0..{n_classes - 1} or -1"
    else:
        bad = ~np.isin(v, (-1, 0, 1))
        want = "0, 1 or -1"
    rows = np.flatnonzero(bad.any(1))
    if len(rows):
        r = rows[0]
        c = int(np.flatnonzero(bad[r])[0])
        name = columns.split(",")[c] if columns else f"column {c + 1}"
        raise AnnotationError(f"{path}:{int(lines[r])}: {name} = {v[r, c]:g} is not {want}")


def read_task_file(path: str | Path, task: str) -> np.ndarray:
    """One per-task annotation (or prediction) txt -> ``va`` (n, 2) float32, ``expr`` (n,) int64
    or ``au`` (n, 12) int64, one row per frame. An expression file's header names its class set
    (any of :data:`EXPRESSION_SETS`). Wrong header, column count or value raises
    :class:`AnnotationError` naming the file and line."""
    path = Path(path)
    if task not in TASK_HEADERS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    lines = _lines(path)
    header = _split_header(lines[0])
    headers = EXPRESSION_SETS.values() if task == "expr" else [TASK_HEADERS[task]]
    want = next((h for h in headers if [c.lower() for c in header] == [c.lower() for c in h]), None)
    if want is None:
        raise _bad_header(path, header, " or ".join(",".join(h) for h in headers))
    width = 1 if task == "expr" else len(want)
    rows = [ln.split(",") for ln in lines[1:]]
    for i, r in enumerate(rows):
        if len(r) != width:
            raise AnnotationError(f"{path}:{i + 2}: {len(r)} fields, expected {width}")
    values = _to_float(path, rows, width)
    if np.isnan(values).any():
        r = int(np.flatnonzero(np.isnan(values).any(1))[0])
        raise AnnotationError(f"{path}:{r + 2}: empty field")
    _check_values(path, task, values, np.arange(len(values)) + 2, "" if task == "expr" else ",".join(want),
                  n_classes=len(want))
    if task == "va":
        return values.astype(np.float32)
    return values.astype(np.int64).reshape(-1) if task == "expr" else values.astype(np.int64)


def _frame_of(path: Path, line: int, image: str) -> tuple[str, int]:
    """``video/00001.jpg`` -> (``video``, 0)."""
    video, _, name = image.strip().rpartition("/")
    stem = name.rsplit(".", 1)[0]
    if not video or not stem.isdigit() or int(stem) < 1:
        raise AnnotationError(f"{path}:{line}: image {image.strip()!r} is not of the form <video>/00001.jpg")
    return video, int(stem) - 1


def read_mtl_file(path: str | Path) -> dict[str, Labels]:
    """An ABAW3/ABAW4/ABAW7 multi-task list file -> labels per video (unlisted frames invalid)."""
    path = Path(path)
    lines = _lines(path)
    header = _split_header(lines[0])
    tail = [h.lower() for h in header[len(MTL_HEADER):]]
    if [h.lower() for h in header[: len(MTL_HEADER)]] != list(MTL_HEADER) or (
        tail != ["aus"] and tail != [a.lower() for a in AUS]
    ):
        raise _bad_header(path, header, ",".join(MTL_HEADER) + ",aus")
    width = len(MTL_HEADER) + len(AUS)
    keys: list[tuple[str, int]] = []
    rows = []
    for i, ln in enumerate(lines[1:], start=2):
        r = ln.split(",")
        if len(r) != width:
            raise AnnotationError(f"{path}:{i}: {len(r)} fields, expected {width} (image, valence, arousal, "
                                  f"expression and the 12 AUs)")
        keys.append(_frame_of(path, i, r[0]))
        rows.append(r[1:])
    values = _to_float(path, rows, width - 1)
    line_no = np.arange(len(values)) + 2
    if np.isnan(values).any():
        raise AnnotationError(f"{path}:{int(line_no[np.isnan(values).any(1)][0])}: empty field")
    _check_values(path, "va", values[:, :2], line_no, "valence,arousal")
    _check_values(path, "expr", values[:, 2], line_no, "expression")
    _check_values(path, "au", values[:, 3:], line_no, ",".join(AUS))
    videos = [k[0] for k in keys]
    frames = np.array([k[1] for k in keys], np.int64)
    return _gather(path, videos, frames, values[:, :2], values[:, 2], values[:, 3:], line_no)


def group_rows(
    path: Path, videos: Sequence[str], frames: np.ndarray, line_no: np.ndarray
) -> dict[str, np.ndarray]:
    """{video: indices of its rows}, in order of first appearance; a frame listed twice is refused."""
    names, first, inverse = np.unique(np.array(videos, dtype=str), return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(names)))[:-1])
    out = {}
    for i in np.argsort(first):
        rows = groups[i]
        uniq, once = np.unique(frames[rows], return_index=True)
        if len(uniq) < len(rows):
            dup = rows[np.setdiff1d(np.arange(len(rows)), once)[0]]
            raise AnnotationError(
                f"{path}:{int(line_no[dup])}: frame {frames[dup]} of {names[i]} is listed twice"
            )
        out[str(names[i])] = rows
    return out


def _gather(path: Path, videos: Sequence[str], frames: np.ndarray, va: np.ndarray, expr: np.ndarray,
            au: np.ndarray, line_no: np.ndarray) -> dict[str, Labels]:
    """Rows keyed by (video, frame) -> dense labels per video; a repeated frame is refused."""
    out: dict[str, Labels] = {}
    for video, rows in group_rows(path, videos, frames, line_no).items():
        f = frames[rows]
        lab = Labels.empty(int(f.max()) + 1)
        lab.va[f], lab.expr[f], lab.au[f] = va[rows], expr[rows], au[rows]
        out[str(video)] = lab
    return out


def read_csv(path: str | Path) -> dict[str, Labels]:
    """A plain ``video,frame,...`` csv -> labels per video; see the module docstring."""
    path = Path(path)
    videos, frames, cols, line_no = read_frame_csv(path)
    n = len(frames)
    va = np.full((n, 2), INVALID["va"], np.float64)
    expr = np.full(n, INVALID["expr"], np.float64)
    au = np.full((n, len(AUS)), INVALID["au"], np.float64)
    for j, name in enumerate(("valence", "arousal")):
        if name in cols:
            va[:, j] = np.where(np.isnan(cols[name]), INVALID["va"], cols[name])
    va[(va == INVALID["va"]).any(1)] = INVALID["va"]  # a frame needs both values
    if "expression" in cols:
        expr = np.where(np.isnan(cols["expression"]), INVALID["expr"], cols["expression"])
    for j, name in enumerate(AUS):
        if name in cols:
            au[:, j] = np.where(np.isnan(cols[name]), INVALID["au"], cols[name])
    _check_values(path, "va", va, line_no, "valence,arousal")
    _check_values(path, "expr", expr, line_no, "expression")
    _check_values(path, "au", au, line_no, ",".join(AUS))
    return _gather(path, videos, frames, va, expr, au, line_no)


LABEL_COLUMNS = ("valence", "arousal", "expression", *AUS)


def read_frame_csv(
    path: Path, columns: Sequence[str] = LABEL_COLUMNS
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """A ``video,frame,<columns...>`` csv -> (videos, frames (n,), {column: (n,) float64 with NaN for
    empty fields}, line numbers (n,)). Columns may be any subset of ``columns``, in any order."""
    lines = _lines(path)
    header = _split_header(lines[0])
    by_lower = {c.lower(): c for c in columns}
    unknown = [h for h in header[2:] if h.lower() not in by_lower]
    if [h.lower() for h in header[:2]] != ["video", "frame"] or unknown or len(set(header)) < len(header):
        raise _bad_header(path, header, "video,frame followed by any of " + ",".join(columns))
    names = [by_lower[h.lower()] for h in header[2:]]
    rows = [ln.split(",") for ln in lines[1:]]
    for i, r in enumerate(rows, start=2):
        if len(r) != len(header):
            raise AnnotationError(f"{path}:{i}: {len(r)} fields, expected {len(header)}")
        if not r[0].strip():
            raise AnnotationError(f"{path}:{i}: empty video name")
    values = _to_float(path, [r[1:] for r in rows], len(header) - 1)
    line_no = np.arange(len(rows)) + 2
    frame = values[:, 0]
    bad = np.flatnonzero(~((frame >= 0) & (frame == np.round(frame))))
    if len(bad):
        raise AnnotationError(f"{path}:{int(line_no[bad[0]])}: frame {frame[bad[0]]:g} is not an index >= 0")
    cols = {name: values[:, 1 + j] for j, name in enumerate(names)}
    return [r[0].strip() for r in rows], frame.astype(np.int64), cols, line_no


# ---- folders ----------------------------------------------------------------------------------


def task_dir(root: Path, task: str) -> Path | None:
    """The folder of ``task``'s per-video files under ``root``, under any edition's name, or None."""
    return next((root / d for d in TASK_DIRS[task] if (root / d).is_dir()), None)


def _mtl_file(root: Path, fmt: str, split: str) -> Path:
    pattern = MTL_FILES[fmt][split]
    found = sorted(root.glob(pattern))
    if not found:
        raise FileNotFoundError(f"{root}: no {pattern} for the {split} split ({fmt})")
    if len(found) > 1:
        raise AnnotationError(f"{root}: several files match {pattern}: {', '.join(p.name for p in found)}")
    return found[0]


def detect_format(root: str | Path) -> str:
    """The annotation format of ``root`` (see the module docstring)."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        return "csv"
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such annotation folder")
    if any(task_dir(root, t) for t in TASKS):
        return "abaw_tasks"
    if (root / "MTL_Challenge").is_dir():
        return "abaw3_mtl"
    if list(root.glob("training_set_annotations*.txt")) or list(root.glob("validation_set_annotations*.txt")):
        return "abaw4_mtl"
    if list(root.glob("*.csv")):
        return "csv"
    raise AnnotationError(
        f"{root}: no known annotation layout (per-task folders such as VA_Estimation_Challenge/, "
        f"MTL_Challenge/, training_set_annotations*.txt or <split>.csv)"
    )


def _check_split(split: str) -> None:
    if split not in SPLIT_DIRS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLIT_DIRS)}")


def _resolve(root: str | Path, fmt: str) -> tuple[Path, str]:
    if fmt not in FORMATS:
        raise ValueError(f"annotation format {fmt!r}: choose one of {', '.join(FORMATS)}")
    root = Path(root)
    return root, detect_format(root) if fmt == "auto" else fmt


def _task_files(root: Path, split: str) -> dict[str, dict[str, Path]]:
    """{task: {video: file}} for the per-task layout; missing task folders give no files."""
    files: dict[str, dict[str, Path]] = {}
    for task in TASKS:
        base = task_dir(root, task)
        folder = base / SPLIT_DIRS[split] if base else None
        files[task] = {p.stem: p for p in sorted(folder.glob("*.txt"))} if folder and folder.is_dir() else {}
    if not any(files.values()):
        raise FileNotFoundError(f"{root}: no annotation files in any */{SPLIT_DIRS[split]}/ folder")
    return files


def load_annotations(root: str | Path, split: str, fmt: str = "auto") -> dict[str, Labels]:
    """Labels of every video of ``split`` ("train" or "val") under ``root``, keyed by video name.

    Per video all three tasks have one length n, the longest task's; a task without a file, and
    the frames past a shorter task's end, are invalid.
    """
    _check_split(split)
    root, fmt = _resolve(root, fmt)
    if fmt == "csv":
        return read_csv(root if root.is_file() else root / f"{split}.csv")
    if fmt in MTL_FILES:
        return read_mtl_file(_mtl_file(root, fmt, split))
    files = _task_files(root, split)
    out = {}
    for video in sorted(set().union(*(f.keys() for f in files.values()))):
        parts = {t: read_task_file(files[t][video], t) for t in TASKS if video in files[t]}
        lab = Labels.empty(max(len(a) for a in parts.values()))
        for task, arr in parts.items():
            getattr(lab, task)[: len(arr)] = arr
        out[video] = lab
    return out
