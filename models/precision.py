"""Modules that must compute in fp32 even inside a half-precision autocast region.

Under CUDA autocast PyTorch runs cuDNN's GRU and LSTM in fp16 (their inputs, weights and hidden
state cast down), with no loss scaling in this project's training, and the state an encoder
carries from chunk to chunk would be kept in fp16 as well; on the CPU autocast turns a bare
``nn.LSTM`` to bf16. A recurrence compounds each step's rounding over hundreds of steps, and its
cost is small beside the heads' and the extractors', so it runs in fp32. A module whose ``forward``
is wrapped by :func:`full_precision` says so (``forward.full_precision`` is True).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def full_precision(forward: Callable) -> Callable:
    """``forward`` run with autocast off and its floating-point tensor arguments in fp32, so that its
    outputs and any state it keeps are fp32 whatever autocast region calls it."""

    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        kind = next((a.device.type for a in (*args, *kwargs.values()) if torch.is_tensor(a)), "cpu")
        if not torch.is_autocast_enabled(kind):
            return forward(self, *args, **kwargs)
        up = lambda a: a.float() if torch.is_tensor(a) and a.is_floating_point() else a
        with torch.autocast(kind, enabled=False):
            return forward(self, *map(up, args), **{k: up(v) for k, v in kwargs.items()})

    wrapped.full_precision = True
    return wrapped
