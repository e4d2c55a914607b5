"""Stage: an ABAW test submission from predictions, exactly one row per listed frame, and a validator.

    python -m pipeline.submit predictions=<folder or file> list=<the organisers' list> layout=abaw5_tasks out=<file>
    python -m pipeline.submit --check FILE --list TESTLIST [--layout abaw5_tasks | abaw_mtl]

Layouts (the edition's; the organisers send the list or sample file with the test set):

- ``abaw5_tasks`` (ABAW5 and later uni-task challenges): one file per challenge. The list is the
  organisers' sample file: a header, ``image_location,valence,arousal`` /
  ``image_location,Neutral,...,Other`` / ``image_location,AU1,...,AU26``, then one row per image,
  ``video/00001.jpg,...``. The submission copies the header and the rows' order: VA as two
  numbers in [-1, 1], the expression as a class index 0-7, AUs as twelve 0/1 values.
- ``abaw_mtl`` (the multi-task challenge of ABAW3, ABAW4, ABAW7 and later): the list is a header
  line and one ``video/00001.jpg`` per line (its other fields, if any, are ignored); the
  submission has the header ``image,valence,arousal,expression,aus`` and one row per listed image,
  ``video/00001.jpg,v,a,expr,au1,...,au12``, in the list's order.

Image ``video/00001.jpg`` is frame 0 of ``video``. Predictions come in any layout ``make evaluate``
reads (a run's ``predictions/``, ``make predict`` outputs, a prediction csv). A listed frame without
a prediction (no face found there, a ``stride`` gap, past the last predicted frame) takes the
prediction of the nearest predicted frame of the same video; a video without any takes the
training prior (``data``'s training split: mean VA, most frequent expression, AU base rates over
``au_threshold``). A sentinel (-5, -1) never reaches the file. A list that names a video the
predictions do not hold is refused, naming it, and nothing is written; the file written is
checked with the validator before it is put in place.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.abaw import AUS, EXPRESSIONS, INVALID, TASKS
from pipeline.atomic import atomic_output
from pipeline.cli import run_stage
from pipeline.config import Config, ConfigError, InputError, check_choices
from pipeline.inference import fill_missing
from pipeline.labels import AnnotationError, load_annotations
from pipeline.writers import MTL_HEADER_LINE, TASK_FILE_HEADERS, read_predictions

log = logging.getLogger("pipeline")

LAYOUTS = ("abaw5_tasks", "abaw_mtl")
CHOICES = {"layout": LAYOUTS}
IMAGE = re.compile(r"^(?P<video>[^,\s]+)/(?P<number>\d{5})\.jpg$")


class ListError(ValueError):
    """A test list or a submission that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Listing:
    """The organisers' list: the images to submit, in order, and the header the file must have."""

    path: Path
    layout: str
    tasks: tuple[str, ...]  # the tasks of the file: one for abaw5_tasks, all three for abaw_mtl
    header: str  # the submission's header line
    images: tuple[str, ...]  # "video/00001.jpg", in the list's order
    videos: tuple[str, ...]  # of each image
    frames: np.ndarray  # (n,) int64 frame of each image, from 0


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ListError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    return [ln.strip() for ln in text.splitlines()]


def read_listing(path: str | Path, layout: str) -> Listing:
    """The organisers' list or sample file of ``layout`` (see the module docstring)."""
    path = Path(path)
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r}: choose one of {', '.join(LAYOUTS)}")
    lines = _lines(path)
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ListError(f"{path}: empty; the organisers' list has a header line and one image per line")
    first = lines[0]
    if layout == "abaw5_tasks":
        tasks = tuple(t for t, h in TASK_FILE_HEADERS.items() if h == first)
        if not tasks:
            raise ListError(f"{path}:1: header {first!r} is none of the challenges' sample headers: "
                            + " | ".join(TASK_FILE_HEADERS.values()))
        header = first
    else:
        tasks, header = TASKS, MTL_HEADER_LINE
        if IMAGE.match(first.split(",")[0]):
            raise ListError(f"{path}:1: {first!r}: the multi-task list starts with a header line")
    images, videos, frames, seen = [], [], [], {}
    for number, line in enumerate(lines[1:], start=2):
        image = line.split(",")[0]
        m = IMAGE.match(image)
        if not m or int(m["number"]) < 1:
            raise ListError(f"{path}:{number}: {line!r} is not an image name such as video/00001.jpg")
        if image in seen:
            raise ListError(f"{path}:{number}: {image} is listed twice (first on line {seen[image]})")
        seen[image] = number
        images.append(image)
        videos.append(m["video"])
        frames.append(int(m["number"]) - 1)
    if not images:
        raise ListError(f"{path}: a header and no image")
    return Listing(path, layout, tasks, header, tuple(images), tuple(videos), np.asarray(frames, np.int64))


