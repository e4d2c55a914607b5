"""Stage: an ABAW test submission, exactly one row per listed frame, from finished training runs
or from predictions; and a validator.

    python -m pipeline.submit runs=[<run folder>, ...] list=<the organisers' list> layout=abaw5_tasks out=<file>
    python -m pipeline.submit predictions=<folder or file> list=<the organisers' list> out=<file>
    python -m pipeline.submit --check FILE --list TESTLIST [--layout abaw5_tasks | abaw_mtl | abaw3_tasks]

Layouts (the edition's; the organisers send the list or sample file with the test set; the README
says where each rule comes from):

- ``abaw5_tasks`` (ABAW5 and later uni-task challenges): one file per challenge. The list is the
  organisers' sample file: a header, ``image_location,valence,arousal`` /
  ``image_location,Neutral,...,Other`` / ``image_location,AU1,...,AU26``, then one row per image,
  ``video/00001.jpg,...``. The submission copies the header and the rows' order: VA as two
  numbers in [-1, 1], the expression as a class index 0-7, AUs as twelve 0/1 values.
- ``abaw_mtl`` (the multi-task challenge of ABAW3, ABAW4, ABAW7 and later): the list is a header
  line and one ``video/00001.jpg`` per line (its other fields, if any, are ignored); the
  submission has the header ``image,valence,arousal,expression,aus`` and one row per listed image,
  ``video/00001.jpg,v,a,expr,au1,...,au12``, in the list's order.
- ``abaw3_tasks`` (the uni-task challenges of ABAW2 and ABAW3): the list names one video per line
  (its task from its file name, or ``task``); the submission is a folder ``out/<task folder>/``
  (ABAW3's names) with one txt per listed video: the task's header, then one row per frame, as
  many as ``frames_per_video`` says (the decoder's count plus one by default).

Image ``video/00001.jpg`` is frame 0 of ``video``. With ``runs`` the listed videos are predicted
from their features (``test_data``'s, else the runs' own data set's) as each run's validation
scored them; several runs' outputs are averaged per frame. With ``predictions``, any layout
``make evaluate`` reads is written as it is. A listed frame without a prediction (no face found
there, a ``stride`` gap, past the last predicted frame) takes the prediction of the nearest
predicted frame of the same video; a video without any takes the training prior (the runs'
training split, or ``data``'s: mean VA, most frequent expression, AU base rates). A sentinel (-5,
-1) never reaches the file. A list that names a video the data does not hold, or an image past a
video's last frame, is refused, naming it, and nothing is written; the file written is checked
with the validator before it is put in place.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from models.abaw import AUS, EXPRESSIONS, INVALID, TASKS
from pipeline.atomic import atomic_output
from pipeline.cli import run_stage
from pipeline.config import DEVICE, Config, ConfigError, InputError, check_choices
from pipeline.feature_cache import FeatureCache, PooledCache
from pipeline.inference import fill_missing
from pipeline.labels import (
    TASK_DIRS,
    TASK_HEADERS,
    AnnotationError,
    expression_set,
    load_annotations,
    restrict_expressions,
    task_dir,
)
from pipeline.writers import MTL_HEADER_LINE, TASK_FILE_HEADERS, read_predictions

log = logging.getLogger("pipeline")

LAYOUTS = ("abaw5_tasks", "abaw_mtl", "abaw3_tasks")
VIDEO_COUNTS = ("decoder_plus_one", "decoder")  # abaw3_tasks: rows per video file
# abaw3_tasks: the task of a list, from the words of the organisers' file names
# (Valence_Arousal_Estimation_Challenge_test_set_release.txt, Expression_Classification_..., Action_Unit_...)
ABAW3_DIRS = {"va": "VA_Estimation_Challenge", "expr": "EXPR_Classification_Challenge", "au": "AU_Detection_Challenge"}
LIST_TASK_NAMES = {"va": r"valence|arousal|(^|[^a-z])va([^a-z]|$)", "expr": r"expr",
                   "au": r"action_unit|(^|[^a-z])au([^a-z]|$)"}
CHOICES = {"layout": LAYOUTS, "device": DEVICE, "frames_per_video": VIDEO_COUNTS, "task": ("", *TASKS)}
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
    listed: tuple[str, ...] = ()  # abaw3_tasks: the listed videos, whose images follow their frame counts

    def per_video(self) -> bool:
        return self.layout == "abaw3_tasks"

    def with_counts(self, counts: dict[str, int]) -> Listing:
        """An abaw3_tasks list with every frame of each listed video, ``counts[video]`` of them."""
        images, videos, frames = [], [], []
        for video in self.listed:
            images += [f"{video}/{k + 1:05d}.jpg" for k in range(counts[video])]
            videos += [video] * counts[video]
            frames.append(np.arange(counts[video], dtype=np.int64))
        return replace(self, images=tuple(images), videos=tuple(videos), frames=np.concatenate(frames))


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ListError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    return [ln.strip() for ln in text.splitlines()]


def list_task(path: Path, task: str = "") -> str:
    """The task of an abaw3_tasks list: ``task``, else the one its file name names."""
    if task:
        return task
    name = path.stem.lower()
    named = [t for t, pattern in LIST_TASK_NAMES.items() if re.search(pattern, name)]
    if len(named) != 1:
        raise ListError(f"{path}: its name does not say which challenge it lists (Valence_Arousal, Expression or "
                        "Action_Unit); give task=va, expr or au")
    return named[0]


def read_video_list(path: Path, lines: list[str], task: str) -> Listing:
    """An ABAW3-style per-task test list: one video name per line."""
    names, seen = [], {}
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        if not re.fullmatch(r"[^,/\s]+", line):
            raise ListError(f"{path}:{number}: {line!r} is not a video name (the ABAW3 lists name one video a line)")
        if line in seen:
            raise ListError(f"{path}:{number}: {line} is listed twice (first on line {seen[line]})")
        seen[line] = number
        names.append(line)
    if not names:
        raise ListError(f"{path}: names no video")
    names_of = EXPRESSIONS if task == "expr" else TASK_HEADERS[task]  # _expression_header: the class set's
    return Listing(path, "abaw3_tasks", (task,), ",".join(names_of), (), (), np.zeros(0, np.int64), tuple(names))


def read_listing(path: str | Path, layout: str, task: str = "") -> Listing:
    """The organisers' list or sample file of ``layout`` (see the module docstring); for
    ``abaw3_tasks``, ``task`` when the file's name does not say it."""
    path = Path(path)
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r}: choose one of {', '.join(LAYOUTS)}")
    lines = _lines(path)
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ListError(f"{path}: empty; the organisers' list has a header line and one image per line")
    if layout == "abaw3_tasks":
        return read_video_list(path, lines, list_task(path, task))
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


