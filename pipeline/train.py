"""Stage 3: train a temporal encoder with multi-task heads on cached features, pick the epoch with
the best validation P_MTL, and score it.

    python -m pipeline.train [configs/train.yaml] [key=value ...]

A run is named by what defines it: ``runs/<data>/train/<name>-<hash>/``, where ``name`` is the
``name`` key (an experiment's) or the encoder's, and the hash covers every setting that changes the
result and the features read (see :func:`run_identity`); ``runs/<data>/train/<name>`` links to the
newest finished one. The same settings resume an interrupted run or skip a finished one; other
settings get their own folder, so a finished run is never written again. With ``out_dir`` the run
goes there, and a folder that holds a run with other settings is refused.

Each run folder holds ``config.yaml``, ``last.pt`` and ``best.pt`` (each rebuilds the model
alone), ``metrics.jsonl`` (one line per epoch), ``curves.png``, TensorBoard event files under
``tensorboard/`` (per-step loss and learning rate, per-epoch validation scores), ``scores.json``
and the validation predictions in ABAW's per-task layout under ``predictions/``.

Several processes or machines (DDP; gloo on CPU, NCCL on GPU)::

    torchrun --nproc_per_node=2 -m pipeline.train [configs/train.yaml] [key=value ...]

``batch_size`` is the global batch: every optimiser step takes the same windows as one process
would, split over the ranks. The loss is computed on the whole global batch (outputs and labels
are all-gathered), because 1 - CCC over a batch is not a mean of per-window terms; so W processes
follow the single-process run up to float noise and dropout draws. Rank 0 evaluates and writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from models import STRUCTURES, TASKS, MultiTaskLoss, MultiTaskModel
from models.cross_task import au_cooccurrence
from models.heads import ACTIVATIONS, VA_OUTPUTS
from models.losses import AU_LOSSES, VA_LOSSES, WEIGHTINGS
from models.recurrent import reset_carried_state
from models.transformer import NORMS, POSITIONS
from pipeline import metrics
from pipeline.config import DEVICE, Config, InputError, check_choices, read_yaml, run_stage
from pipeline.data import Normaliser, SequenceDataset, VideoChunkBatches, feature_paths
from pipeline.distributed import GlobalBatches, Shares, World, gather_batch, init_world
from pipeline.feature_cache import FeatureCache, PooledCache
from pipeline.inference import (
    load_checkpoint,
    predict_features,
    read_checkpoint,
    rewrite_checkpoint,
    save_checkpoint,
    smooth,
)
from pipeline.labels import EXPRESSION_SETS, FORMATS, expression_set, load_annotations, restrict_expressions
from pipeline.runs import (
    ForeignRun,
    RunLocked,
    claim_run,
    finish_run,
    link_newest,
    stage_lock,
    write_json,
    write_text,
)
from pipeline.writers import write_task_files

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("pipeline")

SCHEDULES = ("cosine", "linear", "constant")  # learning-rate decay after the warm-up and hold
SCHEDULE_UNITS = ("step", "epoch")  # how often the rate changes
OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
CLASS_WEIGHTS = ("auto", "none")  # auto: from the training split's label frequencies
AU_WEIGHTS = ("none", "inverse_positive")  # per-AU weights of the asymmetric AU loss
AU_GRAPHS = (None, "learned", "cooccurrence")  # cross_attention's AU relation graph
WINDOWS = ("overlapping", "consecutive")  # how videos are cut into windows
INITS = ("default", "normal")  # PyTorch's initialisation, or every linear layer from N(0, 0.02)
BATCHES = ("windows", "videos")  # any windows together, or one chunk of each of batch_size videos per step
SELECTIONS = ("p_mtl", "per_task")  # one best epoch, or each task's own
CLIP_GROUPS = ("whole", "task")  # one gradient norm, or one per task's branch and head
BRANCHES = ("valence", "arousal", "expr", "au")  # task branches that feedback may name

# Keys whose value is one of a set, refused before any work starts when it is not.
CHOICES = {
    "model.tasks": tuple(TASKS),
    "model.structure": tuple(STRUCTURES),
    "model.au_graph": AU_GRAPHS,
    "loss.va": VA_LOSSES,
    "loss.weighting": WEIGHTINGS,
    "loss.expr_class_weights": CLASS_WEIGHTS,
    "loss.au_pos_weight": CLASS_WEIGHTS,
    "loss.au_weight": AU_WEIGHTS,
    "loss.au": AU_LOSSES,
    "model.va_output": VA_OUTPUTS,
    "model.head_activation": tuple(ACTIVATIONS),
    "model.feedback_sources": BRANCHES,
    "model.feedback_targets": BRANCHES,
    "model.feedback_from": ("branch", "head"),
    "encoder.norm": NORMS,
    "encoder.activation": tuple(ACTIVATIONS),
    "encoder.positions": POSITIONS,
    "data.format": FORMATS,
    "schedule": SCHEDULES,
    "schedule_unit": SCHEDULE_UNITS,
    "optimizer": tuple(OPTIMIZERS),
    "train_windows": WINDOWS,
    "eval_windows": WINDOWS,
    "selection": SELECTIONS,
    "clip_groups": CLIP_GROUPS,
    "batches": BATCHES,
    "init": INITS,
    "data.expressions": tuple(EXPRESSION_SETS),
    "device": DEVICE,
}

# Keys that do not change what a run computes: its name and folder, the device it runs on, how its
# data is fed, whether it may resume. Every other key, present or future, defines the run.
_NOT_DEFINING = ("name", "runs_dir", "out_dir", "device", "num_workers", "cache_in_memory", "resume")


def run_identity(cfg: Config, cache: FeatureCache) -> str:
    """The hash that names a run: every defining key of ``cfg`` and what the features are made of
    (extractor settings and weights, the face files behind each video, the videos cached)."""
    defining = {k: v for k, v in cfg.items() if k not in _NOT_DEFINING}
    return Config({"config": defining, "features": cache.identity()}).hash()


def run_name(cfg: Config) -> str:
    return cfg.get("name") or cfg.encoder.name


def run_dir(cfg: Config, identity: str) -> Path:
    """``out_dir``, else ``<runs_dir>/<data>/train/<name>-<first 8 of the identity>``."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return Path(cfg.runs_dir) / cfg.data.name / "train" / f"{run_name(cfg)}-{identity[:8]}"


