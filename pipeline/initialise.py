"""A model's parts started from other runs' weights: ``init_from`` (a checkpoint, or a run folder
holding ``best.pt``) gives the parts named in ``init_parts``, ``init_sources`` gives a part from a
run of its own (``init_sources.au=runs/sample/latest/au_only``), and ``init_frozen`` keeps taken
parts fixed for the whole run.

A part is a set of state-dict entries, named the same in the source and the model:

- ``encoder``: the structure's shared temporal encoder (``encoder`` of ``shared``, ``bottom`` of
  the others), so a shared run's encoder starts a task-specific model's bottom;
- ``va``, ``valence``, ``arousal``, ``expr``, ``au``: what belongs to that task alone
  (:func:`pipeline.training.task_modules`: its branch and head, ``va`` both VA halves where they
  are split), found under the same names in the source, so both must have that structure;
- ``all``: every entry, source and model of one structure and widths.

Where the source kept each task's weights from its own best epoch (``selection: per_task``), a
task's part comes from that task's weights and the encoder (and with ``all`` whatever no task owns)
from the checkpoint's shared weights: those of the last epoch that improved any task, which in a
uni-task run is its task's best epoch. Parts are taken in order, ``init_sources`` after
``init_parts``, after the model is built and ``init`` ran, before the optimiser is made.

A run started from other runs is named by what it took: each part with its source's run identity
and file (never its path), so another source is another run and a moved one the same.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models import MultiTaskModel
from models.abaw import TASKS, VA_PARTS
from pipeline import checkpoint
from pipeline.checkpoint import Checkpoint
from pipeline.config import InputError
from pipeline.runs import finished

log = logging.getLogger("pipeline")

TASK_PARTS = (*TASKS[:1], *VA_PARTS, *TASKS[1:])  # va, valence, arousal, expr, au
PARTS = ("encoder", *TASK_PARTS, "all")
KEYS = ("init_from", "init_parts", "init_sources", "init_frozen")  # the keys this module reads
ENCODERS = ("encoder", "bottom")  # what the structures call their shared encoder


@dataclass(frozen=True)
class Take:
    """One part to take: its name, the config key that names its source, and that source."""

    part: str
    key: str
    source: str

    def where(self) -> str:
        return f"{self.key}={self.source}"


def plan(cfg: Mapping) -> list[Take]:
    """The parts ``cfg`` takes, in order; a part named twice, an unknown one or a frozen part that
    is not taken is refused, naming the key."""
    takes = [Take(p, "init_from", cfg["init_from"]) for p in cfg.get("init_parts", [])] if cfg.get("init_from") else []
    for part, source in (cfg.get("init_sources") or {}).items():
        if part not in PARTS:
            raise InputError(f"config key 'init_sources.{part}': no such part; choose one of {', '.join(PARTS)}")
        if not isinstance(source, str) or not source:
            raise InputError(f"config key 'init_sources.{part}' = {source!r}: give a checkpoint or a run folder")
        takes.append(Take(part, f"init_sources.{part}", source))
    named = [t.part for t in takes]
    twice = sorted({p for p in named if named.count(p) > 1})
    if twice:
        raise InputError(f"config keys init_parts and init_sources both name {', '.join(twice)}; take each part "
                         "from one run")
    untaken = [p for p in cfg.get("init_frozen", []) if p not in named]
    if untaken:
        raise InputError(f"config key 'init_frozen' = {list(cfg['init_frozen'])}: {', '.join(untaken)} "
                         f"{'is' if len(untaken) == 1 else 'are'} not taken from another run (init_parts, "
                         "init_sources); only taken parts stay frozen")
    if "all" in cfg.get("init_frozen", []):
        raise InputError("config key 'init_frozen' = [all]: nothing would be left to train")
    return takes


def checkpoint_path(take: Take) -> Path:
    """The checkpoint a source names: the file, or ``best.pt`` of a run folder."""
    path = Path(take.source)
    path = path / "best.pt" if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"{take.where()}: no checkpoint there (give a best.pt or a run folder holding one)")
    return path


def read_source(take: Take) -> tuple[Path, Checkpoint]:
    """The source's checkpoint; one of a run that has not finished (whose best.pt may still change)
    is refused."""
    path = checkpoint_path(take)
    try:
        ckpt = checkpoint.read(path)
    except ValueError as e:
        raise InputError(f"{take.where()}: {e}") from None
    if (path.parent / "run.json").is_file() and not finished(path.parent, ckpt.recipe.identity):
        raise InputError(f"{take.where()}: {path.parent} holds a run that has not finished; its weights may "
                         "still change")
    return path, ckpt


def source_identity(path: Path, ckpt: Checkpoint) -> str:
    """What names a source: its run's identity and file name, else the file's SHA-256."""
    if ckpt.recipe.identity:
        return f"{ckpt.recipe.identity}/{path.name}"
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def identity(cfg: Mapping) -> dict | None:
    """What the parts taken add to a run's identity: each part with its source's identity, and the
    frozen parts; None when the run takes nothing (its identity is then as before these keys)."""
    takes = plan(cfg)
    if not takes:
        return None
    parts = [[t.part, source_identity(*read_source(t))] for t in takes]
    return {"parts": parts, "frozen": sorted(cfg.get("init_frozen", []))}


def part_modules(model: MultiTaskModel, part: str) -> list[tuple[str, nn.Module]]:
    """The modules of ``part`` with the names its entries take: ``encoder`` for the shared encoder
    whatever the structure calls it, a task's modules by their path in the structure."""
    net = model.net
    if part == "all":
        return [("", net)]
    if part == "encoder":
        return [("encoder", getattr(net, n)) for n in ENCODERS if isinstance(getattr(net, n, None), nn.Module)][:1]
    from pipeline.training import task_modules  # here: training imports this module for its choices

    names = {id(m): name for name, m in net.named_modules()}
    return [(names[id(m)], m) for m in task_modules(model, [part])]


