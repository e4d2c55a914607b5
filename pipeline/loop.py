"""The epoch loop of training: one pass over the training windows, and the loop's state from
epoch to epoch (history, best scores, the stage's optimiser), which every checkpoint saves and
``last.pt`` restores so that an interrupted run goes on as if it had never stopped."""

from __future__ import annotations

import math
import operator
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models import MultiTaskLoss
from models.recurrent import reset_carried_state
from pipeline.checkpoint import Checkpoint, Resume
from pipeline.config import Config
from pipeline.distributed import World, gather_batch
from pipeline.precision import training_dtype
from pipeline.training import Training, enter_stage
from pipeline.validation import selection_keys, selection_score, selection_term

LOG_EVERY = 50  # optimiser steps between readings of the losses from the device

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


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
    ``first_step``. The batch losses.

    The host waits for the device only where it logs: the losses stay on the device and are read
    every ``LOG_EVERY`` steps and at the end, in one copy, for the progress bar and ``board``."""
    carry = bool(cfg.encoder.get("carry_state"))
    dtype = training_dtype(device, cfg.amp)
    # frames per step, for the progress bar's rate; where stderr is a log file, a line every 30 s
    frames_per_step = cfg.batch_size * cfg.window
    interactive = sys.stderr.isatty()
    losses: list[float] = []
    pending: list[tuple[int, float, torch.Tensor, dict]] = []  # steps not yet read back from the device

    def log_pending() -> None:
        if not pending:
            return
        read = torch.stack([torch.stack([loss, *parts.values()]) for _, _, loss, parts in pending]).tolist()
        for (step, lr, _, parts), values in zip(pending, read, strict=True):
            losses.append(values[0])
            if board is not None:
                board.add_scalar("train/loss", values[0], step)
                board.add_scalar("train/lr", lr, step)
                for task, value in zip(parts, values[1:], strict=True):
                    board.add_scalar(f"train/loss_{task}", value, step)
        bar.update(frames_per_step * len(pending))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{pending[-1][1]:.2e}", refresh=False)
        pending.clear()

    bar = tqdm(total=len(loader) * frames_per_step, desc=desc, unit="frame", unit_scale=True, leave=False,
               disable=not world.main, mininterval=0.5 if interactive else 30)
    for step, batch in enumerate(loader, start=first_step):
        if carry and int(batch["start"].max()) == 0:  # a new group of videos starts from zeros (read on the host)
            reset_carried_state(net)
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
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
        pending.append((step, lr, loss.detach(), {t: torch.as_tensor(v, device=loss.device).detach().to(loss.dtype)
                                                   for t, v in parts.items()}))
        if len(pending) == LOG_EVERY:
            log_pending()
    log_pending()
    bar.close()
    return losses



@dataclass
class LoopState:
    """Where a run's epoch loop is. ``epoch`` is the next one to train; ``best`` and ``stale`` are
    the current stage's best selection score and the epochs since it improved; with per-task
    selection ``task_best``, ``task_epochs`` and ``task_states`` hold each task's best term, its
    epoch and the weights of that epoch. ``stage`` is the stage whose ``optimizer``, ``scheduler``,
    clipping ``groups`` and ``frozen`` modules are live (None before the first)."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: float = -math.inf
    stale: int = 0
    task_best: dict[str, float] = field(default_factory=dict)
    task_epochs: dict[str, int] = field(default_factory=dict)
    task_states: dict[str, dict] = field(default_factory=dict)
    stage: int | None = None
    frozen: list[torch.nn.Module] = field(default_factory=list)
    groups: list[list[torch.nn.Parameter]] | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    @classmethod
    def start(cls, cfg: Config) -> LoopState:
        return cls(task_best={k: -math.inf for k in selection_keys(cfg.model.tasks, cfg.selection_va)})

    def enter(self, cfg: Config, training: Training, k: int) -> None:
        """Make stage ``k`` live: its tasks' frames (with ``frames: labelled``), frozen what earlier
        stages trained, a fresh optimiser and schedule."""
        self.stage = k
        training.train_set.set_tasks(training.stages[k])
        self.frozen, self.groups, self.optimizer, self.scheduler = enter_stage(
            cfg, training.model, training.loss_fn, training.stages, k, len(training.loader))

    def judge(self, epoch: int, scores: dict, tasks: list[str], model: torch.nn.Module,
              cfg: Config) -> tuple[bool, list[str], float]:
        """Take epoch ``epoch``'s validation ``scores`` for the stage's ``tasks``: whether it is the
        best so far (per task: better for any task or, with ``selection_va: apart``, VA dimension),
        what it is best for, its selection score. With ``selection_ties: last`` an epoch equal to
        the best so far takes its place; NaN is never better."""
        score = selection_score(scores, tasks)
        beats = operator.ge if cfg.selection_ties == "last" else operator.gt
        better: list[str] = []
        if cfg.selection == "per_task":
            better = [k for k in selection_keys(tasks, cfg.selection_va)
                      if beats(scores[selection_term(k)], self.task_best[k])]
            snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()} if better else None
            for k in better:  # what is best at the same epoch shares its weights, in memory and in best.pt
                self.task_best[k], self.task_epochs[k], self.task_states[k] = scores[selection_term(k)], epoch, snapshot
            improved = bool(better)
            self.best = max(self.best, score) if improved else self.best
        else:
            improved = not math.isnan(score) and beats(score, self.best)
            self.best = score if improved else self.best
        self.stale = 0 if improved else self.stale + 1
        return improved, better, score

    def resume(self, loss_fn: MultiTaskLoss) -> Resume:
        """What a checkpoint saves of the loop after epoch ``epoch - 1``."""
        return Resume(epoch=self.epoch - 1, history=self.history, best=self.best, stale=self.stale,
                      task_best=self.task_best, task_epochs=self.task_epochs, loss_state=loss_fn.state_dict(),
                      optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())

    @classmethod
    def restore(cls, last: Checkpoint, best: Checkpoint | None, cfg: Config, training: Training) -> LoopState:
        """The loop as ``last.pt`` left it, the model and loss restored in place; inside a stage its
        optimiser and schedule go on (at a stage's end the next stage starts afresh)."""
        saved = last.resume
        training.model.load_state_dict(last.model.state_dict)
        training.loss_fn.load_state_dict(saved.loss_state)
        state = cls.start(cfg)
        state.history, state.best, state.stale, state.epoch = saved.history, saved.best, saved.stale, saved.epoch + 1
        if state.epoch % cfg.epochs and state.epoch < cfg.epochs * len(training.stages):
            state.enter(cfg, training, state.epoch // cfg.epochs)
            state.optimizer.load_state_dict(saved.optimizer)
            state.scheduler.load_state_dict(saved.scheduler)
        state.task_best.update(saved.task_best)
        state.task_epochs = dict(saved.task_epochs)
        if state.task_epochs and best is not None:
            state.task_states = dict(best.model.task_state_dicts or {})
        return state
