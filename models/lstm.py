"""LSTM temporal encoder; masking rules are described in ``models.recurrent``."""

from __future__ import annotations

from torch import nn

from models.recurrent import RecurrentEncoder


class LSTMEncoder(RecurrentEncoder):
    """Stacked, optionally bidirectional LSTM: (b, t, d_in) -> (b, t, hidden * directions)."""

    cell = nn.LSTM