# The organisers' list files of each layout, as the editions named them.
LIST_FILES = {
    "abaw5_tasks": {"va": "CVPR_ABAW_VA_test_set_sample.txt", "expr": "CVPR_ABAW_EXPR_test_set_sample.txt",
                    "au": "CVPR_ABAW_AU_test_set_sample.txt"},
    "abaw_mtl": {"mtl": "MTL_Challenge_test_set_release.txt"},
    "abaw3_tasks": {"va": "Valence_Arousal_Estimation_Challenge_test_set_release.txt",
                    "expr": "Expression_Classification_Challenge_test_set_release.txt",
                    "au": "Action_Unit_Detection_Challenge_test_set_release.txt"},
}


def write_test_lists(folder: str | Path, videos: dict[str, int]) -> list[Path]:
    """Lists of ``videos`` (name -> frames) in every layout's form, every frame listed: the
    sample files of ABAW5 and later, the multi-task list, ABAW3's video lists. Returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = [f"{v}/{k + 1:05d}.jpg" for v, n in videos.items() for k in range(n)]
    texts = {**{LIST_FILES["abaw5_tasks"][t]: [TASK_FILE_HEADERS[t], *(f"{i}," for i in images)] for t in TASKS},
             LIST_FILES["abaw_mtl"]["mtl"]: [MTL_HEADER_LINE, *images],
             **{LIST_FILES["abaw3_tasks"][t]: list(videos) for t in TASKS}}
    written = []
    for name, lines in texts.items():
        (folder / name).write_text("\n".join(lines) + "\n")
        written.append(folder / name)
    return written


# ---- the values of each row ------------------------------------------------------------------------


def prior_of(data: Config) -> dict:
    """The training prior of ``data``'s training split: mean VA, most frequent expression, each
    AU's base rate (a probability, thresholded as the predictions are)."""
    from pipeline.metrics import prior_from_labels

    labels = load_annotations(data.annotations, data.get("train_split", "train"), data.get("format", "auto"))
    name = data.get("expressions", "abaw8")
    return prior_from_labels({v: restrict_expressions(lab, name) for v, lab in labels.items()})


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


