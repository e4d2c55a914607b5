"""Stage 3: train a temporal encoder with multi-task heads on cached features, pick the epoch with
the best validation P_MTL, and score it.

    python -m pipeline.train [configs/train.yaml] [key=value ...]

A run is named by what defines it: ``runs/<data>/train/<name>-<hash>/``, where ``name`` is the
``name`` key (an experiment's) or the encoder's, and the hash covers every setting that changes the
result and the features read (:mod:`pipeline.identity`); ``runs/<data>/latest/<name>`` links to
the newest finished one. The same settings resume an interrupted run or skip a finished one; other
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
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline import checkpoint
from pipeline.atomic import write_text
from pipeline.checkpoint import Checkpoint, Inference, ModelPart, Recipe
from pipeline.cli import run_stage
from pipeline.config import Config, InputError, check_choices
from pipeline.distributed import World, init_world, may_leave_unused, parallel
from pipeline.feature_cache import FeatureCache
from pipeline.identity import run_dir, run_identity, run_link, run_name
from pipeline.labels import expression_set
from pipeline.loop import LoopState, train_epoch
from pipeline.runs import STOPS, claimed, stop
from pipeline.splits import expressions, open_features, stage_configs
from pipeline.training import CHOICES, Training, build_training, check_stages, nondeterministic
from pipeline.validation import check_selection_data, finish, report_finished, selected_scores, validate

log = logging.getLogger("pipeline")


def main(cfg: Config) -> int:
    """Train, resume or skip the run of ``cfg``; 0 when done, 2 when its folder is locked,
    unwritable or holds a run with other settings."""
    check_choices(cfg, CHOICES)
    check_stages(cfg)
    check_selection_data(cfg)
    world, device = init_world(cfg.device)
    if not world.main:  # one rank speaks for all
        logging.getLogger().setLevel(logging.WARNING)
    cache = open_features(cfg)
    identity = run_identity(cfg, cache)
    out = run_dir(cfg, identity)
    with contextlib.ExitStack() as stack:
        # the processes of a torchrun job are one run: rank 0 holds the folder and tells the others
        # whether to stop, skip or train
        verdict = ["train"]
        if world.main:
            try:
                run = stack.enter_context(claimed(out, identity, run_link(cfg)))
                verdict = ["skip" if run.done else "train"]
            except STOPS as e:
                stop("train", e)
                verdict = ["stop"]
        if world.size > 1:
            dist.broadcast_object_list(verdict, src=0)
        if verdict[0] == "stop":
            return 2
        if verdict[0] == "skip":
            if world.main:
                report_finished(out)
            return 0
        try:
            status = train(cfg, world, device, out, cache, identity)
        except RuntimeError as e:  # under deterministic: true, an operation without a deterministic kernel
            said = nondeterministic(e)
            if said is None:
                raise
            raise InputError(said) from None
        if world.main:
            run.finish()
            retire_old_link(cfg, out)
        return status


def retire_old_link(cfg: Config, out: Path) -> None:
    """Remove the link older versions kept beside the run folders (``train/<name>``; now
    ``latest/<name>``), through which TensorBoard over ``train/`` showed every run twice."""
    old = out.parent / run_name(cfg)
    if not cfg.out_dir and old.is_symlink():
        old.unlink()


def best_weights(best: Checkpoint, tasks: list[str], task_states: dict) -> dict:
    """The weights a finished stage hands on: its task's own best with per-task selection and one
    task, else the stage's best epoch."""
    if len(tasks) == 1 and tasks[0] in task_states:
        return task_states[tasks[0]]
    return best.model.state_dict


