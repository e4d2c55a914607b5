"""Stage: score per-frame predictions against annotations with the ABAW metrics.

    python -m pipeline.evaluate [configs/evaluate.yaml] predictions=<folder> [data=<name> | annotations=<root>]

Predictions may be in any layout of :mod:`pipeline.writers`. Prints the table of
:func:`pipeline.metrics.format_table` and writes the scores as JSON.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.abaw import AUS
from pipeline.atomic import write_json
from pipeline.cli import run_stage
from pipeline.config import Config, ConfigError, InputError, check_choices
from pipeline.labels import FORMATS, SPLIT_DIRS, AnnotationError, load_annotations
from pipeline.metrics import format_table, score_videos
from pipeline.writers import read_predictions

log = logging.getLogger("pipeline")

CHOICES = {"split": tuple(SPLIT_DIRS), "format": ("", *FORMATS)}


def output_path(cfg: Config) -> Path:
    """``cfg.output``, else ``scores_<split>.json`` in the predictions folder."""
    if cfg.output:
        return Path(cfg.output)
    src = Path(cfg.predictions)
    return (src if src.is_dir() else src.parent) / f"scores_{cfg.split}.json"


def main(cfg: Config) -> int:
    """Score ``cfg.predictions`` against ``cfg.annotations``; an unusable input is an InputError."""
    check_choices(cfg, CHOICES)
    try:
        if not cfg.predictions:
            raise ConfigError("set predictions=<folder or file> to score")
        thresholds = None if cfg.au_thresholds is None else np.asarray(cfg.au_thresholds, np.float64)
        if thresholds is not None and thresholds.shape != (len(AUS),):
            raise ConfigError(f"au_thresholds needs {len(AUS)} numbers, got {cfg.au_thresholds!r}")
        preds = read_predictions(cfg.predictions)
        labels = load_annotations(cfg.annotations or cfg.data.annotations, cfg.split, cfg.format or cfg.data.format)
        scores = score_videos(preds, labels, thresholds, allow_missing=cfg.allow_missing)
    except (AnnotationError, FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    left_out = {k: v for k, v in scores.items() if k.startswith("missing_") and v}
    if left_out:
        log.warning("labelled frames without a prediction were left out: %s", left_out)
    extra = sorted(set(preds) - set(labels))
    if extra:
        log.info("%d predicted videos have no %s labels: %s", len(extra), cfg.split, ", ".join(extra[:3]))
    print(format_table(scores))
    out = output_path(cfg)
    write_json(out, {"scores": scores, "videos": len(labels), "config": cfg.to_dict()})
    log.info("scores of %d videos written to %s", len(labels), out)
    return 0


def cli() -> None:
    """The ``affect-evaluate`` command, the same as ``python -m pipeline.evaluate``."""
    run_stage("evaluate", main)


if __name__ == "__main__":
    cli()