def run_folder(cfg: Config) -> Path:
    """The folder the run of ``cfg`` writes to (where its ``scores.json`` is once it finished)."""
    return run_dir(cfg, run_identity(cfg, open_features(cfg)))


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


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds the legacy global generator that user code may use
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def lr_factor(step: int, total: int, warmup: int, schedule: str, hold: int = 0) -> float:
    """Linear warm-up over ``warmup`` steps, ``hold`` steps at the full rate, then cosine or linear
    decay to zero at ``total`` (or no decay: ``constant``). A step is an optimiser step or an epoch."""
    if step < warmup:
        return (step + 1) / warmup
    if step < warmup + hold or schedule == "constant":
        return 1.0
    progress = (step - warmup - hold) / max(1, total - warmup - hold)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)


def lr_lambda(cfg: Config, steps_per_epoch: int):
    """The schedule of one stage for ``LambdaLR``, stepped after every optimiser step or (with
    ``schedule_unit: epoch``) after every epoch."""
    total = cfg.epochs * (steps_per_epoch if cfg.schedule_unit == "step" else 1)
    warmup, hold = int(round(cfg.warmup * total)), int(round(cfg.hold * total))
    return lambda step: lr_factor(step, total, warmup, cfg.schedule, hold)


def normal_init(model: torch.nn.Module, std: float = 0.02) -> None:
    """Every linear layer's weights from N(0, std) and its bias 0, as the ABAW4 winner initialised
    its networks (recurrent cells, norms and attention projections other than linear layers keep
    their own initialisation)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


def clip_groups(model: torch.nn.Module, how: str) -> list[list[torch.nn.Parameter]]:
    """Parameter groups whose gradient norms are clipped apart: the whole model, or (``task``) each
    task's branch and head together and each shared module alone, as the ABAW4 winner clipped
    each of its networks."""
    if how == "whole":
        return [[p for p in model.parameters() if p.requires_grad]]
    groups: dict[str, list] = {}
    net = model.net
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        child = getattr(net, parts[0])
        key = parts[1] if isinstance(child, torch.nn.ModuleDict) else parts[0]
        groups.setdefault(key, []).append(p)
    return list(groups.values())


def task_modules(model: MultiTaskModel, tasks: list[str]) -> list[torch.nn.Module]:
    """The modules that belong to ``tasks`` alone: what a structure names as each task's modules,
    else the entries of its per-task module dicts (valence and arousal count as ``va``)."""
    net = model.net
    if hasattr(net, "task_modules"):
        return [m for t in tasks for m in net.task_modules().get(t, [])]
    keys = set(tasks) | ({"valence", "arousal"} if "va" in tasks else set())
    return [m[k] for m in net.children() if isinstance(m, torch.nn.ModuleDict) for k in m if k in keys]


def class_balance(labels: dict, videos: list[str], n_classes: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-frequency expression weights (mean 1 over present classes, scikit-learn's
    "balanced") and AU positive weights (negatives / positives, capped at 10), from the training
    split's valid labels."""
    expr = np.concatenate([labels[v].expr for v in videos])
    au = np.concatenate([labels[v].au for v in videos])
    counts = np.bincount(expr[expr >= 0], minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(1, (counts > 0).sum()), 0.0)
    pos = ((au == 1).sum(0)).astype(np.float64)
    neg = ((au == 0).sum(0)).astype(np.float64)
    pos_weight = np.clip(neg / np.maximum(pos, 1), 1.0, 10.0)
    return torch.tensor(weights, dtype=torch.float32), torch.tensor(pos_weight, dtype=torch.float32)


