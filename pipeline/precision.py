"""What a stage computes in: the device type and the autocast dtype, decided in one place, and how
the identities of runs and caches record them.

On the CPU every stage computes in fp32. On CUDA with ``amp: true`` the features stage runs its
extractor under autocast in bf16 (fp16 on GPUs without bf16: inference needs no loss scaling),
and training runs the model under bf16 autocast; a GPU without bf16 trains in fp32, since fp16
training would need a loss scaler. Modules that are unsafe in half precision leave autocast
themselves (:func:`models.precision.full_precision`).

Numbers differ between the CPU and CUDA kernels even in fp32, and more under autocast, so the
device type and the autocast dtype are part of what names a training run, a feature part and a
prediction: a CPU run is never taken as done for a GPU run, never resumed on the other kind, and
a cache never mixes precisions. The CPU in fp32 is the neutral value that identities made before
this existed stand for, so it is left out of them.
"""

from __future__ import annotations

from typing import Any

NEUTRAL = {"device": "cpu", "autocast": "none"}


def autocast_dtype(device: Any, amp: bool, fp16: bool = True):
    """The ``torch.dtype`` a stage on ``device`` runs under autocast with ``amp``, or None for fp32:
    bf16 on CUDA where the GPU has it, else fp16 when ``fp16`` allows it (inference), else None."""
    import torch

    if not amp or torch.device(device).type != "cuda":
        return None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16 if fp16 else None


def precision(device: Any, dtype) -> dict:
    """``{"device": <type>, "autocast": <dtype name or "none">}`` of a stage on ``device`` computing
    under ``dtype`` (None: no autocast)."""
    import torch

    return {"device": torch.device(device).type, "autocast": str(dtype).removeprefix("torch.") if dtype else "none"}


def defining(device: Any, dtype) -> dict:
    """What an identity records of the precision: nothing for the CPU in fp32 (what identities made
    before this existed computed), else ``{"precision": ...}``."""
    p = precision(device, dtype)
    return {} if p == NEUTRAL else {"precision": p}


def training_dtype(device: Any, amp: bool):
    """The autocast dtype of training on ``device`` (bf16 or None)."""
    return autocast_dtype(device, amp, fp16=False)
