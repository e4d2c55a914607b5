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
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from models import STRUCTURES, TASKS, MultiTaskLoss, MultiTaskModel
from models.cross_task import au_cooccurrence
from models.losses import VA_LOSSES, WEIGHTINGS
from models.transformer import POSITIONS
from pipeline import metrics
from pipeline.config import DEVICE, Config, InputError, check_choices, read_yaml, run_stage
from pipeline.data import Normaliser, SequenceDataset, feature_paths
from pipeline.distributed import GlobalBatches, Shares, World, gather_batch, init_world
from pipeline.feature_cache import FeatureCache
from pipeline.inference import load_checkpoint, predict_features, save_checkpoint, smooth
from pipeline.labels import FORMATS, load_annotations
from pipeline.runs import (
    ForeignRun,
    RunLocked,
    claim_run,
    finish_run,
    link_newest,
    setup_logging,
    stage_lock,
    write_json,
    write_text,
)
from pipeline.writers import write_task_files

log = logging.getLogger("pipeline")

SCHEDULES = ("cosine", "linear")  # learning-rate decay after the warm-up
CLASS_WEIGHTS = ("auto", "none")  # auto: from the training split's label frequencies
AU_GRAPHS = (None, "learned", "cooccurrence")  # cross_attention's AU relation graph

# Keys whose value is one of a set, refused before any work starts when it is not.
CHOICES = {
    "model.tasks": tuple(TASKS),
    "model.structure": tuple(STRUCTURES),
    "model.au_graph": AU_GRAPHS,
    "loss.va": VA_LOSSES,
    "loss.weighting": WEIGHTINGS,
    "loss.expr_class_weights": CLASS_WEIGHTS,
    "loss.au_pos_weight": CLASS_WEIGHTS,
    "encoder.positions": POSITIONS,
    "data.format": FORMATS,
    "schedule": SCHEDULES,
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


def open_features(cfg: Config) -> FeatureCache:
    """The feature caches the run reads; a missing, unreadable or foreign cache is an input error."""
    try:
        return FeatureCache(feature_paths(cfg.runs_dir, cfg.data.name, cfg.extractors))
    except (OSError, ValueError) as e:
        raise InputError(str(e)) from None


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds the legacy global generator that user code may use
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up, then cosine or linear decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)


def class_balance(labels: dict, videos: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-frequency expression weights (mean 1 over present classes) and AU positive weights
    (negatives / positives, capped at 10), from the training split's valid labels."""
    expr = np.concatenate([labels[v].expr for v in videos])
    au = np.concatenate([labels[v].au for v in videos])
    counts = np.bincount(expr[expr >= 0], minlength=8).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(1, (counts > 0).sum()), 0.0)
    pos = ((au == 1).sum(0)).astype(np.float64)
    neg = ((au == 0).sum(0)).astype(np.float64)
    pos_weight = np.clip(neg / np.maximum(pos, 1), 1.0, 10.0)
    return torch.tensor(weights, dtype=torch.float32), torch.tensor(pos_weight, dtype=torch.float32)


