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

from models.abaw import INVALID, TASK_SIZES, TASKS, VA_PARTS

VA_INVALID = INVALID["va"]
VA_LOSSES = ("ccc", "mse")  # 1 - CCC over the batch, or mean squared error
WEIGHTINGS = ("fixed", "uncertainty")  # task weights as given, or learned (Kendall et al.)
AU_LOSSES = ("bce", "asymmetric")  # binary cross-entropy on logits, or the weighted asymmetric loss
AU_OUTPUTS = ("logits", "cosine")  # what a model's AU outputs are: logits, or scores read as probabilities
# The expression loss over a batch: torch's weighted mean, sum(w_y l) / sum(w_y), or the plain mean
# of the class-weighted losses, sum(w_y l) / frames (Nguyen et al. 2022's MaskedCELoss)
EXPR_REDUCTIONS = ("weighted_mean", "mean")
VA_REDUCTIONS = ("labelled", "steps")  # MSE over labelled frames, or over every step of the batch
EPS = 1e-8


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
    """``loss(out, targets, mask) -> (total, parts)``; ``parts`` holds each term's detached loss.

    ``va``: ``"ccc"`` (1 - CCC over the batch's valid frames, pooled across sequences, averaged
    over valence and arousal) or ``"mse"``. ``weighting="uncertainty"`` learns one log-variance s
    per term (Kendall et al. 2018) and adds ``exp(-s) * L + s``; the log-variances are parameters
    of this module, so give them to the optimiser. ``task_weights`` multiply each term; naming
    ``valence`` or ``arousal`` (instead of ``va``; a None weight counts as not given) makes VA two
    terms, each dimension's loss over the frames where it is labelled.

    ``au``: ``"bce"`` on logits (``au_pos_weight`` per AU) or ``"asymmetric"``, the weighted asymmetric
    loss of Nguyen et al. 2022 (github.com/khanhnd185/MTL-ABAW4): with p the AU probability,
    ``-(y log p + (1 - y) p' log(1 - p))`` where p' is p without gradient, so confident negatives
    are pushed less; averaged over a frame's labelled AUs, then over frames. ``au_weight`` (12)
    multiplies each AU's term in either loss. ``au_output="cosine"``: the model's AU outputs are
    already probabilities (asymmetric loss only).

    ``expr_reduction``: ``"weighted_mean"`` divides the class-weighted cross-entropies by the sum
    of their frames' class weights (torch's ``cross_entropy``), ``"mean"`` by the number of frames.

    ``va_reduction`` (MSE only): ``"labelled"`` averages the squared errors over the labelled
    frames; ``"steps"`` sums them and divides by every step of the batch, b x L with L the steps to
    the end of its longest window (``targets["steps"]``, each window's steps before padding; else the
    padded length), so unlabelled, padded and ended steps count as zeros, as the ABAW4 winner's
    masked MSE does.
    """

    def __init__(
        self,
        va: str = "ccc",
        expr_class_weights: Sequence[float] | torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        au_pos_weight: Sequence[float] | torch.Tensor | None = None,
        weighting: str = "fixed",
        task_weights: Mapping[str, float | None] | None = None,
        au: str = "bce",
        au_output: str = "logits",
        au_weight: Sequence[float] | torch.Tensor | None = None,
        expr_classes: int = TASK_SIZES["expr"],
        expr_reduction: str = "weighted_mean",
        va_reduction: str = "labelled",
    ) -> None:
        super().__init__()
        for option, value, choices in (
            ("va loss", va, VA_LOSSES),
            ("weighting", weighting, WEIGHTINGS),
            ("au loss", au, AU_LOSSES),
            ("au_output", au_output, AU_OUTPUTS),
            ("expr_reduction", expr_reduction, EXPR_REDUCTIONS),
            ("va_reduction", va_reduction, VA_REDUCTIONS),
        ):
            if value not in choices:
                raise ValueError(f"{option} {value!r}: choose one of {', '.join(choices)}")
        if va_reduction == "steps" and va != "mse":
            raise ValueError(f"va_reduction 'steps' is for the MSE; the {va!r} loss is over labelled frames")
        if au == "bce" and au_output != "logits":
            raise ValueError(f"au loss 'bce' needs logits; with au_output={au_output!r} use au='asymmetric'")
        if au == "asymmetric" and au_pos_weight is not None:
            raise ValueError("au_pos_weight is for au='bce'; the asymmetric loss takes au_weight")
        weights = {k: float(v) for k, v in (task_weights or {}).items() if v is not None}
        unknown = set(weights) - {*TASKS, *VA_PARTS}
        if unknown:
            raise ValueError(
                f"task_weights for unknown tasks {sorted(unknown)}; tasks are {', '.join((*TASKS, *VA_PARTS))}"
            )
        split_va = bool(set(weights) & set(VA_PARTS))
        if split_va and "va" in weights:
            raise ValueError(
                f"task_weights names va and {', '.join(sorted(set(weights) & set(VA_PARTS)))}: "
                "weight VA as a whole or valence and arousal apart, not both"
            )
        self.terms = (*(VA_PARTS if split_va else ("va",)), "expr", "au")
        self.va, self.weighting, self.label_smoothing = va, weighting, label_smoothing
        self.au, self.au_output, self.expr_reduction = au, au_output, expr_reduction
        self.va_reduction = va_reduction
        self.task_weights = {t: weights.get(t, 1.0) for t in self.terms}
        self.register_buffer("expr_class_weights", _vector(expr_class_weights, expr_classes, "expr_class_weights"))
        self.register_buffer("au_pos_weight", _vector(au_pos_weight, TASK_SIZES["au"], "au_pos_weight"))
        self.register_buffer("au_weight", _vector(au_weight, TASK_SIZES["au"], "au_weight"))
        self.log_vars = (
            nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in self.terms})
            if weighting == "uncertainty"
            else None
        )

    def va_loss(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, steps: int | None = None
    ) -> tuple[torch.Tensor, int]:
        """pred, target (b, t, k) (k = 2, or 1 for one dimension), mask (b, t) -> (loss, number of
        frames with all k labelled); ``steps``: the batch's steps per window for ``va_reduction="steps"``."""
        valid = mask & (target != VA_INVALID).all(-1) & torch.isfinite(target).all(-1)
        n = int(valid.sum())
        if n == 0:
            return pred.sum() * 0.0, 0
        p, y = pred[valid], target[valid].to(pred.dtype)
        if self.va == "mse" and self.va_reduction == "steps":
            every = pred.shape[0] * (pred.shape[1] if steps is None else steps) * pred.shape[2]
            return ((p - y) ** 2).sum() / every, n
        if self.va == "mse":
            return F.mse_loss(p, y), n
        return 1.0 - ccc(p, y).mean(), n

    def expr_loss(
        self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """logits (b, t, expr_classes), target (b, t) -> (cross-entropy over valid frames, their number)."""
        valid = mask & (target >= 0)
        n = int(valid.sum())
        if n == 0:
            return logits.sum() * 0.0, 0
        loss = F.cross_entropy(
            logits[valid],
            target[valid].long(),
            weight=self.expr_class_weights,
            label_smoothing=self.label_smoothing,
            reduction="mean" if self.expr_reduction == "weighted_mean" else "none",
        )
        return loss.mean(), n

    def au_loss(
        self, scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """scores, target (b, t, 12) -> (loss, number of valid (frame, AU) pairs); BCE averages over
        those pairs, the asymmetric loss over each frame's labelled AUs and then over frames."""
        valid = mask[..., None] & (target >= 0)
        n = int(valid.sum())
        if n == 0:
            return scores.sum() * 0.0, 0
        y = target.clamp(min=0).to(scores.dtype)
        if self.au == "bce":
            each = F.binary_cross_entropy_with_logits(
                scores, y, weight=self.au_weight, pos_weight=self.au_pos_weight, reduction="none"
            )
            return each[valid].mean(), n
        p = scores.sigmoid() if self.au_output == "logits" else scores
        each = -(y * torch.log(p.clamp(min=EPS)) + (1 - y) * p.detach() * torch.log((1 - p).clamp(min=EPS)))
        if self.au_weight is not None:
            each = each * self.au_weight
        labelled = valid.sum(-1)
        per_frame = torch.where(valid, each, 0.0).sum(-1) / labelled.clamp(min=1)
        return per_frame[labelled > 0].mean(), n

    def forward(
        self, out: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """out/targets {task: (b, t, ...)}, mask (b, t) bool -> (total with grad, {term: detached loss})."""
        mask = mask.bool()
        total = sum(o.sum() * 0.0 for o in out.values())
        parts: dict[str, torch.Tensor] = {}
        steps = int(targets["steps"].max()) if torch.is_tensor(targets.get("steps")) else None
        task_loss = {"va": lambda p, y, m: self.va_loss(p, y, m, steps), "expr": self.expr_loss, "au": self.au_loss}
        for term in self.terms:
            task = "va" if term in VA_PARTS else term
            if task not in out or task not in targets:
                continue
            pred, target = out[task], targets[task].to(out[task].device)
            if term in VA_PARTS:
                k = VA_PARTS.index(term)
                pred, target = pred[..., k : k + 1], target[..., k : k + 1]
            loss, n = task_loss[task](pred, target, mask)
            parts[term] = loss.detach()
            if n == 0:
                total = total + loss
                continue
            if self.log_vars is not None:
                s = self.log_vars[term]
                loss = torch.exp(-s) * loss + s
            total = total + self.task_weights[term] * loss
        return total, parts