def au_inverse_positive(labels: dict, videos: list[str]) -> torch.Tensor:
    """Per-AU weights 1 / positives, scaled to sum to 12 (the cross-attention system's AU weights)."""
    au = np.concatenate([labels[v].au for v in videos])
    inverse = 1.0 / np.maximum((au == 1).sum(0), 1).astype(np.float64)
    return torch.tensor(inverse / inverse.sum() * au.shape[1], dtype=torch.float32)


def evaluate(
    model: MultiTaskModel,
    cache: FeatureCache,
    labels: dict,
    videos: list[str],
    normaliser: Normaliser | None,
    cfg: Config,
    au_thresholds: np.ndarray | None = None,
    prior: dict | None = None,
) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Scores over every labelled validation frame pooled, and the per-frame predictions of each
    video with features; labelled frames without a prediction (no features, no face in the whole
    video) take ``prior`` and are counted as ``filled_<task>``."""
    preds = {}
    for video in videos:
        feats, present, frames = cache.read(video)
        if cfg.noise_features:
            feats = np.random.default_rng((cfg.seed, len(video))).standard_normal(feats.shape).astype(np.float32)
            norm = None
        else:
            norm = normaliser
        out = predict_features(model, feats, present, norm, cfg.window, cfg.eval_stride, cfg.device,
                               consecutive=cfg.eval_windows == "consecutive")
        preds[video] = {"frame": frames, **out}
    scores = metrics.score_videos(preds, labels, au_thresholds=au_thresholds, prior=prior,
                                  expressions=expressions(cfg))
    if isinstance(cache, PooledCache):  # each data set's own scores beside the pooled ones
        scores["data"] = {}
        for name in cache.caches:
            own = {v: lab for v, lab in labels.items() if v.startswith(f"{name}/")}
            scores["data"][name] = metrics.score_videos({v: p for v, p in preds.items() if v in own}, own,
                                                        au_thresholds=au_thresholds, prior=prior,
                                                        expressions=expressions(cfg))
    return scores, preds


def stage_configs(cfg: Config) -> dict:
    """The resolved configs of the faces and features runs behind this run's features, so that
    prediction on a new video repeats them (crop sizes, template, extractor weights)."""
    runs = Path(cfg.runs_dir) / data_sets(cfg)[0].name
    paths = {"faces": runs / "faces" / "config.yaml",
             **{f"features:{name}": runs / "features" / f"{name}.yaml" for name in cfg.extractors}}
    return {key: read_yaml(path) for key, path in paths.items() if path.is_file()}


def choose_va_smoothing(preds: dict, labels: dict, windows: list[int], per_dimension: bool = False,
                        prior: dict | None = None) -> tuple[int | list[int], float]:
    """The moving-average window (frames) for valence and arousal that maximises validation P_VA;
    with ``per_dimension`` each dimension's own window, by its CCC, as ``[valence, arousal]``."""
    def scores(window):
        smoothed = {v: {**p, "va": smooth(p["va"], window)} for v, p in preds.items()}
        return metrics.score_videos(smoothed, labels, prior=prior)

    tried = {w: scores(w) for w in sorted(set(windows) | {1})}
    if not per_dimension:
        best = max(tried, key=lambda w: (round(tried[w]["p_va"], 6), -w))  # the smallest of equals
        return best, tried[best]["p_va"]
    chosen = [max(tried, key=lambda w: (round(tried[w][key], 6), -w)) for key in ("ccc_v", "ccc_a")]
    return chosen, scores(chosen)["p_va"]