def evaluate(
    model: MultiTaskModel,
    cache: FeatureCache,
    labels: dict,
    videos: list[str],
    normaliser: Normaliser | None,
    cfg: Config,
    au_thresholds: np.ndarray | None = None,
) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Scores over all validation frames pooled, and the per-frame predictions of each video."""
    preds = {}
    for video in videos:
        feats, present, frames = cache.read(video)
        if cfg.noise_features:
            feats = np.random.default_rng((cfg.seed, len(video))).standard_normal(feats.shape).astype(np.float32)
            norm = None
        else:
            norm = normaliser
        out = predict_features(model, feats, present, norm, cfg.window, cfg.eval_stride, cfg.device)
        preds[video] = {"frame": frames, **out}
    return metrics.score_videos(preds, labels, au_thresholds=au_thresholds), preds


def stage_configs(cfg: Config) -> dict:
    """The resolved configs of the faces and features runs behind this run's features, so that
    prediction on a new video repeats them (crop sizes, template, extractor weights)."""
    runs = Path(cfg.runs_dir) / cfg.data.name
    paths = {"faces": runs / "faces" / "config.yaml",
             **{f"features:{name}": runs / "features" / f"{name}.yaml" for name in cfg.extractors}}
    return {key: read_yaml(path) for key, path in paths.items() if path.is_file()}


def choose_va_smoothing(preds: dict, labels: dict, windows: list[int]) -> tuple[int, float]:
    """The moving-average window (frames) for valence/arousal that maximises validation P_VA."""
    best = (1, -math.inf)
    for window in sorted(set(windows) | {1}):
        smoothed = {v: {**p, "va": smooth(p["va"], window)} for v, p in preds.items()}
        p_va = metrics.score_videos(smoothed, labels)["p_va"]
        if p_va > best[1] + 1e-6:
            best = (window, p_va)
    return best


def selection_score(scores: dict, tasks: list[str]) -> float:
    """What early stopping maximises: P_MTL's terms for the tasks trained (P_MTL for all three)."""
    terms = {"va": "p_va", "expr": "f1_expr", "au": "f1_au"}
    return float(sum(scores[terms[t]] for t in tasks))


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
    world, device = init_world(cfg.device)
    setup_logging(logging.INFO if world.main else logging.WARNING)
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
                print(metrics.format_table(scores))
            return 0
        return run(cfg, world, device, out, cache, identity)


