"""The checkpoint format, written down once: what a training run saves and everything that reads it.

A checkpoint is a ``torch.save`` of plain data and tensors only, read with ``weights_only=True``,
so opening one never runs code. It holds four groups (:class:`Checkpoint`):

- ``model``: the model's arguments and weights (``MultiTaskModel(**args)`` rebuilds it), and with
  ``selection: per_task`` each task's own best weights;
- ``recipe``: how and on what it was trained: the resolved training config, the run's identity,
  the extractors with what their features were made of, the faces/features stage configs and the
  expression classes;
- ``inference``: what prediction applies around the model: the feature normalisation, the
  window and stride, and the AU thresholds and VA smoothing chosen on validation;
- ``resume`` (``last.pt``, and ``best.pt`` while a run trains): the loop's state at the end of an
  epoch, to go on from there.

On disk the groups are dicts under their names, beside ``format``. Checkpoints written before the
groups existed (every key at the top level) are read as well.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from models import MultiTaskModel
from models.abaw import EXPRESSIONS, VA_PARTS
from pipeline.atomic import atomic_output

FORMAT = 2  # 1: the flat layout of every key at the top level


class UnsafeCheckpoint(ValueError):
    """A checkpoint that needs code beyond tensors and plain data to load."""


_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype)


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Refuse anything but tensors and plain data (str, numbers, None, lists, tuples, dicts with
    plain keys), so every checkpoint loads with ``torch.load(weights_only=True)``."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):  # OrderedDict included: state dicts are plain
        for key, value in obj.items():
            if not isinstance(key, str | int | float | bool | type(None)):
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} is not plain data")
            check_plain(value, f"{where}.{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
    else:
        raise TypeError(f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not a tensor or plain "
                        "data; convert it (numpy arrays with .tolist(), configs with .to_dict())")


@dataclass
class ModelPart:
    """The network: ``MultiTaskModel(**args)`` with ``state_dict``; ``task_state_dicts`` holds each
    task's weights from its own best epoch (``selection: per_task``)."""

    args: dict
    state_dict: dict
    task_state_dicts: dict[str, dict] | None = None

    @classmethod
    def of(cls, model: torch.nn.Module, task_state_dicts: dict[str, dict] | None = None) -> ModelPart:
        model = getattr(model, "module", model)  # unwrap DDP
        return cls(model.args, model.state_dict(), task_state_dicts)


@dataclass
class Recipe:
    """How and on what the model was trained."""

    config: dict = field(default_factory=dict)  # the resolved training config
    identity: str = ""  # the run's identity (its folder's hash in full)
    extractors: list[str] = field(default_factory=list)
    feature_attrs: list[dict] = field(default_factory=list)  # per extractor: weights' SHA-256 and file, ...
    stage_configs: dict = field(default_factory=dict)  # "faces", "features:<name>": the stage configs
    expressions: list[str] = field(default_factory=lambda: list(EXPRESSIONS))


@dataclass
class Inference:
    """What prediction applies around the model."""

    normaliser: dict | None = None  # {"mean", "std"} of the training split's features
    window: int = 64
    eval_stride: int = 32
    eval_windows: str = "overlapping"  # overlapping | consecutive
    au_thresholds: list[float] | None = None  # chosen on validation; None: 0.5
    va_smoothing: int | list[int] = 1  # moving-average window(s), [valence, arousal] when apart
    va_smoothing_edges: str = "pad"  # pad | truncate: the average at a video's ends


@dataclass
class Resume:
    """The training loop's state after ``epoch``: enough to go on as if never stopped."""

    epoch: int
    history: list[dict]  # one record per epoch so far, as metrics.jsonl
    best: float  # the stage's best selection score
    stale: int  # epochs since it improved
    task_best: dict[str, float]  # per-task selection: each task's best term
    task_epochs: dict[str, int]  # ... and its epoch
    loss_state: dict
    optimizer: dict
    scheduler: dict