def train(cfg: Config, world: World, device: torch.device, out: Path, cache: FeatureCache, identity: str) -> int:
    """Train the run of ``cfg`` in ``out`` from its start, or from ``last.pt``, then score its best epoch."""
    if world.main:
        cfg.save(out / "config.yaml")
    training: Training = build_training(cfg, world, device, cache)
    stages, loader, model, loss_fn = training.stages, training.loader, training.model, training.loss_fn
    n_epochs = cfg.epochs * len(stages)
    log.info("model: %s encoder, %s structure, %.2f M parameters, %d steps%s", cfg.encoder.name,
             cfg.model.structure, sum(p.numel() for p in model.parameters()) / 1e6, n_epochs * len(loader),
             f" in {len(stages)} stages {stages}" if len(stages) > 1 else "")

    last_path, best_path = out / "last.pt", out / "best.pt"
    state = LoopState.start(cfg)
    if cfg.resume and last_path.is_file():
        # read on the CPU: loading puts the model's and optimiser's tensors where the parameters are,
        # and keeps Adam's step counters on the host (on the GPU every step would read them back)
        last = checkpoint.read(last_path, "cpu")
        if last.recipe.identity != identity:  # claimed() lets no other run's folder through
            raise RuntimeError(f"{last_path}: saved by run {last.recipe.identity}, not {identity}")
        state = LoopState.restore(last, checkpoint.read(best_path, "cpu") if last.resume.task_epochs else None,
                                  cfg, training)
        log.info("resuming from %s at epoch %d", last_path, state.epoch)
    world.barrier()  # every rank has read last.pt before rank 0 may replace it
    net, cut = parallel(model, device, world, may_leave_unused(model, stages, bool(cfg.get("init_frozen"))))

    recipe = Recipe(config=cfg.to_dict(), identity=identity, extractors=list(cfg.extractors),
                    feature_attrs=cache.attrs, stage_configs=stage_configs(cfg),
                    expressions=list(expression_set(expressions(cfg))))
    inference = Inference(normaliser=training.normaliser.state() if training.normaliser else None,
                          window=cfg.window, eval_stride=cfg.eval_stride, eval_windows=cfg.eval_windows,
                          va_smoothing_edges=cfg.va_smoothing_edges)
    # Per-step and per-epoch scalars for TensorBoard; a resumed run first drops what the killed one
    # logged past its last checkpoint, so no step appears twice.
    board = None
    if world.main:
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(out / "tensorboard"), purge_step=state.epoch * len(loader))
    for epoch in range(state.epoch, n_epochs):
        k = epoch // cfg.epochs
        if k != state.stage:
            if epoch > 0:  # the next stage starts from the best weights of the last
                model.load_state_dict(best_weights(checkpoint.read(best_path, "cpu"), stages[k - 1],
                                                   state.task_states))
                log.info("stage %d: %s, with %s frozen", k, "+".join(stages[k]),
                         "+".join(sorted({t for s in stages[:k] for t in s})) or "nothing")
            state.enter(cfg, training, k)
            state.best, state.stale = -math.inf, 0
        if state.stale >= cfg.patience > 0:
            if k == len(stages) - 1:
                log.info("no better validation score for %d epochs: stopping early", state.stale)
                break
            continue  # on to the next stage
        tasks_now = stages[k]
        if cut is not None:  # over several ranks the model returns only what this stage's loss reads
            cut.tasks = tuple(tasks_now)
        tick = time.perf_counter()
        # Every random draw of an epoch follows from (seed, epoch), so a resumed run repeats it.
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        training.shuffle.manual_seed(cfg.seed * 100_003 + epoch)
        net.train()
        if cfg.frozen_mode == "eval":  # else frozen modules keep training mode: dropout and batch statistics live
            for module in state.frozen:
                module.eval()
        training.train_set.set_epoch(epoch)
        looping = time.perf_counter()
        losses = train_epoch(cfg, net, loader, loss_fn, state.optimizer, state.scheduler, state.groups, tasks_now,
                             device, world, epoch * len(loader), board, f"epoch {epoch}/{n_epochs}")
        train_seconds = time.perf_counter() - looping
        if cfg.schedule_unit == "epoch":
            state.scheduler.step()
        state.epoch = epoch + 1
        if not world.main:
            # rank 0 evaluates; the others learn its verdict, so that all stop together
            verdict = [None, None]
            dist.broadcast_object_list(verdict, src=0)
            state.best, state.stale = verdict
            continue
        val_scores, _ = validate(model, cache, training.val_labels, training.val_videos, training.normaliser, cfg,
                                 prior=training.prior)
        improved, better, score = state.judge(epoch, selected_scores(val_scores, cfg), tasks_now, model, cfg)
        if world.size > 1:
            dist.broadcast_object_list([state.best, state.stale], src=0)
        record = {"epoch": epoch, "stage": k, "train_loss": float(np.mean(losses)),
                  "lr": state.scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - tick, 2),
                  "train_seconds": round(train_seconds, 2), "val": val_scores}
        state.history.append(record)
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
        resume = state.resume(loss_fn)
        if improved:
            per_task = state.task_states if cfg.selection == "per_task" else None
            checkpoint.save(best_path, Checkpoint(ModelPart.of(model, per_task), recipe, inference, resume))
        checkpoint.save(last_path, Checkpoint(ModelPart.of(model), recipe, inference, resume))
        write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in state.history))

    if world.main:
        board.close()
        finish(cfg, out, state.history, cache, training, device, identity)
    world.barrier()
    if world.size > 1:
        dist.destroy_process_group()
    return 0


def cli() -> None:
    """The ``affect-train`` command, the same as ``python -m pipeline.train``."""
    run_stage("train", main)


if __name__ == "__main__":
    cli()