def run(cfg: Config, world: World, device: torch.device, out: Path, cache: FeatureCache, identity: str) -> int:
    if world.main:
        cfg.save(out / "config.yaml")
    seed_everything(cfg.seed, cfg.deterministic)

    try:
        train_labels = load_annotations(cfg.data.annotations, cfg.data.train_split, cfg.data.format)
        val_labels = load_annotations(cfg.data.annotations, cfg.data.val_split, cfg.data.format)
    except (OSError, ValueError) as e:  # missing or malformed annotations (AnnotationError names the line)
        raise InputError(str(e)) from None
    train_videos = sorted(v for v in train_labels if v in cache.videos)
    val_videos = sorted(v for v in val_labels if v in cache.videos)
    for split, labelled, kept in (("train", train_labels, train_videos), ("val", val_labels, val_videos)):
        if len(kept) < len(labelled):
            log.warning("%d %s videos have labels but no features, e.g. %s", len(labelled) - len(kept), split,
                        sorted(set(labelled) - set(kept))[:3])
        if not kept:
            raise InputError(f"no {split} video has both labels ({cfg.data.annotations}) and features "
                             f"({', '.join(map(str, cache.paths))})")
    log.info("%d train and %d validation videos, %d-d features from %s", len(train_videos), len(val_videos),
             cache.dim, ", ".join(cfg.extractors))
    if cfg.noise_features:
        log.warning("noise_features=true: every feature is replaced by Gaussian noise (the control run)")

    normaliser = None if cfg.noise_features else Normaliser.fit(cache, train_videos)
    train_set = SequenceDataset(cache, train_labels, train_videos, cfg.window, cfg.stride, normaliser,
                                train=True, noise=cfg.noise_features, cache_in_memory=cfg.cache_in_memory,
                                seed=cfg.seed)
    shuffle = torch.Generator()
    batches = GlobalBatches(train_set, cfg.batch_size, len(train_set) > cfg.batch_size, shuffle, world)
    loader = DataLoader(Shares(train_set), batch_sampler=batches, num_workers=cfg.num_workers, generator=shuffle)
    if cfg.batch_size % world.size:
        log.warning("batch_size=%d does not split evenly over %d processes: shares are padded",
                    cfg.batch_size, world.size)

    model_args = dict(cfg.model)
    if model_args["au_graph"] == "cooccurrence":
        model_args["au_graph"] = au_cooccurrence(np.concatenate([train_labels[v].au for v in train_videos])).tolist()
    model = MultiTaskModel(d_in=cache.dim, encoder=dict(cfg.encoder), **model_args).to(device)
    expr_w, au_pw = class_balance(train_labels, train_videos)
    loss_fn = MultiTaskLoss(
        va=cfg.loss.va,
        weighting=cfg.loss.weighting,
        task_weights=dict(cfg.loss.task_weights),
        label_smoothing=cfg.loss.label_smoothing,
        expr_class_weights=expr_w if cfg.loss.expr_class_weights == "auto" else None,
        au_pos_weight=au_pw if cfg.loss.au_pos_weight == "auto" else None,
    ).to(device)
    params = list(model.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * len(loader)
    warmup = int(cfg.warmup * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.schedule))
    log.info("model: %s encoder, %s structure, %.2f M parameters, %d steps", cfg.encoder.name,
             cfg.model.structure, sum(p.numel() for p in model.parameters()) / 1e6, total_steps)

    history: list[dict] = []
    start_epoch, best, stale = 0, -math.inf, 0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if cfg.resume and last_path.is_file():
        _, ckpt = load_checkpoint(last_path, device)
        if ckpt.get("identity") != identity:  # claim_run() lets no other run's folder through
            raise RuntimeError(f"{last_path}: saved by run {ckpt.get('identity')}, not {identity}")
        model.load_state_dict(ckpt["state_dict"])
        loss_fn.load_state_dict(ckpt["loss_state"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        history, best, stale = ckpt["history"], ckpt["best"], ckpt["stale"]
        start_epoch = ckpt["epoch"] + 1
        log.info("resuming from %s at epoch %d", last_path, start_epoch)
    world.barrier()  # every rank has read last.pt before rank 0 may replace it
    net = model
    if world.size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    use_amp = cfg.amp and device.type == "cuda"
    extra = {"config": cfg.to_dict(), "identity": identity, "extractors": list(cfg.extractors),
             "normaliser": normaliser.state() if normaliser else None,
             "window": cfg.window, "eval_stride": cfg.eval_stride, "feature_attrs": cache.attrs,
             "stage_configs": stage_configs(cfg)}
    # Per-step and per-epoch scalars for TensorBoard; a resumed run first drops what the killed one
    # logged past its last checkpoint, so no step appears twice.
    board = None
    if world.main:
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(out / "tensorboard"), purge_step=start_epoch * len(loader))
    # frames per step, for the progress bar's rate; where stderr is a log file, a line every 30 s
    frames_per_step = cfg.batch_size * cfg.window
    interactive = sys.stderr.isatty()
    for epoch in range(start_epoch, cfg.epochs):
        if stale >= cfg.patience > 0:
            log.info("no better validation P_MTL for %d epochs: stopping early", stale)
            break
        tick = time.perf_counter()
        # Every random draw of an epoch follows from (seed, epoch), so a resumed run repeats it.
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        shuffle.manual_seed(cfg.seed * 100_003 + epoch)
        net.train()
        train_set.set_epoch(epoch)
        losses = []
        bar = tqdm(total=len(loader) * frames_per_step, desc=f"epoch {epoch}/{cfg.epochs}", unit="frame",
                   unit_scale=True, leave=False, disable=not world.main, mininterval=0.5 if interactive else 30)
        for step, batch in enumerate(loader, start=epoch * len(loader)):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                outputs = net(batch["x"], batch["mask"])
            outputs, targets = gather_batch({k: v.float() for k, v in outputs.items()}, batch, world)
            loss, parts = loss_fn(outputs, targets, targets["mask"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
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
        if not world.main:
            # rank 0 evaluates; the others learn its verdict, so that all stop together
            verdict = [None, None]
            dist.broadcast_object_list(verdict, src=0)
            best, stale = verdict
            continue
        val_scores, _ = evaluate(model, cache, val_labels, val_videos, normaliser, cfg)
        score = selection_score(val_scores, cfg.model.tasks)
        improved = not math.isnan(score) and score > best
        best, stale = (score, 0) if improved else (best, stale + 1)
        if world.size > 1:
            dist.broadcast_object_list([best, stale], src=0)
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": scheduler.get_last_lr()[0],
                  "seconds": round(time.perf_counter() - tick, 2), "val": val_scores}
        history.append(record)
        log.info("epoch %3d  loss %.4f  val %s %.4f%s  (%.1f s)", epoch, record["train_loss"],
                 "P_MTL" if len(cfg.model.tasks) == 3 else "score", score, "  *" if improved else "",
                 record["seconds"])
        board.add_scalar("epoch/train_loss", record["train_loss"], epoch)
        board.add_scalar("epoch/seconds", record["seconds"], epoch)
        for key, value in val_scores.items():
            if isinstance(value, int | float) and not math.isnan(value):
                board.add_scalar(f"val/{key}", value, epoch)
        board.flush()
        state = {**extra, "loss_state": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "history": history, "best": best, "stale": stale,
                 "epoch": epoch}
        if improved:
            save_checkpoint(best_path, model, **state)
        save_checkpoint(last_path, model, **state)
        write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))

    if world.main:
        board.close()
        finish(cfg, out, history, cache, val_labels, val_videos, normaliser, device,
               {"train": len(train_videos), "val": len(val_videos)}, identity)
        finish_run(out, identity)
        if not cfg.out_dir:
            link_newest(out, run_name(cfg))
    world.barrier()
    if world.size > 1:
        dist.destroy_process_group()
    return 0