def _cells(task: str, v: np.ndarray, au_thresholds: np.ndarray | float) -> list[str]:
    if task == "va":
        return [f"{x:.6f}" for x in np.clip(v, -1.0, 1.0)]
    if task == "expr":
        return [str(int(v))]
    return [str(int(x)) for x in np.asarray(v) >= au_thresholds]


def rows(listing: Listing, preds: dict[str, dict[str, np.ndarray]], prior: dict | None,
         au_thresholds: np.ndarray | float = 0.5) -> tuple[list[str], dict[str, int]]:
    """The submission's lines (header first) for ``listing`` from dense ``preds`` per video, and
    per task how many listed frames were filled."""
    _refuse_unknown(listing, set(preds), "the predictions")
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
        lines.append(",".join([image, *(c for t in listing.tasks for c in _cells(t, values[t][k], au_thresholds))]))
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


def check_per_video(folder: Path, listing: Listing, counts: dict[str, int] | None = None) -> str | None:
    """Why ``folder`` (the task's folder of an abaw3_tasks submission) is not valid for ``listing``:
    one file per listed video, the header, a valid row per frame (``counts[video]`` rows where
    known); or None."""
    task = listing.tasks[0]
    extra = sorted(set(p.stem for p in folder.glob("*.txt")) - set(listing.listed))
    if extra:
        return f"{folder / extra[0]}.txt: {extra[0]} is not in the list {listing.path.name}"
    for video in listing.listed:
        path = folder / f"{video}.txt"
        if not path.is_file():
            return f"{path}: no file for {video}, which the list names"
        lines = _lines(path)
        while lines and not lines[-1]:
            lines.pop()
        if not lines or lines[0] != listing.header:
            return f"{path}:1: header {lines[0] if lines else ''!r}, not {listing.header!r}"
        body = lines[1:]
        want = None if counts is None else counts[video]
        if want is not None and len(body) != want:
            return f"{path}: {len(body)} rows, {want} expected (one per frame of {video})"
        if not body:
            return f"{path}: a header and no row"
        for k, line in enumerate(body):
            cells = line.split(",")
            if len(cells) != WIDTHS[task]:
                return f"{path}:{k + 2}: {len(cells)} values, {WIDTHS[task]} expected ({task})"
            problem = _check_values(task, cells)
            if problem:
                return f"{path}:{k + 2}: {problem}"
    return None


def check(path: str | Path, listing: Listing, counts: dict[str, int] | None = None) -> str | None:
    """Why ``path`` is not a valid submission for ``listing``, in one line naming the line, or None;
    an abaw3_tasks submission is a folder (:func:`check_per_video`, ``counts`` its rows per video)."""
    path = Path(path)
    if listing.per_video():  # the submission's folder, or its task folder
        task = listing.tasks[0]
        folder = path if path.name in TASK_DIRS[task] else task_dir(path, task)
        if folder is None:
            return f"{path}: no {ABAW3_DIRS[task]}/ folder of per-video files"
        return check_per_video(folder, listing, counts)
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


# ---- predictions of finished training runs ---------------------------------------------------------------


@dataclass
class Predicted:
    """What a submission is made from: the list (an abaw3_tasks list with its frames), dense
    predictions per listed video (as :func:`pipeline.writers.read_predictions` gives them; AUs as
    probabilities or decisions), the AU thresholds, the training prior (read only when a listed
    video has no face at all) and, for abaw3_tasks, the rows each video's file must have."""

    listing: Listing
    preds: dict[str, dict[str, np.ndarray]]
    au_thresholds: np.ndarray | float
    prior: Callable[[], dict]
    counts: dict[str, int] | None = None