def part_entries(model: MultiTaskModel, part: str) -> dict[str, str]:
    """``part``'s state-dict entries: the name they share across models -> the model's own key."""
    full = {id(m): name for name, m in model.named_modules()}
    entries = {}
    for label, module in part_modules(model, part):
        for key in module.state_dict():
            entries[f"{label}.{key}" if label else key] = f"{full[id(module)]}.{key}"
    return entries


def _roots(model: MultiTaskModel, part: str) -> str:
    return ", ".join(label or "every module" for label, _ in part_modules(model, part)) or "none"


def _task_of(part: str) -> str:
    return "va" if part in VA_PARTS else part


def _state(ckpt: Checkpoint, part: str) -> dict:
    """The weights a part comes from: its task's own best with per-task selection, else the shared."""
    states = ckpt.model.task_state_dicts or {}
    return states.get(_task_of(part), ckpt.model.state_dict) if part in TASK_PARTS else ckpt.model.state_dict


def source_values(take: Take, path: Path, ckpt: Checkpoint, model: MultiTaskModel) -> dict[str, torch.Tensor]:
    """The values ``take`` gives ``model``: its model key -> the source's tensor; a part that the
    model or the source lacks, or whose entries or shapes differ, is refused in one line naming the
    source and the part."""
    where = f"{take.where()} ({path})"
    part, structure = take.part, model.args["structure"]
    if part in TASK_PARTS and _task_of(part) not in model.tasks:
        raise InputError(f"{where}: part {part!r}: this model has no {_task_of(part)} task "
                         f"(model.tasks: {', '.join(model.tasks)})")
    target = part_entries(model, part)
    if not target:
        raise InputError(f"{where}: part {part!r}: this model's {structure} structure has no weights in that part")
    try:
        with torch.random.fork_rng(devices=[]):  # built for its names alone: the run's draws stay as they were
            source_model = MultiTaskModel.from_args(ckpt.model.args)
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: part {part!r}: the source's model cannot be rebuilt ({e})") from None
    if part in TASK_PARTS and _task_of(part) not in source_model.tasks:
        raise InputError(f"{where}: part {part!r}: the source run has no {_task_of(part)} task "
                         f"(its tasks: {', '.join(source_model.tasks)})")
    source = part_entries(source_model, part)
    if set(source) != set(target):
        other = ckpt.model.args.get("structure")
        only = sorted(set(source) ^ set(target))[0]
        raise InputError(f"{where}: part {part!r} does not fit: the source's {other} model has "
                         f"{_roots(source_model, part)}, this {structure} model {_roots(model, part)} "
                         f"({only} is in one only)")
    values: dict[str, torch.Tensor] = {}
    states = {p: _state(ckpt, p) for p in TASK_PARTS} if part == "all" else None
    owners = {k: t for t in source_model.tasks for k in part_entries(source_model, t)} if part == "all" else {}
    mine = model.state_dict()
    for name, key in target.items():
        state = states[owners[name]] if name in owners else _state(ckpt, part)
        value = state.get(source[name])
        if value is None:
            raise InputError(f"{where}: part {part!r}: the checkpoint holds no {source[name]}")
        if tuple(value.shape) != tuple(mine[key].shape):
            raise InputError(f"{where}: part {part!r} does not fit: {name} is {tuple(value.shape)} there, "
                             f"{tuple(mine[key].shape)} here (feature width, widths or classes differ)")
        values[key] = value
    return values


def take_parts(cfg: Mapping, model: MultiTaskModel) -> None:
    """Copy the parts ``cfg`` takes into ``model`` (in place), logging each with its source; every
    part is checked before any is copied."""
    taken = []
    for take in plan(cfg):
        path, ckpt = read_source(take)
        taken.append((take, path, ckpt, source_values(take, path, ckpt, model)))
    for take, path, ckpt, values in taken:
        model.load_state_dict(values, strict=False)  # the entries of this part alone
        per_task = " (its task's own best weights)" if ckpt.model.task_state_dicts and take.part in TASK_PARTS else ""
        log.info("init: %s (%s, %d tensors) from %s, run %s%s%s", take.part, _roots(model, take.part), len(values),
                 path, ckpt.recipe.identity[:8] or "without identity", per_task,
                 ", frozen" if take.part in cfg.get("init_frozen", []) else "")


def frozen_modules(cfg: Mapping, model: MultiTaskModel) -> list[nn.Module]:
    """The modules of the parts ``init_frozen`` keeps fixed for the whole run."""
    plan(cfg)
    return [m for part in cfg.get("init_frozen", []) for _, m in part_modules(model, part)]
