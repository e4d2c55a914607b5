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

from models.precision import full_precision


def valid_lengths(mask: torch.Tensor) -> torch.Tensor:
    """(b, t) bool -> (b,) int64 index of the last valid step + 1, at least 1 (on CPU, for packing)."""
    idx = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, idx, -1).amax(dim=1)
    return (last + 1).clamp(min=1).cpu()


class RecurrentEncoder(nn.Module):
    """Input projection to ``hidden`` (or, with ``input_projection=False``, the features straight
    into the first cell, as the ABAW4 winner's LSTM and GRU), then ``layers`` stacked ``cell`` layers.

    With ``carry_state`` (one direction only) each call starts from the state the previous call
    ended in, detached, as when a video is fed chunk after chunk; :meth:`reset_state` starts a new
    batch of videos. The caller keeps the batch's rows the same videos from chunk to chunk.

    It computes in fp32 inside any autocast region, its carried state too (:mod:`models.precision`).
    """

    cell: type[nn.RNNBase] = nn.LSTM

    def __init__(
        self,
        d_in: int,
        hidden: int = 256,
        layers: int = 2,
        bidirectional: bool = True,
        dropout: float = 0.1,
        input_projection: bool = True,
        carry_state: bool = False,
    ) -> None:
        super().__init__()
        if carry_state and bidirectional:
            raise ValueError("carry_state needs a one-directional encoder (bidirectional=false)")
        self.carry_state = carry_state
        self.state: torch.Tensor | tuple[torch.Tensor, ...] | None = None
        self.inp = nn.Sequential(nn.Linear(d_in, hidden), nn.Dropout(dropout)) if input_projection else nn.Identity()
        self.rnn = self.cell(
            hidden if input_projection else d_in,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(dropout)
        self.out_dim = hidden * (2 if bidirectional else 1)

    @full_precision
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (b, t, d_in), mask (b, t) bool True = valid -> (b, t, hidden * directions), fp32."""
        t = x.shape[1]
        mask = mask.bool()
        h = torch.where(mask[..., None], self.inp(x), 0.0)
        packed = pack_padded_sequence(h, valid_lengths(mask), batch_first=True, enforce_sorted=False)
        if not self.carry_state:
            out, _ = self.rnn(packed)
        else:
            if self.state is not None and _rows(self.state) != x.shape[0]:
                raise ValueError(f"carried state holds {_rows(self.state)} videos, this chunk {x.shape[0]}; "
                                 f"call reset_state() before a new batch of videos")
            out, state = self.rnn(packed, self.state)
            self.state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=t)
        return self.drop(out)

    def reset_state(self) -> None:
        """Forget the carried state: the next call starts a new batch of videos from zeros."""
        self.state = None


def _rows(state: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    return (state[0] if isinstance(state, tuple) else state).shape[1]


def reset_carried_state(model: nn.Module) -> bool:
    """Reset every state-carrying encoder inside ``model``; True if there is one."""
    carrying = [m for m in model.modules() if getattr(m, "carry_state", False)]
    for m in carrying:
        m.reset_state()
    return bool(carrying)
