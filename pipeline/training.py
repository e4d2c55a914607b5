"""What a training run builds from its config: the splits and training windows with their
loader, the model, the loss, and for each stage of training its optimiser, schedule, frozen
modules and gradient-clipping groups; and the choices of every training key that takes one."""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from models import STRUCTURES, TASKS, MultiTaskLoss, MultiTaskModel
from models.cross_task import au_cooccurrence
from models.heads import ACTIVATIONS, VA_OUTPUTS
from models.losses import AU_LOSSES, EXPR_REDUCTIONS, VA_LOSSES, VA_REDUCTIONS, WEIGHTINGS
from models.transformer import NORMS, POSITIONS, TransformerEncoder
from pipeline import initialise, metrics
from pipeline.config import DEVICE, Config, ConfigError, InputError
from pipeline.data import FRAMES, Normaliser, SequenceDataset, VideoChunkBatches
from pipeline.distributed import LAST_BATCHES, BalancedBatches, GlobalBatches, Shares, World
from pipeline.feature_cache import FeatureCache
from pipeline.inference import SMOOTHING_EDGES
from pipeline.labels import EXPRESSION_SETS, FORMATS, expression_set
from pipeline.splits import data_sets, expressions, load_splits

log = logging.getLogger("pipeline")

SCHEDULES = ("cosine", "linear", "constant")  # learning-rate decay after the warm-up and hold
SCHEDULE_UNITS = ("step", "epoch")  # how often the rate changes
OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
CLASS_WEIGHTS = ("auto", "none")  # auto: from the training split's label frequencies
AU_WEIGHTS = ("none", "inverse_positive")  # per-AU weights of the asymmetric AU loss
AU_GRAPHS = (None, "learned", "cooccurrence")  # cross_attention's AU relation graph
WINDOWS = ("overlapping", "consecutive")  # how videos are cut into windows
INITS = ("default", "normal")  # PyTorch's initialisation, or every linear layer from N(0, 0.02)
# any windows together, one chunk of each of batch_size videos per step, or every data set's share in each batch
BATCHES = ("windows", "videos", "balanced")
SELECTIONS = ("p_mtl", "per_task")  # one best epoch, or each task's own
CLIP_GROUPS = ("whole", "task")  # one gradient norm, or one per task's branch and head
SELECTION_VA = ("joint", "apart")  # per-task selection: VA's best epoch on P_VA, or valence's and arousal's apart
SELECTION_TIES = ("first", "last")  # an epoch equal to the best so far: keep the earlier one, or take it
FROZEN_MODES = ("eval", "train")  # frozen modules in evaluation mode, or left in training mode
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
    "loss.expr_reduction": EXPR_REDUCTIONS,
    "loss.va_reduction": VA_REDUCTIONS,
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
    "frames": FRAMES,
    "last_batch": LAST_BATCHES,
    "selection_va": SELECTION_VA,
    "selection_ties": SELECTION_TIES,
    "frozen_mode": FROZEN_MODES,
    "va_smoothing_edges": SMOOTHING_EDGES,
    "init_parts": initialise.PARTS,
    "init_frozen": initialise.PARTS,
    "data.expressions": tuple(EXPRESSION_SETS),
    "device": DEVICE,
}

def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds the legacy global generator that user code may use
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace, set before its first use; an operation
        # without a deterministic kernel raises (:func:`nondeterministic`) rather than warn and go on
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def nondeterministic(error: BaseException) -> str | None:
    """torch's refusal of an operation that has no deterministic kernel (under ``deterministic:
    true``) as one line naming the operation, or None for any other error."""
    text = str(error)
    if not isinstance(error, RuntimeError) or "deterministic implementation" not in text:
        return None
    return (f"deterministic=true, but {text.strip().splitlines()[0].split(', but you set')[0]}: "
            "train with deterministic=false, or on a device where it has one")


