"""Temporal encoders, multi-task heads and structures, and their losses.

The names below load their module (and torch) when first used, so that ``models.abaw``, the ABAW
definitions that the label readers and writers share, imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "TASKS": "models.abaw",
    "ENCODERS": "models.encoders",
    "build_encoder": "models.encoders",
    "encoder_from": "models.encoders",
    "encoder_options": "models.encoders",
    "MultiTaskLoss": "models.losses",
    "STRUCTURES": "models.multitask",
    "MultiTaskModel": "models.multitask",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