@dataclass
class Checkpoint:
    model: ModelPart
    recipe: Recipe = field(default_factory=Recipe)
    inference: Inference = field(default_factory=Inference)
    resume: Resume | None = None

    def to_state(self) -> dict:
        """The plain nested dict that is saved."""
        state = {"format": FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}
        return {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in state.items()}

    @classmethod
    def from_state(cls, state: dict) -> Checkpoint:
        """Read the saved dict: the grouped layout, or the flat one of format 1."""
        if state.get("format", 1) == 1:
            state = _grouped(state)
        elif state["format"] != FORMAT:
            raise ValueError(f"checkpoint format {state['format']} is newer than this code reads ({FORMAT})")
        return cls(ModelPart(**state["model"]), Recipe(**state.get("recipe") or {}),
                   Inference(**state.get("inference") or {}),
                   Resume(**state["resume"]) if state.get("resume") else None)


def _grouped(flat: dict) -> dict:
    """A format-1 checkpoint's keys sorted into the groups, defaults for keys added later."""
    groups = {"model": {"args": flat["model_args"], "state_dict": flat["state_dict"],
                        "task_state_dicts": flat.get("task_state_dicts")}}
    for name, cls in (("recipe", Recipe), ("inference", Inference)):
        groups[name] = {f.name: flat[f.name] for f in fields(cls) if f.name in flat}
    if "optimizer" in flat:
        groups["resume"] = {f.name: flat[f.name] for f in fields(Resume)}
    return groups


def save(path: str | Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` atomically; anything that is not plain data is refused, naming its key."""
    state = ckpt.to_state()
    check_plain(state)
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def read(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """The contents of a checkpoint, loaded as tensors and plain data only: unpickling never runs
    code, and a file that would need it is refused with :class:`UnsafeCheckpoint`. A file that is
    not a checkpoint of this project is a ``ValueError`` naming it."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # code it would run, or a file that is truncated or no torch file at all
        needs = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if needs:
            raise UnsafeCheckpoint(f"{path}: refused: it holds objects that would run code when loaded "
                                   f"({needs.group(1)}); a checkpoint of this project holds tensors and plain "
                                   "data only") from None
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise ValueError(f"{path}: not a usable checkpoint of this project ({type(e).__name__}: {first})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a usable checkpoint of this project (holds a {type(state).__name__})")
    try:
        return Checkpoint.from_state(state)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a usable checkpoint of this project ({type(e).__name__}: {e})") from None


class PerTaskModel(torch.nn.Module):
    """Each task's output from the weights of the epoch that was best for that task (a checkpoint
    trained with ``selection: per_task``), behind the interface of one ``MultiTaskModel``; with
    ``valence`` and ``arousal`` weights (``selection_va: apart``) each VA dimension from its own."""

    def __init__(self, args: dict, states: dict[str, dict]) -> None:
        super().__init__()
        self.models = torch.nn.ModuleDict()
        for task, state in states.items():
            self.models[task] = MultiTaskModel.from_args(args)
            self.models[task].load_state_dict(state)
        first = next(iter(self.models.values()))
        self.args, self.tasks, self.au_output = first.args, first.tasks, first.au_output

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {task: model(x, mask)[task] for task, model in self.models.items() if task not in VA_PARTS}
        if "valence" in self.models:
            out["va"] = torch.cat([self.models[d](x, mask)["va"][..., k : k + 1] for k, d in enumerate(VA_PARTS)], -1)
        return out

    def probabilities(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return next(iter(self.models.values())).probabilities(out)


def build(part: ModelPart) -> torch.nn.Module:
    """The network of ``part``: a ``MultiTaskModel``, or a :class:`PerTaskModel` when it holds each
    task's own best weights."""
    model = MultiTaskModel.from_args(part.args)
    model.load_state_dict(part.state_dict)
    if part.task_state_dicts:
        split = "va" in model.tasks and any(d in part.task_state_dicts for d in VA_PARTS)
        keys = [k for t in model.tasks for k in (VA_PARTS if t == "va" and split else (t,))]
        states = {k: part.task_state_dicts.get(k, part.state_dict) for k in keys}
        model = PerTaskModel(part.args, states)
    return model


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Checkpoint]:
    """Rebuild the model of a checkpoint, in eval mode on ``device``; returns (model, contents)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    ckpt = read(path, device)
    try:
        model = build(ckpt.model)
    except Exception as e:
        raise ValueError(f"{path}: not a usable checkpoint of this project ({type(e).__name__}: {e})") from e
    return model.to(device).eval(), ckpt
