"""Multi-task models over a temporal encoder, one class per task structure, picked by name.

``MultiTaskModel(d_in, encoder={"name": "gru", ...}, tasks=("va", "expr", "au"), structure=...)``
maps features (b, t, d_in) and a mask (b, t) to ``{"va": (b, t, 2), "expr": (b, t, 8),
"au": (b, t, 12)}`` for the enabled tasks. ``MultiTaskModel(**model.args)`` rebuilds it.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import torch
from torch import nn

from models.cross_task import CrossTaskModel
from models.encoders import encoder_from
from models.heads import TaskHead, check_tasks, task_head


class SharedModel(nn.Module):
    """One encoder, one head per task (a uni-task model is ``tasks=("expr",)``)."""

    def __init__(
        self, d_in: int, encoder: dict, tasks: tuple[str, ...], head_hidden: int = 0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.encoder = encoder_from(encoder, d_in)
        self.heads = nn.ModuleDict(
            {t: task_head(t, self.encoder.out_dim, head_hidden, dropout) for t in tasks}
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encoder(x, mask)
        return {t: head(h) for t, head in self.heads.items()}


class TaskSpecificModel(nn.Module):
    """Shared bottom encoder, then a small encoder of the same kind (``task_layers`` deep) per task."""

    def __init__(
        self,
        d_in: int,
        encoder: dict,
        tasks: tuple[str, ...],
        head_hidden: int = 0,
        dropout: float = 0.0,
        task_layers: int = 1,
    ) -> None:
        super().__init__()
        self.bottom = encoder_from(encoder, d_in)
        d = self.bottom.out_dim
        self.tops = nn.ModuleDict({t: encoder_from(encoder, d, layers=task_layers) for t in tasks})
        self.heads = nn.ModuleDict(
            {t: task_head(t, self.tops[t].out_dim, head_hidden, dropout) for t in tasks}
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.bottom(x, mask)
        return {t: self.heads[t](top(h, mask)) for t, top in self.tops.items()}


class FeedbackModel(nn.Module):
    """Task-specific branches with valence and arousal apart; arousal also reads the detached
    hidden states of the valence and (if enabled) AU branches, which help it without letting
    the arousal loss pull those branches. Needs the ``va`` task."""

    def __init__(
        self,
        d_in: int,
        encoder: dict,
        tasks: tuple[str, ...],
        head_hidden: int = 0,
        dropout: float = 0.0,
        task_layers: int = 1,
    ) -> None:
        super().__init__()
        if "va" not in tasks:
            raise ValueError(f"structure 'feedback' needs the va task; tasks={list(tasks)}")
        self.tasks = tasks
        self.bottom = encoder_from(encoder, d_in)
        d = self.bottom.out_dim
        names = ["valence"] + [t for t in tasks if t != "va"]
        self.branches = nn.ModuleDict({n: encoder_from(encoder, d, layers=task_layers) for n in names})
        fed = sum(self.branches[n].out_dim for n in ("valence", "au") if n in self.branches)
        self.branches["arousal"] = encoder_from(encoder, d + fed, layers=task_layers)
        self.heads = nn.ModuleDict(
            {
                n: TaskHead(b.out_dim, 1, head_hidden, dropout, bounded=True)
                if n in ("valence", "arousal")
                else task_head(n, b.out_dim, head_hidden, dropout)
                for n, b in self.branches.items()
            }
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.bottom(x, mask)
        z = {n: b(h, mask) for n, b in self.branches.items() if n != "arousal"}
        fed = [z[n].detach() for n in ("valence", "au") if n in z]
        z["arousal"] = self.branches["arousal"](torch.cat([h, *fed], dim=-1), mask)
        out = {n: self.heads[n](z[n]) for n in z}
        out["va"] = torch.cat([out.pop("valence"), out.pop("arousal")], dim=-1)
        return {t: out[t] for t in self.tasks}


STRUCTURES: dict[str, type[nn.Module]] = {
    "shared": SharedModel,
    "task_specific": TaskSpecificModel,
    "feedback": FeedbackModel,
    "cross_attention": CrossTaskModel,
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


class MultiTaskModel(nn.Module):
    """A task structure from ``STRUCTURES`` with heads for ``tasks``.

    Options used only by some structures: ``task_layers`` (task_specific, feedback),
    ``au_dim``, ``au_graph`` (None | "learned" | 12x12 matrix), ``graph_layers``, ``attn_heads``
    (cross_attention). ``dropout`` and ``head_hidden`` (0 = linear heads) shape every head.
    """

    def __init__(
        self,
        d_in: int,
        encoder: dict,
        tasks: tuple[str, ...] | list[str] = ("va", "expr", "au"),
        structure: str = "shared",
        dropout: float = 0.0,
        head_hidden: int = 0,
        task_layers: int = 1,
        au_dim: int = 64,
        au_graph: str | list | None = None,
        graph_layers: int = 1,
        attn_heads: int = 4,
    ) -> None:
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"unknown structure {structure!r}; choose one of {', '.join(STRUCTURES)}")
        tasks = check_tasks(tasks)
        options = dict(
            head_hidden=head_hidden,
            dropout=dropout,
            task_layers=task_layers,
            au_dim=au_dim,
            au_graph=au_graph,
            graph_layers=graph_layers,
            attn_heads=attn_heads,
        )
        self.args = _plain(
            dict(d_in=d_in, encoder=dict(encoder), tasks=tasks, structure=structure, **options)
        )
        cls = STRUCTURES[structure]
        used = inspect.signature(cls).parameters
        self.net = cls(d_in, dict(encoder), tasks, **{k: v for k, v in options.items() if k in used})
        self.tasks = tasks

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (b, t, d_in), mask (b, t) bool True = valid -> {task: (b, t, outputs)}."""
        return self.net(x, mask)
