"""Running a trained model over whole videos: overlapping windows averaged per frame,
checkpoints that rebuild the model from the file alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import MultiTaskModel
from pipeline.data import Normaliser, window_starts


def save_checkpoint(path: str | Path, model: torch.nn.Module, **extra: Any) -> None:
    """Everything needed to rebuild and use the model: its arguments, weights and ``extra``
    (config, feature normalisation, AU thresholds, extractors, optimiser state, ...)."""
    from pipeline.runs import atomic_output

    model = getattr(model, "module", model)  # unwrap DDP
    state = {"model_args": model.args, "state_dict": model.state_dict(), **extra}
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[MultiTaskModel, dict]:
    """Rebuild the model of a checkpoint written by ``save_checkpoint``; returns (model, contents)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        model = MultiTaskModel(**ckpt["model_args"])
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:
        raise ValueError(f"{path}: not a usable checkpoint of this project ({type(e).__name__}: {e})") from e
    return model.to(device).eval(), ckpt


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of (n, c) values over ``window`` frames (1 or less: unchanged)."""
    if window <= 1 or len(values) == 0:
        return values
    half = window // 2
    padded = np.pad(values, ((half, half), (0, 0)), mode="edge")
    kernel = np.ones(2 * half + 1) / (2 * half + 1)
    return np.stack([np.convolve(padded[:, j], kernel, mode="valid") for j in range(values.shape[1])], 1)


def fill_missing(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Copy each invalid frame's value from the nearest valid frame (earlier one on ties).

    ABAW scores every labelled frame, including those where no face was found, so those frames
    take the prediction of the nearest frame that had one.
    """
    if valid.all() or not valid.any():
        return values
    idx = np.flatnonzero(valid)
    pos = np.searchsorted(idx, np.arange(len(valid)))
    left = idx[np.clip(pos - 1, 0, len(idx) - 1)]
    right = idx[np.clip(pos, 0, len(idx) - 1)]
    nearest = np.where(np.abs(np.arange(len(valid)) - left) <= np.abs(right - np.arange(len(valid))), left, right)
    return values[nearest]


@torch.inference_mode()
def predict_features(
    model: MultiTaskModel,
    feats: np.ndarray,
    present: np.ndarray,
    normaliser: Normaliser | None,
    length: int,
    stride: int,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Per-frame outputs for one video of features (n, d) with its present mask (n,).

    Windows of ``length`` every ``stride`` frames; where windows overlap, outputs are averaged.
    Returns ``va`` (n, 2) in [-1, 1], ``expr`` (n, 8) class probabilities and ``au`` (n, 12)
    probabilities for the tasks the model has; frames without a face are filled from the nearest
    frame with one (all outputs are NaN if the video has no face at all).
    """
    n = len(feats)
    x = normaliser(feats) if normaliser is not None else feats
    x = np.where(present[:, None], x, 0.0).astype(np.float32)
    sums: dict[str, np.ndarray] = {}
    counts = np.zeros(n, np.float32)
    starts = window_starts(n, length, stride)
    model.eval()
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        t = min(length, n)
        xb = torch.from_numpy(np.stack([x[s : s + t] for s in chunk])).to(device)
        mb = torch.from_numpy(np.stack([present[s : s + t] for s in chunk])).to(device)
        out = model(xb, mb)
        for task, value in out.items():
            if task == "expr":
                value = value.softmax(-1)
            elif task == "au":
                value = value.sigmoid()
            value = value.float().cpu().numpy()
            acc = sums.setdefault(task, np.zeros((n, value.shape[-1]), np.float32))
            for s, v in zip(chunk, value, strict=True):
                acc[s : s + t] += v
        for s in chunk:
            counts[s : s + t] += 1
    preds = {task: acc / counts[:, None] for task, acc in sums.items()}
    if not present.any():
        return {task: np.full_like(v, np.nan) for task, v in preds.items()}
    return {task: fill_missing(v, present) for task, v in preds.items()}