def test_features(member, test_data: str) -> tuple[FeatureCache | PooledCache, str]:
    """The features that hold the listed videos and the name of their data set: those of
    ``test_data`` (a data set's name or YAML) computed as the run's were (the same extractor
    weights), else the run's own."""
    from pipeline.config import load_component
    from pipeline.data import feature_paths
    from pipeline.splits import open_features

    cfg = member.cfg
    if not test_data:
        if cfg.data.get("members"):
            raise ConfigError(f"{member.folder} trained on {cfg.data.name} pooled: give test_data=<the data set "
                              "whose features hold the listed videos>")
        return open_features(cfg), cfg.data.name
    data = load_component("data", test_data)
    try:
        cache = FeatureCache(feature_paths(cfg.runs_dir, data["name"], cfg.extractors))
    except (OSError, ValueError) as e:
        raise InputError(str(e)) from None
    trained = member.ckpt.recipe.feature_attrs or [{}] * len(cfg.extractors)
    for name, was, now in zip(cfg.extractors, trained, cache.attrs, strict=True):
        if was.get("weights_sha256") and was["weights_sha256"] != now.get("weights_sha256"):
            raise InputError(f"{cache.paths[0].parent}: {name} features of {data['name']} come from weights with "
                             f"SHA-256 {str(now.get('weights_sha256'))[:16]}, not the {was['weights_sha256'][:16]} "
                             f"{member.folder} was trained on")
    return cache, data["name"]


def member_predictions(member, cache, listing: Listing, tuned: bool, device: str) -> dict:
    """One run's outputs on each listed video (as :func:`pipeline.ensemble.member_outputs` would
    compute them on validation), VA smoothed as chosen on validation when ``tuned``."""
    from pipeline import checkpoint
    from pipeline.data import Normaliser
    from pipeline.inference import smooth
    from pipeline.validation import video_outputs

    if member.cfg.noise_features:
        raise InputError(f"{member.folder}: a noise-control run (noise_features=true) predicts nothing from faces")
    model, ckpt = checkpoint.load(member.folder / "best.pt", device)
    how = ckpt.inference
    norm = Normaliser.from_state(how.normaliser) if how.normaliser else None
    videos = np.asarray(listing.videos)
    out = {}
    for video in dict.fromkeys(listing.videos):
        pred = video_outputs(model, cache, video, norm, member.cfg, scored=listing.frames[videos == video])
        if pred is None:  # a run trained on labelled frames, none of them cached: no face anywhere
            pred = {"frame": np.zeros(0, np.int64)}
        if tuned and pred.get("va") is not None:
            pred["va"] = smooth(pred["va"], how.va_smoothing, how.va_smoothing_edges)
        out[video] = pred
    return out


def _refuse_unknown(listing: Listing, held: set[str], where: str) -> None:
    unknown = [v for v in dict.fromkeys(listing.listed or listing.videos) if v not in held]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise InputError(f"{listing.path}: lists video {unknown[0]}{more}, which {where} do not hold; nothing written")


def _expression_header(listing: Listing, expressions: str) -> Listing:
    """An abaw3_tasks expression list's header: the class names of the predictions' set."""
    if listing.per_video() and listing.tasks == ("expr",):
        return replace(listing, header=",".join(expression_set(expressions)))
    return listing


