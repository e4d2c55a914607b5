"""What a training run reads: its data sets, their training and validation splits, the cached
features of each video, and the configs of the faces and features runs behind those features."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import Config, InputError, read_yaml
from pipeline.data import feature_paths
from pipeline.feature_cache import FeatureCache, PooledCache
from pipeline.labels import load_annotations, restrict_expressions

log = logging.getLogger("pipeline")


def expressions(cfg: Config) -> str:
    """The name of the expression set the run's data labels (ABAW's 8 unless its config says otherwise)."""
    return cfg.data.get("expressions", "abaw8")


def data_sets(cfg: Config) -> list[Config]:
    """The data sets the run reads: ``data``, or each of its ``members`` when it pools several."""
    return list(cfg.data.members) if cfg.data.get("members") else [cfg.data]


def open_features(cfg: Config) -> FeatureCache | PooledCache:
    """The feature caches the run reads (one per data set, pooled); a missing, unreadable or
    foreign cache is an input error."""
    try:
        caches = {d.name: FeatureCache(feature_paths(cfg.runs_dir, d.name, cfg.extractors)) for d in data_sets(cfg)}
        return caches[cfg.data.name] if not cfg.data.get("members") else PooledCache(caches)
    except (OSError, ValueError) as e:
        raise InputError(str(e)) from None


def load_splits(cfg: Config, cache: FeatureCache) -> tuple[dict, dict, list[str], list[str]]:
    """The training and validation labels (restricted to the data config's expression set) and the
    videos of each that have features. Splits that share a video are refused."""
    pooled = bool(cfg.data.get("members"))
    train_labels, val_labels = {}, {}
    for data in data_sets(cfg):
        try:
            train = load_annotations(data.annotations, data.train_split, data.format)
            val = load_annotations(data.annotations, data.val_split, data.format)
        except (OSError, ValueError) as e:  # missing or malformed annotations (AnnotationError names the line)
            raise InputError(str(e)) from None
        shared = sorted(set(train) & set(val))
        if shared:
            raise InputError(f"{data.annotations}: the {data.train_split} and {data.val_split} splits share "
                             f"{len(shared)} video(s), e.g. {', '.join(shared[:3])}; validation would score "
                             f"frames the model trained on")
        prefix = f"{data.name}/" if pooled else ""
        train_labels.update({prefix + v: lab for v, lab in train.items()})
        val_labels.update({prefix + v: lab for v, lab in val.items()})
    train_labels = {v: restrict_expressions(lab, expressions(cfg)) for v, lab in train_labels.items()}
    val_labels = {v: restrict_expressions(lab, expressions(cfg)) for v, lab in val_labels.items()}
    train_videos = sorted(v for v in train_labels if v in cache.videos)
    val_videos = sorted(v for v in val_labels if v in cache.videos)
    for split, labelled, kept in (("train", train_labels, train_videos), ("val", val_labels, val_videos)):
        if len(kept) < len(labelled):
            log.warning("%d %s videos have labels but no features, e.g. %s%s", len(labelled) - len(kept), split,
                        sorted(set(labelled) - set(kept))[:3],
                        "; their labelled frames are scored with the training prior" if split == "val" else "")
        if not kept:
            where = ", ".join(str(d.annotations) for d in data_sets(cfg))
            raise InputError(f"no {split} video has both labels ({where}) and features "
                             f"({', '.join(map(str, cache.paths))})")
    return train_labels, val_labels, train_videos, val_videos


def stage_configs(cfg: Config) -> dict:
    """The resolved configs of the faces and features runs behind this run's features, so that
    prediction on a new video repeats them (crop sizes, template, extractor weights)."""
    runs = Path(cfg.runs_dir) / data_sets(cfg)[0].name
    paths = {"faces": runs / "faces" / "config.yaml",
             **{f"features:{name}": runs / "features" / f"{name}.yaml" for name in cfg.extractors}}
    return {key: read_yaml(path) for key, path in paths.items() if path.is_file()}