# ---- the values of each row ------------------------------------------------------------------------


def prior_of(data: Config, au_threshold: float) -> dict:
    """The training prior of ``data``'s training split: mean VA, most frequent expression, and each
    AU present where its base rate reaches ``au_threshold``."""
    from pipeline.metrics import prior_from_labels

    labels = load_annotations(data.annotations, "train", data.get("format", "auto"))
    prior = prior_from_labels(labels)
    if "au" in prior:
        prior["au"] = (np.asarray(prior["au"]) >= au_threshold).astype(np.float32)
    return prior


def _valid(task: str, values: np.ndarray) -> np.ndarray:
    return values >= 0 if task == "expr" else np.isfinite(values).all(1)


def filled(pred: dict[str, np.ndarray], task: str, frames: np.ndarray, prior: dict | None,
           video: str) -> tuple[np.ndarray, int]:
    """``task``'s values at ``frames`` of one video's dense predictions, each frame without one
    taken from the nearest predicted frame (past the last one: the last), a video without any
    from ``prior``. Returns the values and how many frames were filled."""
    values = pred[task]
    n = max(len(values), int(frames.max()) + 1)
    missing = -1 if task == "expr" else np.nan
    dense = np.full((n, *values.shape[1:]), missing, values.dtype)
    dense[: len(values)] = values
    valid = _valid(task, dense)
    if not valid.any():
        if prior is None or prior.get(task) is None:
            raise InputError(f"{video}: no frame has a {task} prediction, and no training prior to fill it with: "
                             "give data=<the data set the model was trained on>")
        return np.broadcast_to(np.asarray(prior[task], dense.dtype), (len(frames), *values.shape[1:])).copy(), \
            len(frames)
    out = fill_missing(dense, valid)[frames]
    return out, int((~valid[frames]).sum())


def _cells(task: str, v: np.ndarray, au_threshold: float) -> list[str]:
    if task == "va":
        return [f"{x:.6f}" for x in np.clip(v, -1.0, 1.0)]
    if task == "expr":
        return [str(int(v))]
    return [str(int(x >= au_threshold)) for x in v]


def rows(listing: Listing, preds: dict[str, dict[str, np.ndarray]], prior: dict | None,
         au_threshold: float = 0.5) -> tuple[list[str], dict[str, int]]:
    """The submission's lines (header first) for ``listing`` from dense ``preds`` per video, and
    per task how many listed frames were filled."""
    unknown = sorted(set(listing.videos) - set(preds))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise InputError(f"{listing.path}: lists video {unknown[0]}{more}, which the predictions do not hold; "
                         "nothing written")
    for task in listing.tasks:  # a task the predictions never give would be the prior alone: refused
        if not any(_valid(task, p[task]).any() for p in preds.values()):
            raise InputError(f"{listing.path}: the list asks for {task}, which the predictions hold for no frame; "
                             "nothing written")
    videos = np.asarray(listing.videos)
    values: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(listing.tasks, 0)
    for task in listing.tasks:
        width = {"va": 2, "expr": None, "au": len(AUS)}[task]
        out = np.zeros((len(videos), width) if width else len(videos), np.float64)
        for video in dict.fromkeys(listing.videos):
            at = np.flatnonzero(videos == video)
            out[at], n = filled(preds[video], task, listing.frames[at], prior, video)
            counts[task] += n
        values[task] = out
    lines = [listing.header]
    for k, image in enumerate(listing.images):
        lines.append(",".join([image, *(c for t in listing.tasks for c in _cells(t, values[t][k], au_threshold))]))
    return lines, counts


# ---- the validator -------------------------------------------------------------------------------------


def _check_values(task: str, cells: list[str]) -> str | None:
    """What is wrong with one task's cells of a row, or None."""
    try:
        nums = [float(c) for c in cells]
    except ValueError:
        return f"{task} values {','.join(cells)!r} are not numbers"
    if any(not math.isfinite(x) for x in nums):
        return f"{task} values {','.join(cells)} are not finite"
    if task == "va":
        if any(x == INVALID["va"] for x in nums):
            return f"valence/arousal {','.join(cells)} holds the sentinel -5 (a frame without a prediction)"
        if any(abs(x) > 1 for x in nums):
            return f"valence/arousal {','.join(cells)} outside [-1, 1]"
        return None
    if any(x == -1 for x in nums):
        return f"{task} {','.join(cells)} holds the sentinel -1 (a frame without a prediction)"
    if task == "expr" and not (nums[0].is_integer() and 0 <= nums[0] < len(EXPRESSIONS)):
        return f"expression {cells[0]} is not a class 0-{len(EXPRESSIONS) - 1}"
    if task == "au" and any(x not in (0.0, 1.0) for x in nums):
        return f"AU values {','.join(cells)} are not 0 or 1"
    return None


WIDTHS = {"va": 2, "expr": 1, "au": len(AUS)}