def run_predictions(cfg: Config, listing: Listing) -> Predicted:
    """The listed videos predicted by the finished training runs ``cfg.runs``: one run's outputs,
    or several runs' averaged frame by frame as :mod:`pipeline.ensemble` averages them."""
    from pipeline import ensemble, metrics
    from pipeline.splits import expressions, load_splits, open_features

    members = [ensemble.load_member(Path(r)) for r in cfg.runs]
    ensemble.check_members(members)
    for m in members:
        m.cfg.device = cfg.device
    first = members[0]
    cache, data_name = test_features(first, cfg.test_data)
    _refuse_unknown(listing, set(cache.videos), f"the features {cache.paths[0]}")
    decoded = {v: decoded_frames(first.cfg.runs_dir, data_name, v) for v in dict.fromkeys(listing.listed
                                                                                          or listing.videos)}
    counts = None
    if listing.per_video():
        unknown = [v for v, n in decoded.items() if n is None]
        if unknown:
            log.warning("%s: the decoder's frame count is not known (crops without their video); its file gets "
                        "one row per frame up to the last crop, counted as the decoder's count", unknown[0])
        counts = {v: rows_per_video(n if n is not None else int(cache.index(v)[1].max()) + 1, cfg.frames_per_video)
                  for v, n in decoded.items()}
        listing = _expression_header(listing.with_counts(counts), expressions(first.cfg))
    else:  # an image past a video's last decoded frame is not in the data
        videos = np.asarray(listing.videos)
        for video, n in decoded.items():
            beyond = listing.frames[(videos == video) & (listing.frames >= n)] if n is not None else []
            if len(beyond):
                raise InputError(f"{listing.path}: lists {video}/{beyond[0] + 1:05d}.jpg, past the last of the "
                                 f"{n} frames the decoder gives for {video}; nothing written")
    total: dict = {}
    for m in members:
        log.info("predicting %d listed videos with %s", len(set(listing.videos)), m.folder)
        ensemble.add_outputs(total, member_predictions(m, cache, listing, cfg.tuned, cfg.device), m.folder,
                             first.folder)
    preds = {}
    for video, pred in ensemble.mean_outputs(total).items():
        n = int(pred["frame"].max()) + 1 if len(pred["frame"]) else 0
        preds[video] = metrics.dense_predictions(pred, n)
    thresholds: np.ndarray | float = 0.5
    if cfg.tuned and any("au" in m.cfg.model.tasks for m in members):
        chosen = [m.ckpt.inference.au_thresholds for m in members if "au" in m.cfg.model.tasks]
        if any(t is None for t in chosen):
            raise InputError("tuned=true: a run holds no AU thresholds chosen on validation "
                             "(trained with tune_au_thresholds=false)")
        thresholds = np.mean(np.asarray(chosen, np.float64), 0)

    def prior() -> dict:  # the first run's training prior, as its validation scores used it
        train_labels, _, train_videos, _ = load_splits(first.cfg, open_features(first.cfg))
        return metrics.prior_from_labels({v: train_labels[v] for v in train_videos})

    return Predicted(listing, preds, thresholds, prior, counts)