def lr_factor(step: int, total: int, warmup: int, schedule: str, hold: int = 0, warmup_offset: int = 1,
              decay_offset: int = 0) -> float:
    """Linear warm-up over ``warmup`` steps, at (step + ``warmup_offset``) / warmup (0: the first step
    at rate 0, as transformers' linear schedule), ``hold`` steps at the full rate, then cosine or
    linear decay to zero at ``total`` (or no decay: ``constant``). A step is an optimiser step or an
    epoch. The linear decay over the ``span`` decaying steps k = 0, 1, ... is (span - k) / span, as
    transformers' ``get_linear_schedule_with_warmup`` computes it; ``decay_offset`` 1 makes it
    1 - (k + 1) / (span + 1), as the pix2pix ``linear`` policy does: the first decaying step already
    below the full rate, the last at 1 / (span + 1). Each is that code's arithmetic, to the last bit."""
    if step < warmup:
        return (step + warmup_offset) / warmup
    if step < warmup + hold or schedule == "constant":
        return 1.0
    span = max(1, total - warmup - hold)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup - hold) / span))
    k = step - warmup - hold
    if decay_offset:
        return max(0.0, 1.0 - (k + decay_offset) / (span + decay_offset))
    return max(0.0, (span - k) / span)


def lr_lambda(cfg: Config, steps_per_epoch: int):
    """The schedule of one stage for ``LambdaLR``, stepped after every optimiser step or (with
    ``schedule_unit: epoch``) after every epoch."""
    total = cfg.epochs * (steps_per_epoch if cfg.schedule_unit == "step" else 1)
    warmup, hold = int(round(cfg.warmup * total)), int(round(cfg.hold * total))
    return lambda step: lr_factor(step, total, warmup, cfg.schedule, hold, cfg.warmup_offset, cfg.decay_offset)


