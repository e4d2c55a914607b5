"""Average the per-frame outputs of finished training runs and score them as one model.

    python -m pipeline.ensemble RUN_DIR RUN_DIR ... [device=cpu]
    python -m pipeline.ensemble runs=[RUN_DIR,RUN_DIR] ...

Its defaults are ``configs/ensemble.yaml``.

A run's ``predictions/`` hold decisions (classes, 0/1 AUs), which do not average, so each member's
validation outputs are computed again from its ``best.pt`` on its own features, as training scored
them: valence/arousal, expression probabilities and AU probabilities. Each task is averaged frame by
frame over the members that predict it (a frame where a member has no output is averaged over the
others), then scored like a run: over every labelled validation frame, those without any output
taking the training split's prior (:func:`pipeline.metrics.prior_from_labels`), AUs at 0.5 for the
headline. When every member with AUs holds tuned thresholds, ``f1_au_tuned`` is F1-AU at their mean
(chosen on the same validation split, so as optimistic as a run's own); VA smoothing is not applied.

The members must be finished runs of one data set (the same ``data`` section) with the same
validation videos and frames. The result goes to ``<runs_dir>/<data>/ensembles/<hash>/`` (the
``runs_dir`` of the member whose identity sorts first), the hash naming the sorted identities of the
members: ``scores.json``,
``members.json`` (each member's folder, identity and own ``scores.json``) and the ABAW per-task
``predictions/``. The same members again skip. Prints each member's P_MTL and its terms, from its
``scores.json``, above the ensemble's.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.abaw import TASKS
from pipeline import checkpoint, metrics
from pipeline.atomic import write_json
from pipeline.checkpoint import Checkpoint
from pipeline.cli import Program
from pipeline.config import DEVICE, Config, ConfigError, InputError, check_choices, load_config
from pipeline.data import Normaliser
from pipeline.identity import run_identity
from pipeline.runs import STOPS, claimed, stop
from pipeline.splits import expressions, load_splits, open_features
from pipeline.validation import validate
from pipeline.writers import write_task_files

log = logging.getLogger("pipeline")

CHOICES = {"device": DEVICE}
COLUMNS = metrics.SCORE_COLUMNS

Outputs = dict[str, dict[str, np.ndarray]]


@dataclass
class Member:
    """One finished training run: its folder, checkpoint contents, config and own scores."""

    folder: Path
    ckpt: Checkpoint
    cfg: Config  # the run's config, with the defaults of top-level keys added since
    scores: dict

    @property
    def identity(self) -> str:
        return self.ckpt.recipe.identity


def load_member(folder: Path) -> Member:
    """A run folder -> its :class:`Member`; a folder that is not a finished run is an InputError."""
    if not (folder / "best.pt").is_file():
        raise InputError(f"{folder}: not a training run folder (no best.pt)")
    if not (folder / "scores.json").is_file():
        raise InputError(f"{folder}: an unfinished training run (no scores.json)")
    try:
        ckpt = checkpoint.read(folder / "best.pt")
    except ValueError as e:
        raise InputError(str(e)) from None
    if not ckpt.recipe.config or not ckpt.recipe.identity:
        raise InputError(f"{folder}: best.pt holds no training config or run identity")
    # top-level keys added since the run was trained take their defaults; a deep copy of a Config
    # is a Config all the way down
    cfg = copy.deepcopy(Config({**load_config("train").to_dict(), **ckpt.recipe.config}))
    return Member(folder, ckpt, cfg, json.loads((folder / "scores.json").read_text()))


def check_members(members: list[Member]) -> None:
    """Refuse, naming the run, a run given twice or trained on other data than the first."""
    first = members[0]
    seen: dict[str, Path] = {}
    for m in members:
        if m.identity in seen:
            raise InputError(f"{m.folder}: the same run as {seen[m.identity]}; give each run once")
        seen[m.identity] = m.folder
        if m.cfg.data != first.cfg.data:
            key = next(k for k in sorted(set(m.cfg.data) | set(first.cfg.data))
                       if m.cfg.data.get(k) != first.cfg.data.get(k))
            raise InputError(f"{m.folder}: trained on other data than {first.folder} (data.{key}: "
                             f"{m.cfg.data.get(key)!r}, not {first.cfg.data.get(key)!r})")


def member_outputs(member: Member, device: str) -> tuple[dict, list[str], dict, dict, Outputs]:
    """Recompute one member's validation outputs from its checkpoint, as training does.

    Returns the validation labels, the validation videos with features, the training prior, the
    scores of these outputs and the outputs per video (``frame`` (m,), ``va`` (m, 2), ``expr``
    (m, k) probabilities, ``au`` (m, 12) probabilities, for the member's tasks).
    """
    cfg = member.cfg
    cfg.device = device
    cache = open_features(cfg)
    now = run_identity(Config(member.ckpt.recipe.config), cache)
    if now != member.identity:
        raise InputError(f"{member.folder}: its features changed since it was trained (run {member.identity[:8]}, "
                         f"features now make {now[:8]}); its outputs would not be the run's")
    train_labels, val_labels, train_videos, val_videos = load_splits(cfg, cache)
    prior = metrics.prior_from_labels({v: train_labels[v] for v in train_videos})
    model, ckpt = checkpoint.load(member.folder / "best.pt", device)
    normaliser = Normaliser.from_state(ckpt.inference.normaliser) if ckpt.inference.normaliser else None
    scores, preds = validate(model, cache, val_labels, val_videos, normaliser, cfg, prior=prior)
    return val_labels, val_videos, prior, scores, preds


def add_outputs(total: dict, preds: Outputs, member: Path, first: Path) -> None:
    """Add one member's outputs to ``total`` ({video: {"frame", and per task (sum, count)}}),
    refusing, naming the member, outputs at other frames or of another width than the first's."""
    for video, pred in preds.items():
        acc = total.setdefault(video, {"frame": np.asarray(pred["frame"])})
        if not np.array_equal(acc["frame"], pred["frame"]):
            raise InputError(f"{member}: the features of {video} hold other frames than {first}'s")
        for task in TASKS:
            if pred.get(task) is None:
                continue
            value = np.asarray(pred[task], np.float64)
            sums, counts = acc.setdefault(task, (np.zeros_like(value), np.zeros_like(value)))
            if value.shape != sums.shape:
                raise InputError(f"{member}: {task} outputs of shape {value.shape} for {video}, "
                                 f"{first}'s are {sums.shape}")
            finite = np.isfinite(value)
            sums += np.where(finite, value, 0.0)
            counts += finite


def mean_outputs(total: dict) -> Outputs:
    """The per-frame means of :func:`add_outputs`' sums; NaN where no member has an output."""
    out = {}
    for video, acc in total.items():
        out[video] = {"frame": acc["frame"]}
        for task in TASKS:
            if task in acc:
                sums, counts = acc[task]
                out[video][task] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return out


def ensemble(members: list[Member], device: str = "cpu") -> tuple[dict, Outputs, dict]:
    """The averaged validation outputs of ``members`` and their scores.

    Returns (scores, outputs per video as in :func:`member_outputs` with the mean of each task,
    each member's folder -> the scores of its recomputed outputs).
    """
    first = members[0]
    total: dict = {}
    rescored, thresholds = {}, []
    videos = labels = prior = None
    for m in members:
        log.info("outputs of %s", m.folder)
        val_labels, val_videos, member_prior, scores, preds = member_outputs(m, device)
        if videos is None:
            labels, videos, prior = val_labels, val_videos, member_prior
        elif val_videos != videos:
            other = sorted(set(val_videos) ^ set(videos))
            raise InputError(f"{m.folder}: {len(val_videos)} validation videos with features, {first.folder} has "
                             f"{len(videos)}; they differ in {', '.join(other[:3])}")
        add_outputs(total, preds, m.folder, first.folder)
        rescored[str(m.folder)] = scores
        if "au" in m.cfg.model.tasks:
            thresholds.append(m.ckpt.inference.au_thresholds)
    preds = mean_outputs(total)
    classes = expressions(first.cfg)
    scores = metrics.score_videos(preds, labels, prior=prior, expressions=classes)
    if thresholds and all(t is not None for t in thresholds):
        mean = np.mean(np.asarray(thresholds, np.float64), 0)
        scores["f1_au_tuned"] = metrics.score_videos(preds, labels, au_thresholds=mean, prior=prior,
                                                     expressions=classes)["f1_au"]
        scores["au_thresholds"] = mean.tolist()
    if first.cfg.data.get("members"):  # each pooled data set's own scores beside the pooled ones
        scores["data"] = metrics.score_by_data(preds, labels, [d.name for d in first.cfg.data.members], prior=prior,
                                       expressions=classes)
    return scores, preds, rescored


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def table(members: list[dict], scores: dict) -> str:
    """Each member's P_MTL and its terms (from its own ``scores.json``) above the ensemble's."""
    rows = [[Path(m["run"]).name, *(metrics.score_cell(m["scores"].get(k)) for _, k in COLUMNS)] for m in members]
    rows.append([f"ensemble of {len(members)}", *(metrics.score_cell(scores.get(k)) for _, k in COLUMNS)])
    for name, own in (scores.get("data") or {}).items():  # each pooled data set's own row
        rows.append([f"ensemble · {name}", *(metrics.score_cell(own.get(k)) for _, k in COLUMNS)])
    return metrics.markdown_table(["run", *(h for h, _ in COLUMNS)], rows)


def report(out: Path, members: list[dict], scores: dict) -> None:
    print(table(members, scores))
    if scores.get("f1_au_tuned") is not None:
        print(f"F1-AU at the members' mean tuned thresholds: {scores['f1_au_tuned']:.4f}")
    print(f"written to {out / 'scores.json'}")


def resolve(runs: list) -> tuple[list[Member], str, Path]:
    """The members of the run folders ``runs``, sorted by identity (the folder and the sums do not
    depend on the order the runs are given in), the ensemble's identity and its folder."""
    members = sorted((load_member(Path(r)) for r in runs), key=lambda m: m.identity)
    check_members(members)
    identity = Config({"members": [m.identity for m in members]}).hash()
    return members, identity, Path(members[0].cfg.runs_dir) / members[0].cfg.data.name / "ensembles" / identity[:8]


def main(cfg: Config) -> int:
    """Average and score the runs of ``cfg.runs``; 0 when done, 2 when the output folder is locked,
    unwritable or holds other results."""
    check_choices(cfg, CHOICES)
    if not cfg.runs:
        raise ConfigError("give the run folders to average: python -m pipeline.ensemble RUN_DIR RUN_DIR ...")
    members, identity, out = resolve(cfg.runs)
    try:
        with claimed(out, identity) as run:
            if run.done:
                print(f"\n{out}: these runs were averaged before; not again")
                report(out, json.loads((out / "members.json").read_text()),
                       json.loads((out / "scores.json").read_text()))
                return 0
            listed, scores = average(members, out, identity, cfg.device)
            run.finish()
    except STOPS as e:
        return stop("ensemble", e)
    print(f"\nValidation scores of {len(members)} runs averaged ({members[0].cfg.data.name})")
    report(out, listed, scores)
    return 0


def average(members: list[Member], out: Path, identity: str, device: str) -> tuple[list[dict], dict]:
    """Average ``members``' outputs and write them to ``out``: the ABAW per-task predictions,
    ``members.json`` and ``scores.json``. Returns the members' list and the scores."""
    scores, preds, rescored = ensemble(members, device)
    for m in members:
        saved, now = _number(m.scores.get("p_mtl")), _number(rescored[str(m.folder)].get("p_mtl"))
        if not (abs(saved - now) <= 1e-4 or (math.isnan(saved) and math.isnan(now))):
            log.warning("%s: its outputs now score P_MTL %.4f, its scores.json says %.4f", m.folder, now, saved)
    listed = [{"run": str(m.folder), "identity": m.identity, "scores": m.scores} for m in members]
    tasks = tuple(t for t in TASKS if any(t in m.cfg.model.tasks for m in members))
    write_task_files(out / "predictions", preds, tasks=tasks)
    write_json(out / "members.json", listed)
    scores.update({"members": [str(m.folder) for m in members], "identity": identity})
    write_json(out / "scores.json", scores)
    return listed, scores


PROGRAM = Program("ensemble", main, arguments="runs")


def cli() -> None:
    """The ``affect-ensemble`` command, the same as ``python -m pipeline.ensemble``."""
    PROGRAM.run()


if __name__ == "__main__":
    cli()
