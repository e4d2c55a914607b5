"""Running a trained model over whole videos: overlapping windows averaged per frame, frames
without a face filled from the nearest one, valence/arousal smoothed over time."""

from __future__ import annotations

import numpy as np
import torch

from models import MultiTaskModel
from models.recurrent import reset_carried_state
from pipeline.data import Normaliser, chunk_starts, window_starts

SMOOTHING_EDGES = ("pad", "truncate")  # at a video's ends: repeat its first and last value, or average fewer frames


def smooth(values: np.ndarray, window: int | list[int], edges: str = "pad") -> np.ndarray:
    """Centred moving average of (n, c) values over ``window`` frames (1 or less: unchanged); a list
    gives each column its own window (valence and arousal smoothed apart). Near the ends the window
    is filled with the first or last value (``pad``), or holds only the frames there are
    (``truncate``: frame t averages frames t - h .. t + h that exist, h = window // 2)."""
    if edges not in SMOOTHING_EDGES:
        raise ValueError(f"smoothing edges {edges!r}: choose one of {', '.join(SMOOTHING_EDGES)}")
    windows = list(window) if isinstance(window, list | tuple) else [window] * values.shape[-1]
    if len(windows) != values.shape[-1]:
        raise ValueError(f"{len(windows)} smoothing windows for {values.shape[-1]} columns")
    if all(w <= 1 for w in windows) or len(values) == 0:
        return values
    columns = []
    n = len(values)
    for j, w in enumerate(windows):
        half = max(int(w), 1) // 2
        if edges == "pad":
            padded = np.pad(values[:, j], (half, half), mode="edge")
            columns.append(np.convolve(padded, np.ones(2 * half + 1) / (2 * half + 1), mode="valid"))
            continue
        sums = np.concatenate([[0.0], np.cumsum(values[:, j], dtype=np.float64)])
        t = np.arange(n)
        lo, hi = np.maximum(t - half, 0), np.minimum(t + half + 1, n)
        columns.append((sums[hi] - sums[lo]) / (hi - lo))
    return np.stack(columns, 1)


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
    consecutive: bool = False,
) -> dict[str, np.ndarray]:
    """Per-frame outputs for one video of features (n, d) with its present mask (n,).

    Windows of ``length`` every ``stride`` frames; where windows overlap, outputs are averaged.
    With ``consecutive`` the windows are the video's non-overlapping chunks (the last padded), fed
    one after the other when the model carries an encoder state from chunk to chunk.
    Returns ``model.probabilities``: ``va`` (n, 2) in [-1, 1], ``expr`` (n, classes) class
    probabilities and ``au`` (n, 12) probabilities for the tasks the model has; frames without a
    face are filled from the nearest frame with one (all outputs are NaN if the video has no face
    at all).
    """
    n = len(feats)
    x = normaliser(feats) if normaliser is not None else feats
    x = np.where(present[:, None], x, 0.0).astype(np.float32)
    sums: dict[str, np.ndarray] = {}
    model.eval()
    if consecutive:  # pad to whole chunks; the padding is masked and cut off below
        starts, t = chunk_starts(n, length), length
        padded = -n % length
        x = np.pad(x, ((0, padded), (0, 0)))
        valid = np.pad(present, (0, padded))
        if reset_carried_state(model):
            batch_size = 1  # chunk after chunk, each from the state the last one ended in
    else:
        starts, t, valid = window_starts(n, length, stride), min(length, n), present
    sums_len = len(x)
    counts = np.zeros(sums_len, np.float32)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        xb = torch.from_numpy(np.stack([x[s : s + t] for s in chunk])).to(device)
        mb = torch.from_numpy(np.stack([valid[s : s + t] for s in chunk])).to(device)
        out = model(xb, mb)
        # A stand-in module without ``probabilities`` returns scores as they are to be averaged.
        scores = model.probabilities(out) if hasattr(model, "probabilities") else out
        for task, value in scores.items():
            value = value.float().cpu().numpy()
            acc = sums.setdefault(task, np.zeros((sums_len, value.shape[-1]), np.float32))
            for s, v in zip(chunk, value, strict=True):
                acc[s : s + t] += v
        for s in chunk:
            counts[s : s + t] += 1
    preds = {task: acc[:n] / counts[:n, None] for task, acc in sums.items()}
    if not present.any():
        return {task: np.full_like(v, np.nan) for task, v in preds.items()}
    return {task: fill_missing(v, present) for task, v in preds.items()}