TERMS = {"va": "p_va", "expr": "f1_expr", "au": "f1_au"}  # each task's term of P_MTL


def selection_score(scores: dict, tasks: list[str]) -> float:
    """What early stopping maximises: P_MTL's terms for the tasks trained (P_MTL for all three)."""
    return float(sum(scores[TERMS[t]] for t in tasks))


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend()
    for key in ("p_mtl", "ccc_v", "ccc_a", "f1_expr", "f1_au"):
        values = [h["val"].get(key) for h in history]
        if any(v is not None and not math.isnan(v) for v in values):
            ax2.plot(epochs, values, label=key)
    ax2.set_xlabel("epoch"), ax2.set_ylabel("validation"), ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(cfg: Config) -> int:
    """Train, resume or skip the run of ``cfg``; 0 when done, 2 when its folder is locked,
    unwritable or holds a run with other settings."""
    check_choices(cfg, CHOICES)
    check_stages(cfg)
    world, device = init_world(cfg.device)
    if not world.main:  # one rank speaks for all
        logging.getLogger().setLevel(logging.WARNING)
    cache = open_features(cfg)
    identity = run_identity(cfg, cache)
    out = run_dir(cfg, identity)
    with contextlib.ExitStack() as stack:
        # the processes of a torchrun job are one run: rank 0 holds the folder's one lock and tells
        # the others whether to stop, skip or train
        verdict: list = [("train", None)]
        if world.main:
            try:
                stack.enter_context(stage_lock(out, "0/1"))
                if claim_run(out, identity):
                    verdict = [("skip", json.loads((out / "scores.json").read_text()))]
            except (RunLocked, ForeignRun, OSError) as e:
                log.error("%s", e)
                verdict = [("stop", None)]
        if world.size > 1:
            dist.broadcast_object_list(verdict, src=0)
        what, scores = verdict[0]
        if what == "stop":
            return 2
        if what == "skip":
            if world.main:
                if not cfg.out_dir:
                    link_newest(out, run_name(cfg))
                print(f"\n{out}: finished earlier with these settings; not trained again")
                print_scores(scores)
            return 0
        return run(cfg, world, device, out, cache, identity)


def build_model(cfg: Config, d_in: int, train_labels: dict, train_videos: list[str]) -> MultiTaskModel:
    """The model of ``cfg`` on ``d_in``-wide features (a co-occurrence AU graph and the
    expression classes come from the training labels and the data config)."""
    model_args = dict(cfg.model)
    if model_args["au_graph"] == "cooccurrence":
        model_args["au_graph"] = au_cooccurrence(np.concatenate([train_labels[v].au for v in train_videos])).tolist()
    model = MultiTaskModel(d_in=d_in, encoder=dict(cfg.encoder), expr_classes=len(expression_set(expressions(cfg))),
                           **model_args)
    if cfg.init == "normal":
        normal_init(model)
    return model


def build_loss(cfg: Config, model: MultiTaskModel, train_labels: dict, train_videos: list[str]) -> MultiTaskLoss:
    """The loss of ``cfg``, its class weights from the training split's labels."""
    n_classes = len(expression_set(expressions(cfg)))
    expr_w, au_pw = class_balance(train_labels, train_videos, n_classes)
    return MultiTaskLoss(
        va=cfg.loss.va,
        weighting=cfg.loss.weighting,
        task_weights={k: v for k, v in cfg.loss.task_weights.items() if v is not None},
        label_smoothing=cfg.loss.label_smoothing,
        expr_class_weights=expr_w if cfg.loss.expr_class_weights == "auto" else None,
        au_pos_weight=au_pw if cfg.loss.au_pos_weight == "auto" else None,
        au=cfg.loss.au,
        au_weight=au_inverse_positive(train_labels, train_videos) if cfg.loss.au_weight == "inverse_positive" else None,
        au_output=model.au_output,
        expr_classes=n_classes,
    )


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


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


def check_stages(cfg: Config) -> list[list[str]]:
    """``stages`` as task lists (one stage of every task when empty), refused unless each names
    tasks the model has, and every task is trained in some stage."""
    tasks = list(cfg.model.tasks)
    stages = [list(s) if isinstance(s, list | tuple) else [s] for s in cfg.stages] or [tasks]
    unknown = sorted({t for s in stages for t in s} - set(tasks))
    untrained = [t for t in tasks if not any(t in s for s in stages)]
    if unknown or untrained or not all(stages):
        raise InputError(f"config key 'stages' = {cfg.stages!r}: each stage a non-empty list of the model's "
                         f"tasks ({', '.join(tasks)}), every task in some stage")
    return stages