def check(path: str | Path, listing: Listing) -> str | None:
    """Why ``path`` is not a valid submission for ``listing``, in one line naming the line, or None."""
    path = Path(path)
    try:
        lines = _lines(path)
    except ListError as e:
        return str(e)
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        return f"{path}: empty"
    if lines[0] != listing.header:
        return f"{path}:1: header {lines[0]!r}, not {listing.header!r}"
    body = lines[1:]
    wanted = {image: k for k, image in enumerate(listing.images)}
    given = {line.split(",")[0] for line in body}
    for k, line in enumerate(body):
        where = f"{path}:{k + 2}"
        cells = line.split(",")
        image = cells[0]
        if k >= len(listing.images):
            return f"{where}: extra row {image}: the list has {len(listing.images)} images"
        expected = listing.images[k]
        if image != expected:
            if image not in wanted:
                return f"{where}: {image} is not in the list {listing.path.name}"
            if expected not in given:
                return f"{where}: no row for {expected} (the list's next image); {image} is here"
            return f"{where}: {image} out of the list's order (expected {expected})"
        values = cells[1:]
        need = sum(WIDTHS[t] for t in listing.tasks)
        if len(values) != need:
            return f"{where}: {len(values)} values, {need} expected ({'+'.join(listing.tasks)})"
        start = 0
        for task in listing.tasks:
            problem = _check_values(task, values[start : start + WIDTHS[task]])
            if problem:
                return f"{where}: {image}: {problem}"
            start += WIDTHS[task]
    if len(body) < len(listing.images):
        return (f"{path}: {len(listing.images) - len(body)} listed images have no row, from "
                f"{listing.images[len(body)]} on")
    return None


# ---- the stage -------------------------------------------------------------------------------------------


def main(cfg: Config) -> int:
    """Write the submission of ``cfg`` (0), or with ``check`` say whether a file is one (0 or 1)."""
    check_choices(cfg, CHOICES)
    if not cfg.list:
        raise ConfigError("set list=<the organisers' test list or sample file>")
    try:
        listing = read_listing(cfg.list, cfg.layout)
    except ListError as e:
        raise InputError(str(e)) from None
    if cfg.check:
        problem = check(cfg.check, listing)
        if problem:
            print(f"not a valid submission: {problem}")
            return 1
        print(f"{cfg.check}: a valid {cfg.layout} submission: {len(listing.images)} rows in the list's order, "
              f"{'+'.join(listing.tasks)}")
        return 0
    if not cfg.predictions or not cfg.out:
        raise ConfigError("set predictions=<folder or file> and out=<file> (or check=<file> to validate one)")
    try:
        preds = read_predictions(cfg.predictions)
    except (AnnotationError, FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    prior = None
    faceless = [v for v in dict.fromkeys(listing.videos) if v in preds
                and not all(_valid(t, preds[v][t]).any() for t in listing.tasks)]
    if faceless:  # only then is the training split read
        try:
            prior = prior_of(cfg.data, cfg.au_threshold)
        except (AnnotationError, FileNotFoundError, ValueError) as e:
            raise InputError(f"{faceless[0]} has no predicted frame, and the training prior of data="
                             f"{cfg.data.get('name', '')} cannot be read: {e}") from None
        log.info("%d listed videos without any predicted frame take the training prior of %s: %s",
                 len(faceless), cfg.data.get("name", "the data"), ", ".join(faceless[:3]))
    lines, counts = rows(listing, preds, prior, cfg.au_threshold)
    out = Path(cfg.out)
    with atomic_output(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
        problem = check(tmp, listing)
        if problem:  # never put an invalid file in place
            raise RuntimeError(f"the submission written does not pass the validator: {problem}")
    filled_text = ", ".join(f"{t}: {n}" for t, n in counts.items())
    print(f"submission: {len(listing.images)} rows ({'+'.join(listing.tasks)}) in the order of {listing.path} "
          f"-> {out}; frames filled from the nearest predicted frame or the prior: {filled_text}")
    return 0


def _flags(argv: list[str]) -> list[str]:
    """``--check FILE --list LIST [--layout L]`` as the stage's ``check=... list=... layout=...``."""
    if "--check" not in argv:
        return argv
    parser = argparse.ArgumentParser(prog="python -m pipeline.submit")
    parser.add_argument("--check", required=True)
    parser.add_argument("--list", required=True)
    parser.add_argument("--layout", default="abaw5_tasks", choices=LAYOUTS)
    known, rest = parser.parse_known_args(argv)
    return [*rest, f"check={known.check}", f"list={known.list}", f"layout={known.layout}"]


def cli() -> None:
    """The ``affect-submit`` command, the same as ``python -m pipeline.submit``."""
    run_stage("submit", main, _flags(sys.argv[1:]))


if __name__ == "__main__":
    cli()
