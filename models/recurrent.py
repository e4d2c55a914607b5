"""Stacked (bi)directional recurrent encoder shared by the LSTM and GRU entries.

What "valid" means for recurrent state: the mask marks steps with a usable face. Each sequence
is packed up to its last valid step, so trailing padding never enters the state (and the
backward direction starts at the last valid step). Invalid steps inside a sequence (missing
faces) are kept in time but their input is zeroed after the projection, so the state advances
through the gap without seeing its content. Outputs at valid steps therefore do not depend on
what invalid steps hold; outputs at inner invalid steps are context-only estimates, outputs
after the last valid step are zeros.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def valid_lengths(mask: torch.Tensor) -> torch.Tensor:
    """(b, t) bool -> (b,) int64 index of the last valid step + 1, at least 1 (on CPU, for packing)."""
    idx = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, idx, -1).amax(dim=1)
    return (last + 1).clamp(min=1).cpu()


class RecurrentEncoder(nn.Module):
    """Input projection to ``hidden``, then ``layers`` stacked ``cell`` layers."""

    cell: type[nn.RNNBase] = nn.LSTM

    def __init__(
        self,
        d_in: int,
        hidden: int = 256,
        layers: int = 2,
        bidirectional: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(d_in, hidden), nn.Dropout(dropout))
        self.rnn = self.cell(
            hidden,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(dropout)
        self.out_dim = hidden * (2 if bidirectional else 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (b, t, d_in), mask (b, t) bool True = valid -> (b, t, hidden * directions)."""
        t = x.shape[1]
        mask = mask.bool()
        h = torch.where(mask[..., None], self.inp(x), 0.0)
        packed = pack_padded_sequence(h, valid_lengths(mask), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=t)
        return self.drop(out)
