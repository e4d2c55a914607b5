"""The ``none`` temporal encoder: per-frame models, with no temporal context."""

from __future__ import annotations

import torch
from torch import nn


class IdentityEncoder(nn.Module):
    """(b, t, d_in) -> (b, t, d_in): each frame's features as they are, zero at invalid steps, so the
    heads (or task branches) alone make a per-frame model."""

    def __init__(self, d_in: int) -> None:
        super().__init__()
        self.out_dim = d_in

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (b, t, d_in), mask (b, t) bool True = valid -> (b, t, d_in)."""
        return torch.where(mask.bool()[..., None], x, 0.0)