@dataclass
class Training:
    """What a run trains, as its config builds it: the splits, the training windows and their loader,
    the model and the loss (both on the device)."""

    stages: list[list[str]]
    train_labels: dict
    val_labels: dict
    train_videos: list[str]
    val_videos: list[str]
    prior: dict
    normaliser: Normaliser | None
    train_set: SequenceDataset
    shuffle: torch.Generator  # draws the batches; seeded again every epoch
    loader: DataLoader
    model: MultiTaskModel
    loss_fn: MultiTaskLoss


def build_training(cfg: Config, world: World, device: torch.device, cache: FeatureCache) -> Training:
    """Seed, then build what ``cfg`` trains; settings that cannot go together are an input error."""
    seed_everything(cfg.seed, cfg.deterministic)
    stages = check_stages(cfg)
    if len(stages) > 1 and world.size > 1:
        raise InputError("staged training (stages) runs in one process; start it without torchrun")
    train_labels, val_labels, train_videos, val_videos = load_splits(cfg, cache)
    prior = metrics.prior_from_labels({v: train_labels[v] for v in train_videos})
    log.info("%d train and %d validation videos, %d-d features from %s", len(train_videos), len(val_videos),
             cache.dim, ", ".join(cfg.extractors))
    if cfg.noise_features:
        log.warning("noise_features=true: every feature is replaced by Gaussian noise (the control run)")

    normaliser = None if cfg.noise_features else Normaliser.fit(cache, train_videos)
    train_set = SequenceDataset(cache, train_labels, train_videos, cfg.window, cfg.stride, normaliser,
                                train=True, noise=cfg.noise_features, cache_in_memory=cfg.cache_in_memory,
                                seed=cfg.seed, consecutive=cfg.train_windows == "consecutive")
    shuffle = torch.Generator()
    carry = bool(cfg.encoder.get("carry_state"))
    if carry and (cfg.batches != "videos" or cfg.eval_windows != "consecutive"):
        raise InputError("encoder.carry_state needs batches: videos and eval_windows: consecutive")
    if cfg.batches == "videos":  # each batch row one video, chunk after chunk (the state carried, if it is)
        if cfg.train_windows != "consecutive" or world.size > 1:
            raise InputError("batches: videos needs train_windows: consecutive, in one process")
        loader = DataLoader(train_set, batch_sampler=VideoChunkBatches(train_set, cfg.batch_size, shuffle),
                            num_workers=cfg.num_workers)
    else:
        batches = GlobalBatches(train_set, cfg.batch_size, len(train_set) > cfg.batch_size, shuffle, world)
        loader = DataLoader(Shares(train_set), batch_sampler=batches, num_workers=cfg.num_workers,
                            generator=shuffle)
    if cfg.batch_size % world.size:
        log.warning("batch_size=%d does not split evenly over %d processes: shares are padded",
                    cfg.batch_size, world.size)

    model = build_model(cfg, cache.dim, train_labels, train_videos).to(device)
    loss_fn = build_loss(cfg, model, train_labels, train_videos).to(device)
    return Training(stages, train_labels, val_labels, train_videos, val_videos, prior, normaliser, train_set,
                    shuffle, loader, model, loss_fn)


