"""Temporal encoders, multi-task heads and structures, and their losses."""

from models.abaw import TASKS
from models.encoders import ENCODERS, build_encoder, encoder_from, encoder_options
from models.losses import MultiTaskLoss
from models.multitask import STRUCTURES, MultiTaskModel

__all__ = [
    "ENCODERS",
    "STRUCTURES",
    "TASKS",
    "MultiTaskLoss",
    "MultiTaskModel",
    "build_encoder",
    "encoder_from",
    "encoder_options",
]
