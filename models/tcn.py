"""Temporal convolution network: residual blocks of dilated 1-D convolutions over a feature sequence.

Masks are exact: invalid steps are zeroed before every convolution and the sequence edges are
padded with zeros, so an invalid step looks the same as the edge of the video and its content never
reaches a valid output. There is no BatchNorm, whose statistics would mix in padded steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.transformer import ACTIVATIONS, check_choice


class TemporalBlock(nn.Module):
    """Pre-norm residual block: LayerNorm, dilated convolution over time, activation, a per-step
    linear mix of the channels, dropout."""

    def __init__(self, dim: int, kernel: int, dilation: int, dropout: float, activation: str, causal: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, kernel, dilation=dilation)
        self.act = ACTIVATIONS[activation]()
        self.mix = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        span = (kernel - 1) * dilation
        # (steps before, steps after): causal looks back only; otherwise centred, one more step ahead
        # than behind when the span is odd (an even kernel).
        self.pad = (span, 0) if causal else (span // 2, span - span // 2)

    def forward(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """h (b, t, d), valid (b, t, 1) bool -> (b, t, d)."""
        # LayerNorm maps a zeroed step to its bias, so invalid steps are zeroed after it.
        u = rearrange(torch.where(valid, self.norm(h), 0.0), "b t d -> b d t")
        u = rearrange(self.conv(F.pad(u, self.pad)), "b d t -> b t d")
        return h + self.drop(self.mix(self.act(u)))


class TCNEncoder(nn.Module):
    """Input projection to ``hidden``, ``layers`` residual blocks with dilations 1, 2, 4, ..., a final
    LayerNorm: (b, t, d_in) -> (b, t, hidden), zero at invalid steps.

    ``causal=True`` lets each output see only its own and earlier steps (online use); otherwise the
    window is centred on the step. Either way it spans :attr:`receptive_field` steps.
    """

    def __init__(
        self,
        d_in: int,
        hidden: int = 320,
        layers: int = 6,
        kernel: int = 3,
        dropout: float = 0.1,
        causal: bool = False,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        if kernel < 1:
            raise ValueError(f"kernel={kernel}: a convolution needs at least one step")
        self.kernel, self.layers, self.causal = kernel, layers, causal
        self.inp = nn.Sequential(nn.Linear(d_in, hidden), nn.Dropout(dropout))
        self.blocks = nn.ModuleList(
            TemporalBlock(hidden, kernel, 2**i, dropout, activation, causal) for i in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.out_dim = hidden

    @property
    def receptive_field(self) -> int:
        """Steps that can reach one output: 1 + (kernel - 1) x (1 + 2 + ... + 2^(layers - 1))."""
        return 1 + (self.kernel - 1) * (2**self.layers - 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (b, t, d_in), mask (b, t) bool True = valid -> (b, t, hidden)."""
        valid = mask.bool()[..., None]
        # Zeroed first: a NaN at an invalid step would reach the weight gradients otherwise.
        h = self.inp(torch.where(valid, x, 0.0))
        for block in self.blocks:
            h = block(h, valid)
        return torch.where(valid, self.norm(h), 0.0)
