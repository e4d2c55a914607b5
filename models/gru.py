"""GRU temporal encoder; masking rules are described in ``models.recurrent``."""

from __future__ import annotations

from torch import nn

from models.recurrent import RecurrentEncoder


class GRUEncoder(RecurrentEncoder):
    """Stacked, optionally bidirectional GRU: (b, t, d_in) -> (b, t, hidden * directions)."""

    cell = nn.GRU
