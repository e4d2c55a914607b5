"""Multi-task loss over ABAW labels with their invalid sentinels and a validity mask.

Targets: ``va`` (b, t, 2) float with -5 invalid, ``expr`` (b, t) int with -1 invalid, ``au``
(b, t, 12) int/float with -1 invalid; ``mask`` (b, t) bool is False at padding and missing faces.
A task absent from ``targets`` or without one valid label in the batch adds a zero that still has
a gradient, so windows labelled for only some tasks train only those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.heads import TASKS

VA_INVALID = -5.0
VA_LOSSES = ("ccc", "mse")  # 1 - CCC over the batch, or mean squared error
WEIGHTINGS = ("fixed", "uncertainty")  # task weights as given, or learned (Kendall et al.)


def ccc(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Concordance correlation per column over all rows: (n, k), (n, k) -> (k,).

    Uses population (biased) moments, as the ABAW evaluation does.
    """
    mp, mt = pred.mean(0), target.mean(0)
    vp, vt = pred.var(0, unbiased=False), target.var(0, unbiased=False)
    cov = ((pred - mp) * (target - mt)).mean(0)
    return 2 * cov / (vp + vt + (mp - mt) ** 2 + eps)


def _vector(values: Sequence[float] | torch.Tensor | None, n: int, what: str) -> torch.Tensor | None:
    if values is None:
        return None
    v = torch.as_tensor(values, dtype=torch.float32).flatten()
    if v.numel() != n or not torch.isfinite(v).all() or (v < 0).any():
        raise ValueError(f"{what} needs {n} finite non-negative values, got {list(v.tolist())}")
    return v


class MultiTaskLoss(nn.Module):
    """``loss(out, targets, mask) -> (total, parts)``; ``parts`` holds each task's detached loss.

    ``va``: ``"ccc"`` (1 - CCC over the batch's valid frames, pooled across sequences, averaged
    over valence and arousal) or ``"mse"``. ``weighting="uncertainty"`` learns one log-variance s
    per task (Kendall et al. 2018) and adds ``exp(-s) * L + s``; the log-variances are parameters
    of this module, so give them to the optimiser. ``task_weights`` multiply each task's term.
    """

    def __init__(
        self,
        va: str = "ccc",
        expr_class_weights: Sequence[float] | torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        au_pos_weight: Sequence[float] | torch.Tensor | None = None,
        weighting: str = "fixed",
        task_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if va not in VA_LOSSES:
            raise ValueError(f"va loss {va!r}: choose one of {', '.join(VA_LOSSES)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
        unknown = set(task_weights or {}) - set(TASKS)
        if unknown:
            raise ValueError(
                f"task_weights for unknown tasks {sorted(unknown)}; tasks are {', '.join(TASKS)}"
            )
        self.va, self.weighting, self.label_smoothing = va, weighting, label_smoothing
        self.task_weights = {t: float((task_weights or {}).get(t, 1.0)) for t in TASKS}
        self.register_buffer(
            "expr_class_weights", _vector(expr_class_weights, TASKS["expr"][0], "expr_class_weights")
        )
        self.register_buffer("au_pos_weight", _vector(au_pos_weight, TASKS["au"][0], "au_pos_weight"))
        self.log_vars = (
            nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in TASKS})
            if weighting == "uncertainty"
            else None
        )

    def va_loss(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """pred, target (b, t, 2), mask (b, t) -> (loss, number of valid frames)."""
        valid = mask & (target != VA_INVALID).all(-1) & torch.isfinite(target).all(-1)
        n = int(valid.sum())
        if n == 0:
            return pred.sum() * 0.0, 0
        p, y = pred[valid], target[valid].to(pred.dtype)
        if self.va == "mse":
            return F.mse_loss(p, y), n
        return 1.0 - ccc(p, y).mean(), n

    def expr_loss(
        self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """logits (b, t, 8), target (b, t) -> (cross-entropy over valid frames, their number)."""
        valid = mask & (target >= 0)
        n = int(valid.sum())
        if n == 0:
            return logits.sum() * 0.0, 0
        loss = F.cross_entropy(
            logits[valid],
            target[valid].long(),
            weight=self.expr_class_weights,
            label_smoothing=self.label_smoothing,
        )
        return loss, n

    def au_loss(
        self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """logits, target (b, t, 12) -> (BCE averaged over valid (frame, AU) pairs, their number)."""
        valid = mask[..., None] & (target >= 0)
        n = int(valid.sum())
        if n == 0:
            return logits.sum() * 0.0, 0
        each = F.binary_cross_entropy_with_logits(
            logits, target.clamp(min=0).to(logits.dtype), pos_weight=self.au_pos_weight, reduction="none"
        )
        return each[valid].mean(), n

    def forward(
        self, out: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """out/targets {task: (b, t, ...)}, mask (b, t) bool -> (total with grad, {task: detached loss})."""
        mask = mask.bool()
        total = sum(o.sum() * 0.0 for o in out.values())
        parts: dict[str, torch.Tensor] = {}
        task_loss = {"va": self.va_loss, "expr": self.expr_loss, "au": self.au_loss}
        for task in TASKS:
            if task not in out or task not in targets:
                continue
            loss, n = task_loss[task](out[task], targets[task].to(out[task].device), mask)
            parts[task] = loss.detach()
            if n == 0:
                total = total + loss
                continue
            if self.log_vars is not None:
                s = self.log_vars[task]
                loss = torch.exp(-s) * loss + s
            total = total + self.task_weights[task] * loss
        return total, parts
