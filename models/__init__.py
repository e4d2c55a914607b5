"""Temporal encoders, multi-task heads and structures, and their losses."""

from models.encoders import ENCODERS, build_encoder, encoder_from, encoder_options
from models.heads import TASKS
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
