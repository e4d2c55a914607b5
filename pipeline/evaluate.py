"""Stage: score per-frame predictions against annotations with the ABAW metrics.

    python -m pipeline.evaluate [configs/evaluate.yaml] predictions=<folder> [data=<name> | annotations=<root>]
    python -m pipeline.evaluate predictions=<run>/predictions data=[a,b]

Predictions may be in any layout of :mod:`pipeline.writers`. The labels are restricted to the data
config's expression set and scored over its classes, as training scores them. Pooled data
(``data=[a,b]``, a run over several data sets) reads each data set's own annotations, its videos
named ``<name>/<video>`` as that run wrote its predictions, and scores them pooled and per data set
(under ``data``). Prints the table of :func:`pipeline.metrics.format_table` and writes the scores as JSON.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.abaw import AUS
from pipeline.atomic import write_json
from pipeline.cli import run_stage
from pipeline.config import Config, ConfigError, InputError, check_choices
from pipeline.labels import FORMATS, SPLIT_DIRS, AnnotationError, Labels, load_annotations, restrict_expressions
from pipeline.metrics import print_scores, score_by_data, score_videos
from pipeline.splits import data_sets, expressions
from pipeline.writers import read_predictions

log = logging.getLogger("pipeline")

CHOICES = {"split": tuple(SPLIT_DIRS), "format": ("", *FORMATS)}


def output_path(cfg: Config) -> Path:
    """``cfg.output``, else ``scores_<split>.json`` in the predictions folder."""
    if cfg.output:
        return Path(cfg.output)
    src = Path(cfg.predictions)
    return (src if src.is_dir() else src.parent) / f"scores_{cfg.split}.json"


def load_labels(cfg: Config) -> dict[str, Labels]:
    """The ``cfg.split`` labels of ``cfg.annotations`` (default: the data set's), or of each pooled
    data set's own annotations with its videos named ``<name>/<video>``; restricted to the data
    config's expression set as training restricts them."""
    if not cfg.data.get("members"):
        sources = [("", cfg.annotations or cfg.data.annotations, cfg.format or cfg.data.format)]
    elif cfg.annotations or cfg.format:
        raise ConfigError(
            f"data={cfg.data.name} pools several data sets, each with its own annotations and format; "
            "leave annotations= and format= unset"
        )
    else:
        sources = [(f"{d.name}/", d.annotations, d.format) for d in data_sets(cfg)]
    names = expressions(cfg)
    return {
        prefix + video: restrict_expressions(lab, names)
        for prefix, root, fmt in sources
        for video, lab in load_annotations(root, cfg.split, fmt).items()
    }


def main(cfg: Config) -> int:
    """Score ``cfg.predictions`` against :func:`load_labels`; an unusable input is an InputError."""
    check_choices(cfg, CHOICES)
    try:
        if not cfg.predictions:
            raise ConfigError("set predictions=<folder or file> to score")
        thresholds = None if cfg.au_thresholds is None else np.asarray(cfg.au_thresholds, np.float64)
        if thresholds is not None and thresholds.shape != (len(AUS),):
            raise ConfigError(f"au_thresholds needs {len(AUS)} numbers, got {cfg.au_thresholds!r}")
        preds = read_predictions(cfg.predictions)
        labels = load_labels(cfg)
        how = {"au_thresholds": thresholds, "allow_missing": cfg.allow_missing, "expressions": expressions(cfg)}
        scores = score_videos(preds, labels, **how)
        if cfg.data.get("members"):  # each data set's own scores beside the pooled ones, as training reports them
            scores["data"] = score_by_data(preds, labels, [d.name for d in data_sets(cfg)], **how)
    except (AnnotationError, FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    left_out = {k: v for k, v in scores.items() if k.startswith("missing_") and v}
    if left_out:
        log.warning("labelled frames without a prediction were left out: %s", left_out)
    extra = sorted(set(preds) - set(labels))
    if extra:
        log.info("%d predicted videos have no %s labels: %s", len(extra), cfg.split, ", ".join(extra[:3]))
    print_scores(scores)
    out = output_path(cfg)
    write_json(out, {"scores": scores, "videos": len(labels), "config": cfg.to_dict()})
    log.info("scores of %d videos written to %s", len(labels), out)
    return 0


def cli() -> None:
    """The ``affect-evaluate`` command, the same as ``python -m pipeline.evaluate``."""
    run_stage("evaluate", main)


if __name__ == "__main__":
    cli()