def normal_init(model: torch.nn.Module, std: float = 0.02) -> None:
    """Every linear layer's weights from N(0, std) and its bias 0, as the ABAW4 winner's
    ``init_weights`` drew its networks; the attention's joint query, key and value projection, a
    bare parameter of ``nn.MultiheadAttention`` there, keeps that module's own draw (Xavier-uniform
    over the whole matrix, bias 0), one draw for all layers of an encoder, which are deep copies of
    one layer there. Recurrent cells and norms keep their initialisation."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    with torch.no_grad():
        for encoder in (m for m in model.modules() if isinstance(m, TransformerEncoder) and len(m.blocks)):
            shared = torch.nn.init.xavier_uniform_(torch.empty_like(encoder.blocks[0].qkv.weight))
            for block in encoder.blocks:
                block.qkv.weight.copy_(shared)
                torch.nn.init.zeros_(block.qkv.bias)


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



def build_model(cfg: Config, d_in: int, train_labels: dict, train_videos: list[str]) -> MultiTaskModel:
    """The model of ``cfg`` on ``d_in``-wide features (a co-occurrence AU graph and the
    expression classes come from the training labels and the data config)."""
    model_args = dict(cfg.model)
    if model_args.get("au_graph") == "cooccurrence":
        model_args["au_graph"] = au_cooccurrence(np.concatenate([train_labels[v].au for v in train_videos])).tolist()
    try:  # options that cannot go together, or a plug-in encoder refusing one, are the user's to fix
        model = MultiTaskModel(d_in=d_in, encoder=dict(cfg.encoder),
                               expr_classes=len(expression_set(expressions(cfg))), **model_args)
    except (TypeError, ValueError) as e:
        raise InputError(f"the model of this config cannot be built: {e}") from None
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
        expr_reduction=cfg.loss.expr_reduction,
        va_reduction=cfg.loss.va_reduction,
    )


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)



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


def data_shares(cfg: Config) -> dict[str, float]:
    """Each pooled data set's share of a balanced batch (``data_proportions``; equal when empty);
    refused with one data set, a share of an unknown one, or a batch too small for all."""
    names = [d.name for d in data_sets(cfg)]
    if len(names) < 2:
        raise InputError("batches: balanced needs several data sets (data=[a,b]); this run reads one")
    given = dict(cfg.data_proportions or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise InputError(f"config key 'data_proportions' names {', '.join(unknown)}, not a data set of this run "
                         f"({', '.join(names)})")
    shares = {n: float(given.get(n, 1.0 if not given else 0.0)) for n in names}
    if any(not math.isfinite(w) or w <= 0 for w in shares.values()):
        raise InputError(f"config key 'data_proportions' = {given}: a positive share for each of {', '.join(names)}")
    if cfg.batch_size < len(names):
        raise InputError(f"batch_size={cfg.batch_size} cannot hold a window of each of {len(names)} data sets")
    return shares


def fit_normaliser(cfg: Config, cache: FeatureCache, train_videos: list[str]) -> Normaliser | None:
    """The standardisation of the features fitted on the training split, or None where they are
    fed as cached (``standardise: false``) or replaced by noise."""
    return None if cfg.noise_features or not cfg.standardise else Normaliser.fit(cache, train_videos)


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


def loader_workers(value: int | None, device: torch.device) -> int:
    """Worker processes reading feature windows: unset (None), none on the CPU (its cores train) and
    up to 4 on CUDA (the GPU waits on reads done in the main process); a number as given."""
    if value is None:
        return 0 if device.type == "cpu" else min(4, max(1, (os.cpu_count() or 2) - 1))
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"num_workers={value!r}: give a number of worker processes, 0 or more (or null)")
    return value


def feeding(cfg: Config, device: torch.device) -> dict:
    """How the training loader feeds ``device``: its workers, and page-locked batches for CUDA, which
    the loop copies without waiting."""
    return {"num_workers": loader_workers(cfg.num_workers, device), "pin_memory": device.type == "cuda"}


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

    normaliser = fit_normaliser(cfg, cache, train_videos)
    train_set = SequenceDataset(cache, train_labels, train_videos, cfg.window, cfg.stride, normaliser,
                                train=True, noise=cfg.noise_features, cache_in_memory=cfg.cache_in_memory,
                                seed=cfg.seed, consecutive=cfg.train_windows == "consecutive",
                                frames=cfg.frames, tasks=stages[0])
    shuffle = torch.Generator()
    carry = bool(cfg.encoder.get("carry_state"))
    if carry and (cfg.batches != "videos" or cfg.eval_windows != "consecutive"):
        raise InputError("encoder.carry_state needs batches: videos and eval_windows: consecutive")
    if cfg.batches == "videos":  # each batch row one video, chunk after chunk (the state carried, if it is)
        if cfg.train_windows != "consecutive" or world.size > 1:
            raise InputError("batches: videos needs train_windows: consecutive, in one process")
        loader = DataLoader(train_set, batch_sampler=VideoChunkBatches(train_set, cfg.batch_size, shuffle),
                            **feeding(cfg, device))
    elif cfg.batches == "balanced":
        batches = BalancedBatches(train_set, [v.partition("/")[0] for v in train_videos],
                                  data_shares(cfg), cfg.batch_size, cfg.last_batch, shuffle, world)
        loader = DataLoader(Shares(train_set), batch_sampler=batches, generator=shuffle, **feeding(cfg, device))
    else:
        batches = GlobalBatches(train_set, cfg.batch_size, cfg.last_batch, shuffle, world)
        loader = DataLoader(Shares(train_set), batch_sampler=batches, generator=shuffle, **feeding(cfg, device))
    if cfg.batch_size % world.size:
        log.warning("batch_size=%d does not split evenly over %d processes: shares are padded",
                    cfg.batch_size, world.size)

    model = build_model(cfg, cache.dim, train_labels, train_videos)
    initialise.take_parts(cfg, model)
    model = model.to(device)
    # class weights from the labels training reads (with frames: labelled, only those of frames with a face)
    loss_fn = build_loss(cfg, model, train_set.labels_read(), train_videos).to(device)
    return Training(stages, train_labels, val_labels, train_videos, val_videos, prior, normaliser, train_set,
                    shuffle, loader, model, loss_fn)


def enter_stage(
    cfg: Config, model: MultiTaskModel, loss_fn: MultiTaskLoss, stages: list[list[str]], k: int, steps_per_epoch: int
) -> tuple[list[torch.nn.Module], list[list[torch.nn.Parameter]], torch.optim.Optimizer,
           torch.optim.lr_scheduler.LambdaLR]:
    """Freeze what earlier stages trained (and stage ``k`` does not) and the parts taken from other
    runs that ``init_frozen`` names: the modules returned, to be kept in eval mode so their
    batch-norm statistics stay too. Its clip groups, a fresh optimiser and schedule."""
    earlier = {t for s in stages[:k] for t in s} - set(stages[k])
    frozen_modules = task_modules(model, sorted(earlier)) + initialise.frozen_modules(cfg, model)
    frozen = {id(p) for m in frozen_modules for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad]
                                + list(loss_fn.parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    groups = clip_groups(model, cfg.clip_groups)
    groups[0] = groups[0] + list(loss_fn.parameters())
    return frozen_modules, groups, optimizer, scheduler