def given_predictions(cfg: Config, listing: Listing) -> Predicted:
    """The predictions ``cfg.predictions`` as they are, AUs thresholded at ``cfg.au_threshold``; an
    abaw3_tasks video has as many frames as it has predictions."""
    try:
        preds = read_predictions(cfg.predictions)
    except (AnnotationError, FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    counts = None
    if listing.per_video():
        _refuse_unknown(listing, set(preds), f"the predictions {cfg.predictions}")
        counts = {v: rows_per_video(len(preds[v][listing.tasks[0]]), cfg.frames_per_video) for v in listing.listed}
        listing = _expression_header(listing.with_counts(counts), cfg.data.get("expressions", "abaw8"))
    return Predicted(listing, preds, cfg.au_threshold, lambda: prior_of(cfg.data), counts)


# ---- ABAW3's per-video files -----------------------------------------------------------------------------


def decoded_frames(runs_dir: str | Path, data_name: str, video: str) -> int | None:
    """How many frames the decoder gave for ``video`` (its face file's, ``runs/<data>/faces/<video>.h5``),
    or None where that is not known (no face file; crops imported without their video)."""
    import h5py

    faces = Path(runs_dir) / data_name / "faces" / f"{video}.h5"
    if not faces.is_file():
        return None
    with h5py.File(faces, "r") as f:
        attrs = dict(f.attrs)
    if "n_frames" not in attrs or attrs.get("video") == attrs.get("source"):  # crops alone: the last crop's number
        return None
    return int(attrs["n_frames"])


def rows_per_video(decoded: int, rule: str) -> int:
    """The rows of a per-video file for a video of ``decoded`` frames under ``frames_per_video``."""
    return decoded + 1 if rule == "decoder_plus_one" else decoded


def write_per_video(out: Path, listing: Listing, lines: list[str], counts: dict[str, int]) -> Path:
    """The rows of :func:`rows` as one file per listed video under ``out/<the task's folder>/``
    (ABAW3's names), the folder replaced whole once it passes the validator; returns it."""
    task = listing.tasks[0]
    groups: dict[str, list[str]] = {}
    for line in lines[1:]:
        image, _, cells = line.partition(",")
        groups.setdefault(image.rpartition("/")[0], []).append(cells)
    folder = out / ABAW3_DIRS[task]
    with atomic_output(folder) as tmp:
        tmp.mkdir(parents=True)
        for video in listing.listed:
            (tmp / f"{video}.txt").write_text("\n".join([listing.header, *groups[video]]) + "\n")
        problem = check_per_video(tmp, listing, counts)
        if problem:  # never put an invalid folder in place
            raise RuntimeError(f"the submission written does not pass the validator: {problem}")
    return folder


# ---- the stage -------------------------------------------------------------------------------------------


def main(cfg: Config) -> int:
    """Write the submission of ``cfg`` (0), or with ``check`` say whether a file is one (0 or 1)."""
    check_choices(cfg, CHOICES)
    if not cfg.list:
        raise ConfigError("set list=<the organisers' test list or sample file>")
    try:
        listing = read_listing(cfg.list, cfg.layout, cfg.task)
    except ListError as e:
        raise InputError(str(e)) from None
    if cfg.check:
        problem = check(cfg.check, listing)
        if problem:
            print(f"not a valid submission: {problem}")
            return 1
        rows_said = (f"a file for each of the {len(listing.listed)} listed videos (row counts follow the "
                     "decoder and are not checked here)" if listing.per_video()
                     else f"{len(listing.images)} rows in the list's order")
        print(f"{cfg.check}: a valid {cfg.layout} submission: {rows_said}, {'+'.join(listing.tasks)}")
        return 0
    if bool(cfg.predictions) == bool(cfg.runs) or not cfg.out:
        raise ConfigError("set out=<file> and either runs=[<run folder>, ...] (a checkpoint, or several averaged) "
                          "or predictions=<folder or file> (or check=<file> to validate one)")
    made = run_predictions(cfg, listing) if cfg.runs else given_predictions(cfg, listing)
    listing, preds = made.listing, made.preds
    prior = None
    faceless = [v for v in dict.fromkeys(listing.videos) if v in preds
                and not all(_valid(t, preds[v][t]).any() for t in listing.tasks)]
    if faceless:  # only then is the training split read
        where = "the runs' training data" if cfg.runs else f"data={cfg.data.get('name', '')}"
        try:
            prior = made.prior()
        except (AnnotationError, FileNotFoundError, ValueError) as e:
            raise InputError(f"{faceless[0]} has no predicted frame, and the training prior of {where} "
                             f"cannot be read: {e}") from None
        log.info("%d listed videos without any predicted frame take the training prior of %s: %s",
                 len(faceless), where, ", ".join(faceless[:3]))
    lines, counts = rows(listing, preds, prior, made.au_thresholds)
    out = Path(cfg.out)
    if listing.per_video():
        out = write_per_video(out, listing, lines, made.counts)
    else:
        with atomic_output(out) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
            problem = check(tmp, listing)
            if problem:  # never put an invalid file in place
                raise RuntimeError(f"the submission written does not pass the validator: {problem}")
    filled_text = ", ".join(f"{t}: {n}" for t, n in counts.items())
    print(f"submission: {len(listing.images)} rows ({'+'.join(listing.tasks)}) in the order of {listing.path} "
          f"-> {out}; listed frames beyond the predictions, filled from the nearest predicted frame or the prior: "
          f"{filled_text}")
    return 0


def _flags(argv: list[str]) -> list[str]:
    """``--check FILE --list LIST [--layout L]`` as the stage's ``check=... list=... layout=...``."""
    if "--check" not in argv:
        return argv
    parser = argparse.ArgumentParser(prog="python -m pipeline.submit")
    parser.add_argument("--check", required=True)
    parser.add_argument("--list", required=True)
    parser.add_argument("--layout", default="abaw5_tasks", choices=LAYOUTS)
    parser.add_argument("--task", default="", choices=("", *TASKS))
    known, rest = parser.parse_known_args(argv)
    task = [f"task={known.task}"] if known.task else []
    return [*rest, f"check={known.check}", f"list={known.list}", f"layout={known.layout}", *task]


def cli() -> None:
    """The ``affect-submit`` command, the same as ``python -m pipeline.submit``."""
    run_stage("submit", main, _flags(sys.argv[1:]))


if __name__ == "__main__":
    cli()