def finish(cfg: Config, out: Path, history: list[dict], cache: FeatureCache, val_labels: dict, val_videos: list[str],
           normaliser: Normaliser | None, device: torch.device, counts: dict[str, int], identity: str) -> None:
    """Score the best checkpoint, store the thresholds and smoothing chosen on validation with it,
    and write the curves, predictions and ``scores.json``."""
    plot_curves(history, out / "curves.png")
    best_path = out / "best.pt"
    model, ckpt = load_checkpoint(best_path, device)
    scores, preds = evaluate(model, cache, val_labels, val_videos, normaliser, cfg)
    # Chosen on validation and stored with the model for prediction; the headline scores stay
    # those of the official 0.5 threshold and unsmoothed outputs.
    chosen = {}
    if cfg.tune_au_thresholds and "au" in cfg.model.tasks:
        probs = np.concatenate([metrics.dense_predictions(preds[v], len(val_labels[v]))["au"] for v in val_videos])
        thresholds = metrics.tune_au_thresholds(probs, np.concatenate([val_labels[v].au for v in val_videos]))
        chosen["au_thresholds"] = thresholds.tolist()
        scores["f1_au_tuned"] = metrics.score_videos(preds, val_labels, au_thresholds=thresholds)["f1_au"]
    if "va" in cfg.model.tasks:
        chosen["va_smoothing"], scores["p_va_smoothed"] = choose_va_smoothing(preds, val_labels, cfg.va_smoothing)
        scores["va_smoothing"] = chosen["va_smoothing"]
    if chosen:
        kept = {k: v for k, v in ckpt.items() if k not in ("model_args", "state_dict", *chosen)}
        save_checkpoint(best_path, model, **kept, **chosen)
    write_task_files(out / "predictions", preds, tasks=tuple(cfg.model.tasks))
    scores.update({"encoder": cfg.encoder.name, "extractors": list(cfg.extractors), "epoch": ckpt["epoch"],
                   "noise_features": cfg.noise_features,
                   "videos": counts, "identity": identity})
    write_json(out / "scores.json", scores)
    print(f"\nValidation scores ({cfg.data.name}, {'+'.join(cfg.extractors)} features, {cfg.encoder.name}, "
          f"best epoch {ckpt['epoch']}){' -- NOISE CONTROL' if cfg.noise_features else ''}")
    print(metrics.format_table(scores))
    print(f"written to {out / 'scores.json'}")



if __name__ == "__main__":
    run_stage("train", main)
