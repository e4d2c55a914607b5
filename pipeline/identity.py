"""What names a training run: the identity hashed from every setting that changes its result (the
device type and autocast dtype it computes in included) and from what its features are made of,
the folder that identity names, and the link to the newest finished run of a name.

``runs/<data>/train/<name>-<first 8 of the identity>/`` holds one run; ``runs/<data>/latest/<name>``
links to the newest finished one (outside ``train/``, so that TensorBoard over ``train/`` shows
each run once).
"""

from __future__ import annotations

from pathlib import Path

from pipeline import initialise, precision
from pipeline.config import Config
from pipeline.feature_cache import FeatureCache
from pipeline.splits import open_features

# Keys that do not change what a run computes: its name and folder, the device it runs on, how its
# data is fed, whether it may resume. Every other key, present or future, defines the run.
NOT_DEFINING = ("name", "runs_dir", "out_dir", "device", "num_workers", "cache_in_memory", "resume")


# Keys added after runs were made, with the value that computes what those runs computed: at that
# value a key is left out of the identity, so a run made before the key existed keeps its folder
# (and resumes there); any other value names another run.
ADDED_KEYS = {
    "frames": "all",
    "last_batch": "drop",
    "selection_va": "joint",
    "selection_ties": "first",
    "frozen_mode": "eval",
    "va_smoothing_edges": "pad",
    "standardise": True,
    "loss.expr_reduction": "weighted_mean",
    "loss.va_reduction": "labelled",
    "warmup_offset": 1,
    "decay_offset": 0,
    "encoder.attend_invalid": False,
    "data_proportions": {},
    "selection_data": "",
}


def defining_settings(cfg: Config) -> dict:
    """The settings of ``cfg`` that name its run: all but ``NOT_DEFINING`` and the ``ADDED_KEYS``
    at their neutral value (dotted names reach into sections such as ``loss``)."""
    defining = {k: v for k, v in cfg.to_dict().items() if k not in NOT_DEFINING}
    for key, neutral in ADDED_KEYS.items():
        *path, last = key.split(".")
        section = defining
        for part in path:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict) and last in section and section[last] == neutral:
            del section[last]
    return defining


def run_identity(cfg: Config, cache: FeatureCache) -> str:
    """The hash that names a run: every defining key of ``cfg`` and what the features are made of
    (extractor settings and weights, the face files behind each video, the videos cached). Parts
    taken from other runs count by their sources' identities, not paths; a run that takes none is
    named as before those keys existed."""
    defining = {k: v for k, v in defining_settings(cfg).items() if k not in initialise.KEYS}
    taken = initialise.identity(cfg)
    if taken is not None:
        defining["init_from"] = taken
    # the kernels and the autocast dtype change the numbers: a GPU run is another run than a CPU
    # run with the same keys (the CPU in fp32 adds nothing, as runs made before this existed)
    defining.update(precision.defining(cfg.device, precision.training_dtype(cfg.device, cfg.amp)))
    return Config({"config": defining, "features": cache.identity()}).hash()


def run_name(cfg: Config) -> str:
    return cfg.get("name") or cfg.encoder.name


def run_dir(cfg: Config, identity: str) -> Path:
    """``out_dir``, else ``<runs_dir>/<data>/train/<name>-<first 8 of the identity>``."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return Path(cfg.runs_dir) / cfg.data.name / "train" / f"{run_name(cfg)}-{identity[:8]}"


def run_link(cfg: Config) -> Path | None:
    """Where the newest finished run of ``cfg``'s name is linked: ``<runs_dir>/<data>/latest/<name>``;
    None for a run given its own ``out_dir``."""
    return None if cfg.out_dir else Path(cfg.runs_dir) / cfg.data.name / "latest" / run_name(cfg)


def run_folder(cfg: Config) -> Path:
    """The folder the run of ``cfg`` writes to (where its ``scores.json`` is once it finished)."""
    return run_dir(cfg, run_identity(cfg, open_features(cfg)))
