"""Per-task output heads: VA (2, tanh or linear), EXPR (8 logits by default), AU (12 logits)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from models.abaw import TASK_SIZES, TASKS, VA_PARTS
from models.transformer import ACTIVATIONS, check_choice

VA_OUTPUTS = ("tanh", "linear")  # linear VA is clipped to [-1, 1] only when scored and written


def check_tasks(tasks: Iterable[str]) -> tuple[str, ...]:
    """Validate a task list, keeping the canonical order va, expr, au."""
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks {list(tasks)!r}: choose a non-empty subset of {', '.join(TASKS)}")
    return tuple(t for t in TASKS if t in tasks)


def head_widths(hidden: int = 0, layers: Sequence[int] = ()) -> tuple[int, ...]:
    """Hidden widths of a head: ``layers`` when given, else one layer of ``hidden`` (0 = none)."""
    if layers and hidden:
        raise ValueError(f"give head_layers={list(layers)} or head_hidden={hidden}, not both")
    widths = tuple(int(w) for w in layers) or ((hidden,) if hidden > 0 else ())
    if any(w <= 0 for w in widths):
        raise ValueError(f"head_layers must be positive widths, got {list(widths)}")
    return widths


class TaskHead(nn.Module):
    """(b, t, d_in) -> (b, t, d_out): dropout, then Linear -> activation -> dropout per hidden width,
    then a linear output (tanh if bounded)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
        bounded: bool = False,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        check_choice("head_activation", activation, ACTIVATIONS)
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        for width in hidden:
            layers += [nn.Linear(d_in, width), ACTIVATIONS[activation](), nn.Dropout(dropout)]
            d_in = width
        self.depth = len(layers)  # layers before the output one; what they give is the head's feature
        self.feature_dim = d_in
        layers.append(nn.Linear(d_in, d_out))
        if bounded:
            layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)

    def with_feature(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output (b, t, d_out), last hidden feature (b, t, feature_dim)), for feedback to other tasks."""
        feature = self.net[: self.depth](h)
        return self.net[self.depth :](feature), feature


def task_head(
    task: str,
    d_in: int,
    hidden: int = 0,
    dropout: float = 0.0,
    *,
    layers: Sequence[int] = (),
    activation: str = "gelu",
    va_output: str = "tanh",
    expr_classes: int = TASK_SIZES["expr"],
) -> TaskHead:
    """The head for a task of ``TASKS`` or a half of VA (``valence``, ``arousal``: one output each)."""
    if va_output not in VA_OUTPUTS:
        raise ValueError(f"va_output={va_output!r}: choose one of {', '.join(VA_OUTPUTS)}")
    if expr_classes < 2:
        raise ValueError(f"expr_classes={expr_classes}: need at least 2")
    d_out = 1 if task in VA_PARTS else expr_classes if task == "expr" else TASK_SIZES[task]
    bounded = task in (*VA_PARTS, "va") and va_output == "tanh"  # valence and arousal lie in [-1, 1]
    return TaskHead(d_in, d_out, head_widths(hidden, layers), dropout, bounded, activation)


@dataclass(frozen=True)
class HeadSpec:
    """What every head of a structure shares: ``dropout``, hidden widths (``layers``, or one layer of
    ``hidden``; neither: a linear head), the ``activation`` after each, the VA output (``tanh`` or
    ``linear``) and the number of expression classes. ``spec(task, d_in)`` builds a task's head."""

    dropout: float = 0.0
    hidden: int = 0
    layers: tuple[int, ...] = ()
    activation: str = "gelu"
    va_output: str = "tanh"
    expr_classes: int = TASK_SIZES["expr"]

    # a structure's config options -> the fields they set (expr_classes comes from the data, not an option)
    OPTIONS: ClassVar[dict[str, str]] = {"dropout": "dropout", "head_hidden": "hidden", "head_layers": "layers",
                                         "head_activation": "activation", "va_output": "va_output"}

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(w) for w in self.layers))
        head_widths(self.hidden, self.layers)  # refuse both, or a width that is not positive
        check_choice("head_activation", self.activation, ACTIVATIONS)
        if self.va_output not in VA_OUTPUTS:
            raise ValueError(f"va_output={self.va_output!r}: choose one of {', '.join(VA_OUTPUTS)}")

    @classmethod
    def from_options(cls, options: dict, expr_classes: int = TASK_SIZES["expr"]) -> HeadSpec:
        return cls(**{cls.OPTIONS[k]: v for k, v in options.items() if k in cls.OPTIONS}, expr_classes=expr_classes)

    def options(self) -> dict:
        """This spec as the config options that give it."""
        return {option: getattr(self, name) for option, name in self.OPTIONS.items()}

    @property
    def widths(self) -> tuple[int, ...]:
        return head_widths(self.hidden, self.layers)

    def __call__(self, task: str, d_in: int) -> TaskHead:
        return task_head(task, d_in, self.hidden, self.dropout, layers=self.layers, activation=self.activation,
                         va_output=self.va_output, expr_classes=self.expr_classes)


DEFAULT_HEAD = HeadSpec()  # linear heads, no dropout, the defaults of every structure's head options
