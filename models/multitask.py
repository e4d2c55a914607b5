"""Multi-task models over a temporal encoder, one class per task structure, picked by name.

``MultiTaskModel(d_in, encoder={"name": "gru", ...}, tasks=("va", "expr", "au"), structure=...,
**options)`` maps features (b, t, d_in) and a mask (b, t) to ``{"va": (b, t, 2), "expr": (b, t,
expr_classes), "au": (b, t, 12)}`` for the enabled tasks. Each structure owns its options (the
keyword arguments of its class, the heads' options among them where it takes a :class:`HeadSpec`),
listed by :func:`structure_options`; an option of another structure is refused.
``MultiTaskModel.from_args(model.args)`` rebuilds a model.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from models.abaw import TASK_SIZES, VA_PARTS
from models.amtl import AMTLModel
from models.cross_task import CrossTaskModel
from models.encoders import encoder_from, encoder_options
from models.heads import DEFAULT_HEAD, HeadSpec, check_tasks


def task_branch(encoder: dict, d_in: int, layers: int, head_dim: int = 0, projection: bool = True) -> nn.Module:
    """A task's encoder of the bottom's kind, ``layers`` deep, on a ``d_in``-wide input.

    ``head_dim`` > 0 (heads = width // head_dim) and ``projection=False`` (keep the input width) apply
    where the kind has those options (the transformer); other kinds take what they have, so one model
    config serves every encoder.
    """
    override = {"layers": layers}
    if head_dim:
        override["head_dim"] = head_dim
    if not projection:
        override["input_projection"] = False
    known = encoder_options(encoder["name"]) if "name" in encoder else set(override)
    return encoder_from(encoder, d_in, **{k: v for k, v in override.items() if k in known})


class SharedModel(nn.Module):
    """One encoder, one head per task (a uni-task model is ``tasks=("expr",)``), or per VA half
    with ``split_va``."""

    def __init__(
        self, d_in: int, encoder: dict, tasks: tuple[str, ...], head: HeadSpec = DEFAULT_HEAD, split_va: bool = False
    ) -> None:
        super().__init__()
        self.tasks = tasks
        self.encoder = encoder_from(encoder, d_in)
        self.heads = nn.ModuleDict({n: head(n, self.encoder.out_dim) for n in branch_names(tasks, split_va)})

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encoder(x, mask)
        return join_va({n: head(h) for n, head in self.heads.items()}, self.tasks)


def branch_names(tasks: tuple[str, ...], split_va: bool) -> list[str]:
    """One branch per task, or per VA half when ``split_va``: ``[valence, arousal, expr, au]``."""
    return [n for t in tasks for n in (VA_PARTS if t == "va" and split_va else (t,))]


def join_va(out: dict[str, torch.Tensor], tasks: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Branch outputs -> task outputs, the VA halves (b, t, 1) joined into ``va`` (b, t, 2)."""
    if "valence" in out:
        out["va"] = torch.cat([out.pop("valence"), out.pop("arousal")], dim=-1)
    return {t: out[t] for t in tasks}


class TaskSpecificModel(nn.Module):
    """Shared bottom encoder, then a small encoder of the same kind (``task_layers`` deep) per task,
    or per VA half with ``split_va``; ``task_head_dim`` and ``task_projection`` as in ``task_branch``."""

    def __init__(
        self,
        d_in: int,
        encoder: dict,
        tasks: tuple[str, ...],
        head: HeadSpec = DEFAULT_HEAD,
        task_layers: int = 1,
        task_head_dim: int = 0,
        task_projection: bool = True,
        split_va: bool = False,
    ) -> None:
        super().__init__()
        self.tasks = tasks
        self.bottom = encoder_from(encoder, d_in)
        d = self.bottom.out_dim
        self.tops = nn.ModuleDict(
            {
                n: task_branch(encoder, d, task_layers, task_head_dim, task_projection)
                for n in branch_names(tasks, split_va)
            }
        )
        self.heads = nn.ModuleDict({n: head(n, top.out_dim) for n, top in self.tops.items()})

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.bottom(x, mask)
        return join_va({n: self.heads[n](top(h, mask)) for n, top in self.tops.items()}, self.tasks)


FEEDBACK_TASKS = (*VA_PARTS, "expr", "au")  # names in feedback_sources / feedback_targets
FEEDBACK_FROM = ("branch", "head")  # what a source feeds: its branch output or its head's last hidden layer


class FeedbackModel(nn.Module):
    """Task-specific branches (as ``TaskSpecificModel``) where each of ``feedback_targets`` also reads
    the detached features of ``feedback_sources``: their branch outputs, or with
    ``feedback_from="head"`` their heads' last hidden layers. Sources help the targets without the
    targets' losses pulling them. Sources run first; a source whose task is not enabled is left out.
    Valence and arousal get a branch each when either is named or ``split_va``.
    """

    def __init__(
        self,
        d_in: int,
        encoder: dict,
        tasks: tuple[str, ...],
        head: HeadSpec = DEFAULT_HEAD,
        task_layers: int = 1,
        task_head_dim: int = 0,
        task_projection: bool = True,
        split_va: bool = False,
        feedback_sources: Sequence[str] = ("valence", "au"),
        feedback_targets: Sequence[str] = ("arousal",),
        feedback_from: str = "branch",
    ) -> None:
        super().__init__()
        if feedback_from not in FEEDBACK_FROM:
            raise ValueError(f"feedback_from={feedback_from!r}: choose one of {', '.join(FEEDBACK_FROM)}")
        for option, names in (("feedback_sources", feedback_sources), ("feedback_targets", feedback_targets)):
            unknown = [n for n in names if n not in FEEDBACK_TASKS]
            if unknown:
                raise ValueError(f"{option} {unknown}: choose from {', '.join(FEEDBACK_TASKS)}")
        if not feedback_targets or set(feedback_sources) & set(feedback_targets):
            raise ValueError(
                f"feedback_targets {list(feedback_targets)} must be non-empty and apart from "
                f"feedback_sources {list(feedback_sources)}"
            )
        split_va = split_va or any(n in VA_PARTS for n in (*feedback_sources, *feedback_targets))
        names = branch_names(tasks, split_va)
        for n in feedback_targets:
            if n not in names:
                task = "va" if n in VA_PARTS else n
                raise ValueError(
                    f"structure 'feedback' needs the {task} task (feedback target {n!r}); tasks={list(tasks)}"
                )
        self.tasks, self.feed_heads = tasks, feedback_from == "head"
        self.sources = [n for n in feedback_sources if n in names]
        self.targets = list(feedback_targets)
        self.bottom = encoder_from(encoder, d_in)
        d = self.bottom.out_dim
        self.branches = nn.ModuleDict(
            {
                n: task_branch(encoder, d, task_layers, task_head_dim, task_projection)
                for n in names
                if n not in self.targets
            }
        )
        widths = head.widths
        fed = sum(
            widths[-1] if self.feed_heads and widths else self.branches[n].out_dim for n in self.sources
        )
        for n in self.targets:
            self.branches[n] = task_branch(encoder, d + fed, task_layers, task_head_dim, task_projection)
        self.heads = nn.ModuleDict({n: head(n, b.out_dim) for n, b in self.branches.items()})

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.bottom(x, mask)
        out, fed = {}, {}
        for n, branch in self.branches.items():  # built sources and others first, targets last
            inp = torch.cat([h, *(fed[s].detach() for s in self.sources)], dim=-1) if n in self.targets else h
            z = branch(inp, mask)
            out[n], feature = self.heads[n].with_feature(z)
            fed[n] = feature if self.feed_heads else z
        return join_va(out, self.tasks)


STRUCTURES: dict[str, type[nn.Module]] = {
    "shared": SharedModel,
    "task_specific": TaskSpecificModel,
    "feedback": FeedbackModel,
    "cross_attention": CrossTaskModel,
    "amtl": AMTLModel,
}


def _plain(value):
    """Arguments as JSON-ready builtins, so checkpoints and configs can hold them."""
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


CORE = ("d_in", "encoder", "tasks", "structure", "expr_classes")  # what every model has besides its options


def structure_options(structure: str) -> dict:
    """The options of a structure with their defaults: its class's keyword arguments, a
    :class:`HeadSpec` given as its options (``dropout``, ``head_hidden``, ...)."""
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose one of {', '.join(STRUCTURES)}")
    options = {}
    for name, p in list(inspect.signature(STRUCTURES[structure]).parameters.items())[3:]:  # after d_in, encoder, tasks
        if name == "head":
            options.update(HeadSpec().options())
        elif name != "expr_classes":
            options[name] = _plain(p.default)
    return options


class MultiTaskModel(nn.Module):
    """A task structure from ``STRUCTURES`` with heads for ``tasks``; ``options`` are the
    structure's own (:func:`structure_options`), unknown ones refused. ``expr_classes`` reaches
    every expression head. ``args`` holds the core arguments and every option of the structure,
    so ``from_args(args)`` rebuilds the same model.
    """

    def __init__(
        self,
        d_in: int,
        encoder: dict,
        tasks: tuple[str, ...] | list[str] = ("va", "expr", "au"),
        structure: str = "shared",
        expr_classes: int = TASK_SIZES["expr"],
        **options,
    ) -> None:
        super().__init__()
        known = structure_options(structure)
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"structure {structure!r} has no option {', '.join(unknown)}; "
                             f"its options: {', '.join(known)}")
        tasks = check_tasks(tasks)
        options = {**known, **options}
        self.args = _plain(dict(d_in=d_in, encoder=dict(encoder), tasks=tasks, structure=structure,
                                expr_classes=expr_classes, **options))
        cls = STRUCTURES[structure]
        params = inspect.signature(cls).parameters
        kwargs = {k: v for k, v in options.items() if k in params}
        if "head" in params:
            kwargs["head"] = HeadSpec.from_options(options, expr_classes)
        elif "expr_classes" in params:
            kwargs["expr_classes"] = expr_classes
        self.net = cls(d_in, dict(encoder), tasks, **kwargs)
        self.tasks = tasks
        self.au_output: str = getattr(self.net, "au_output", "logits")

    @classmethod
    def from_args(cls, args: dict) -> MultiTaskModel:
        """The model whose ``args`` these are. Arguments written before structures owned their
        options hold every structure's options; those of other structures never took effect and
        are left out."""
        structure = args.get("structure", "shared")
        known = structure_options(structure)
        return cls(**{k: v for k, v in args.items() if k in CORE or k in known})

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (b, t, d_in), mask (b, t) bool True = valid -> {task: (b, t, outputs)}."""
        return self.net(x, mask)
    def probabilities(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw outputs -> what is scored and written: ``va`` clipped to [-1, 1] (a linear VA head is
        trained unclipped), ``expr`` class probabilities, ``au`` probabilities (sigmoid of logits, or
        cosine scores clipped to [0, 1])."""
        scores = {}
        for task, value in out.items():
            if task == "va":
                value = value.clamp(-1.0, 1.0)
            elif task == "expr":
                value = value.softmax(-1)
            elif task == "au":
                value = value.sigmoid() if self.au_output == "logits" else value.clamp(0.0, 1.0)
            scores[task] = value
        return scores