def enter_stage(
    cfg: Config, model: MultiTaskModel, loss_fn: MultiTaskLoss, stages: list[list[str]], k: int, steps_per_epoch: int
) -> tuple[list[torch.nn.Module], list[list[torch.nn.Parameter]], torch.optim.Optimizer,
           torch.optim.lr_scheduler.LambdaLR]:
    """Freeze what earlier stages trained (and stage ``k`` does not): the modules returned, to be
    kept in eval mode so their batch-norm statistics stay too. Its clip groups, a fresh optimiser
    and schedule."""
    earlier = {t for s in stages[:k] for t in s} - set(stages[k])
    frozen_modules = task_modules(model, sorted(earlier))
    frozen = {id(p) for m in frozen_modules for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad]
                                + list(loss_fn.parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    groups = clip_groups(model, cfg.clip_groups)
    groups[0] = groups[0] + list(loss_fn.parameters())
    return frozen_modules, groups, optimizer, scheduler


def train_epoch(
    cfg: Config,
    net: torch.nn.Module,
    loader: DataLoader,
    loss_fn: MultiTaskLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    groups: list[list[torch.nn.Parameter]],
    tasks: list[str],
    device: torch.device,
    world: World,
    first_step: int = 0,
    board: SummaryWriter | None = None,
    desc: str = "",
) -> list[float]:
    """One pass over ``loader``: an optimiser step per batch on the losses of ``tasks``, the schedule
    stepped after each with ``schedule_unit: step``, per-step scalars to ``board`` numbered from
    ``first_step``. The batch losses."""
    carry = bool(cfg.encoder.get("carry_state"))
    use_amp = cfg.amp and device.type == "cuda"
    # frames per step, for the progress bar's rate; where stderr is a log file, a line every 30 s
    frames_per_step = cfg.batch_size * cfg.window
    interactive = sys.stderr.isatty()
    losses = []
    bar = tqdm(total=len(loader) * frames_per_step, desc=desc, unit="frame", unit_scale=True, leave=False,
               disable=not world.main, mininterval=0.5 if interactive else 30)
    for step, batch in enumerate(loader, start=first_step):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if carry and int(batch["start"].max()) == 0:  # a new group of videos starts from zeros
            reset_carried_state(net)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            outputs = net(batch["x"], batch["mask"])
        outputs, targets = gather_batch({k: v.float() for k, v in outputs.items() if k in tasks}, batch, world)
        loss, parts = loss_fn(outputs, targets, targets["mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip > 0:
            for group in groups:
                torch.nn.utils.clip_grad_norm_(group, cfg.clip)
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        if cfg.schedule_unit == "step":
            scheduler.step()
        losses.append(loss.item())
        bar.update(frames_per_step)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}", refresh=False)
        if board is not None:
            board.add_scalar("train/loss", losses[-1], step)
            board.add_scalar("train/lr", lr, step)
            for task, value in parts.items():
                board.add_scalar(f"train/loss_{task}", float(value), step)
    bar.close()
    return losses


def run(cfg: Config, world: World, device: torch.device, out: Path, cache: FeatureCache, identity: str) -> int:
    if world.main:
        cfg.save(out / "config.yaml")
    training = build_training(cfg, world, device, cache)
    stages, loader, train_set, shuffle = training.stages, training.loader, training.train_set, training.shuffle
    model, loss_fn, normaliser, prior = training.model, training.loss_fn, training.normaliser, training.prior
    train_videos, val_labels, val_videos = training.train_videos, training.val_labels, training.val_videos
    classes = expression_set(expressions(cfg))
    n_epochs = cfg.epochs * len(stages)
    log.info("model: %s encoder, %s structure, %.2f M parameters, %d steps%s", cfg.encoder.name,
             cfg.model.structure, sum(p.numel() for p in model.parameters()) / 1e6, n_epochs * len(loader),
             f" in {len(stages)} stages {stages}" if len(stages) > 1 else "")

    history: list[dict] = []
    start_epoch, best, stale = 0, -math.inf, 0
    # per-task selection: each task's best validation term, its epoch and the weights of that epoch
    task_best = {t: -math.inf for t in cfg.model.tasks}
    task_epochs: dict[str, int] = {}
    task_states: dict[str, dict] = {}
    last_path, best_path = out / "last.pt", out / "best.pt"
    stage, groups, optimizer, scheduler, frozen_modules = None, None, None, None, []
    if cfg.resume and last_path.is_file():
        _, ckpt = load_checkpoint(last_path, device)
        if ckpt.get("identity") != identity:  # claim_run() lets no other run's folder through
            raise RuntimeError(f"{last_path}: saved by run {ckpt.get('identity')}, not {identity}")
        model.load_state_dict(ckpt["state_dict"])
        loss_fn.load_state_dict(ckpt["loss_state"])
        history, best, stale = ckpt["history"], ckpt["best"], ckpt["stale"]
        start_epoch = ckpt["epoch"] + 1
        if start_epoch % cfg.epochs and start_epoch < n_epochs:  # inside a stage: its optimiser goes on
            stage = start_epoch // cfg.epochs
            frozen_modules, groups, optimizer, scheduler = enter_stage(cfg, model, loss_fn, stages, stage,
                                                                       len(loader))
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        task_best.update(ckpt.get("task_best", {}))
        task_epochs = ckpt.get("task_epochs", {})
        if task_epochs:
            task_states = read_checkpoint(best_path, device)["task_state_dicts"]
        log.info("resuming from %s at epoch %d", last_path, start_epoch)
    world.barrier()  # every rank has read last.pt before rank 0 may replace it
    net = model
    if world.size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    extra = {"config": cfg.to_dict(), "identity": identity, "extractors": list(cfg.extractors),
             "normaliser": normaliser.state() if normaliser else None,
             "window": cfg.window, "eval_stride": cfg.eval_stride,
             "eval_windows": cfg.eval_windows, "expressions": list(classes), "feature_attrs": cache.attrs,
             "stage_configs": stage_configs(cfg)}
    # Per-step and per-epoch scalars for TensorBoard; a resumed run first drops what the killed one
    # logged past its last checkpoint, so no step appears twice.
    board = None
    if world.main:
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(out / "tensorboard"), purge_step=start_epoch * len(loader))
    for epoch in range(start_epoch, n_epochs):
        if epoch // cfg.epochs != stage:
            if epoch > 0:  # the next stage starts from the best weights of the last
                model.load_state_dict(best_state(best_path, device, stages[epoch // cfg.epochs - 1], task_states))
                log.info("stage %d: %s, with %s frozen", epoch // cfg.epochs, "+".join(stages[epoch // cfg.epochs]),
                         "+".join(sorted({t for s in stages[: epoch // cfg.epochs] for t in s})) or "nothing")
            stage = epoch // cfg.epochs
            frozen_modules, groups, optimizer, scheduler = enter_stage(cfg, model, loss_fn, stages, stage,
                                                                       len(loader))
            best, stale = -math.inf, 0
        if stale >= cfg.patience > 0:
            if stage == len(stages) - 1:
                log.info("no better validation score for %d epochs: stopping early", stale)
                break
            continue  # on to the next stage
        tasks_now = stages[stage]
        tick = time.perf_counter()
        # Every random draw of an epoch follows from (seed, epoch), so a resumed run repeats it.
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        shuffle.manual_seed(cfg.seed * 100_003 + epoch)
        net.train()
        for module in frozen_modules:
            module.eval()
        train_set.set_epoch(epoch)
        looping = time.perf_counter()
        losses = train_epoch(cfg, net, loader, loss_fn, optimizer, scheduler, groups, tasks_now, device, world,
                             epoch * len(loader), board, f"epoch {epoch}/{n_epochs}")
        train_seconds = time.perf_counter() - looping
        if cfg.schedule_unit == "epoch":
            scheduler.step()
        if not world.main:
            # rank 0 evaluates; the others learn its verdict, so that all stop together
            verdict = [None, None]
            dist.broadcast_object_list(verdict, src=0)
            best, stale = verdict
            continue
        val_scores, _ = evaluate(model, cache, val_labels, val_videos, normaliser, cfg, prior=prior)
        score = selection_score(val_scores, tasks_now)
        if cfg.selection == "per_task":
            better = [t for t in tasks_now if val_scores[TERMS[t]] > task_best[t]]  # NaN is never better
            snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()} if better else None
            for t in better:  # tasks best at the same epoch share its weights, in memory and in best.pt
                task_best[t], task_epochs[t], task_states[t] = val_scores[TERMS[t]], epoch, snapshot
            improved = bool(better)
            best = max(best, score) if improved else best
        else:
            improved = not math.isnan(score) and score > best
            best = score if improved else best
        stale = 0 if improved else stale + 1
        if world.size > 1:
            dist.broadcast_object_list([best, stale], src=0)
        record = {"epoch": epoch, "stage": stage, "train_loss": float(np.mean(losses)),
                  "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - tick, 2),
                  "train_seconds": round(train_seconds, 2), "val": val_scores}
        history.append(record)
        log.info("epoch %3d  loss %.4f  val %s %.4f%s  (%.1f s)", epoch, record["train_loss"],
                 "P_MTL" if len(tasks_now) == 3 else "+".join(tasks_now), score,
                 ("  * " + "+".join(better) if cfg.selection == "per_task" else "  *") if improved else "",
                 record["seconds"])
        board.add_scalar("epoch/train_loss", record["train_loss"], epoch)
        board.add_scalar("epoch/seconds", record["seconds"], epoch)
        for key, value in val_scores.items():
            if isinstance(value, int | float) and not math.isnan(value):
                board.add_scalar(f"val/{key}", value, epoch)
        board.flush()
        state = {**extra, "loss_state": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "history": history, "best": best, "stale": stale,
                 "epoch": epoch, "task_best": task_best, "task_epochs": task_epochs}
        if improved:
            per_task = {"task_state_dicts": task_states} if cfg.selection == "per_task" else {}
            save_checkpoint(best_path, model, **state, **per_task)
        save_checkpoint(last_path, model, **state)
        write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))

    if world.main:
        board.close()
        finish(cfg, out, history, cache, val_labels, val_videos, normaliser, device,
               {"train": len(train_videos), "val": len(val_videos), "val_labelled": len(val_labels)},
               identity, prior)
        finish_run(out, identity)
        if not cfg.out_dir:
            link_newest(out, run_name(cfg))
    world.barrier()
    if world.size > 1:
        dist.destroy_process_group()
    return 0


def print_scores(scores: dict) -> None:
    """The scores table, and each data set's own line when the run pooled several."""
    print(metrics.format_table(scores))
    if scores.get("data"):
        keys = ("ccc_v", "ccc_a", "f1_expr", "f1_au", "p_mtl")
        print("\n" + metrics.markdown_table(
            ["data set", "CCC-V", "CCC-A", "F1-EXPR", "F1-AU", "P_MTL", "frames (va/expr/au)"],
            [[name, *(metrics.score_cell(own[k]) for k in keys), f"{own['n_va']}/{own['n_expr']}/{own['n_au']}"]
             for name, own in scores["data"].items()]))


def best_state(best_path: Path, device: torch.device, tasks: list[str], task_states: dict) -> dict:
    """The weights a finished stage hands on: its task's own best with per-task selection and one
    task, else the stage's best epoch."""
    if len(tasks) == 1 and tasks[0] in task_states:
        return task_states[tasks[0]]
    return read_checkpoint(best_path, device)["state_dict"]


def finish(cfg: Config, out: Path, history: list[dict], cache: FeatureCache, val_labels: dict, val_videos: list[str],
           normaliser: Normaliser | None, device: torch.device, counts: dict[str, int], identity: str,
           prior: dict) -> None:
    """Score the best checkpoint, store the thresholds and smoothing chosen on validation with it,
    and write the curves, predictions and ``scores.json``."""
    plot_curves(history, out / "curves.png")
    best_path = out / "best.pt"
    model, ckpt = load_checkpoint(best_path, device)
    scores, preds = evaluate(model, cache, val_labels, val_videos, normaliser, cfg, prior=prior)
    # Chosen on validation and stored with the model for prediction; the headline scores stay
    # those of the official 0.5 threshold and unsmoothed outputs.
    chosen = {}
    if cfg.tune_au_thresholds and "au" in cfg.model.tasks:
        probs = np.concatenate([metrics.dense_predictions(preds[v], len(val_labels[v]))["au"] for v in val_videos])
        thresholds = metrics.tune_au_thresholds(probs, np.concatenate([val_labels[v].au for v in val_videos]))
        chosen["au_thresholds"] = thresholds.tolist()
        scores["f1_au_tuned"] = metrics.score_videos(preds, val_labels, au_thresholds=thresholds,
                                                     prior=prior)["f1_au"]
    if "va" in cfg.model.tasks:
        chosen["va_smoothing"], scores["p_va_smoothed"] = choose_va_smoothing(
            preds, val_labels, cfg.va_smoothing, cfg.va_smoothing_per_dimension, prior)
        scores["va_smoothing"] = chosen["va_smoothing"]
    if chosen:
        rewrite_checkpoint(best_path, ckpt, **chosen)
    write_task_files(out / "predictions", preds, tasks=tuple(cfg.model.tasks))
    epoch = ckpt.get("task_epochs") if cfg.selection == "per_task" else ckpt["epoch"]
    scores.update({"encoder": cfg.encoder.name, "extractors": list(cfg.extractors), "epoch": epoch,
                   "expressions": expressions(cfg), "noise_features": cfg.noise_features,
                   "videos": counts, "identity": identity})
    write_json(out / "scores.json", scores)
    print(f"\nValidation scores ({cfg.data.name}, {'+'.join(cfg.extractors)} features, {cfg.encoder.name}, "
          f"best epoch {epoch}){' -- NOISE CONTROL' if cfg.noise_features else ''}")
    print_scores(scores)
    filled = {k[len("filled_"):]: v for k, v in scores.items() if k.startswith("filled_") and v}
    if filled:
        print("labelled frames without a prediction, scored with the training prior: "
              + ", ".join(f"{t} {n}" for t, n in filled.items()))
    print(f"written to {out / 'scores.json'}")


def cli() -> None:
    """The ``affect-train`` command, the same as ``python -m pipeline.train``."""
    run_stage("train", main)


if __name__ == "__main__":
    cli()
