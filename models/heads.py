"""Per-task output heads: VA (2, tanh), EXPR (8 logits), AU (12 logits)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# Task name -> (outputs, bounded by tanh).
TASKS: dict[str, tuple[int, bool]] = {"va": (2, True), "expr": (8, False), "au": (12, False)}


def check_tasks(tasks: Iterable[str]) -> tuple[str, ...]:
    """Validate a task list, keeping the canonical order va, expr, au."""
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks {list(tasks)!r}: choose a non-empty subset of {', '.join(TASKS)}")
    return tuple(t for t in TASKS if t in tasks)


class TaskHead(nn.Module):
    """(b, t, d_in) -> (b, t, d_out): a linear layer, or an MLP when ``hidden`` > 0; tanh if bounded."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 0, dropout: float = 0.0, bounded: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden > 0:
            layers += [nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout)]
            d_in = hidden
        layers.append(nn.Linear(d_in, d_out))
        if bounded:
            layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def task_head(task: str, d_in: int, hidden: int = 0, dropout: float = 0.0) -> TaskHead:
    """The head for one task of ``TASKS``."""
    d_out, bounded = TASKS[task]
    return TaskHead(d_in, d_out, hidden, dropout, bounded)
