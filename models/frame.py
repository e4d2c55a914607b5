"""The ``frame`` encoder: a per-frame MLP, the no-context baseline with a temporal encoder's capacity."""

from __future__ import annotations

import torch
from torch import nn

from models.transformer import ACTIVATIONS, check_choice


class FrameEncoder(nn.Module):
    """(b, t, d_in) -> (b, t, hidden): ``layers`` of Linear -> LayerNorm -> activation -> dropout,
    each frame alone, zero at invalid steps.

    Unlike ``none``, it has about as many parameters as the temporal encoders, so comparing it with
    them isolates what temporal context adds rather than what capacity adds.
    """

    def __init__(
        self, d_in: int, hidden: int = 1024, layers: int = 3, dropout: float = 0.1, activation: str = "gelu"
    ) -> None:
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        if layers < 1:
            raise ValueError(f"layers={layers}: the frame encoder needs at least one layer")
        self.net = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Linear(d_in if i == 0 else hidden, hidden),
                    nn.LayerNorm(hidden),
                    ACTIVATIONS[activation](),
                    nn.Dropout(dropout),
                )
                for i in range(layers)
            )
        )
        self.out_dim = hidden

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (b, t, d_in), mask (b, t) bool True = valid -> (b, t, hidden)."""
        valid = mask.bool()[..., None]
        # Zeroed first: a NaN at an invalid step would reach the weight gradients otherwise.
        return torch.where(valid, self.net(torch.where(valid, x, 0.0)), 0.0)
