"""Running a trained model over whole videos: overlapping windows averaged per frame,
checkpoints that rebuild the model from the file alone."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import MultiTaskModel
from models.recurrent import reset_carried_state
from pipeline.data import Normaliser, chunk_starts, window_starts


class UnsafeCheckpoint(ValueError):
    """A checkpoint that needs code beyond tensors and plain data to load."""


_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype)


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Refuse anything but tensors and plain data (str, numbers, None, lists, tuples, dicts with
    plain keys), so every checkpoint loads with ``torch.load(weights_only=True)``."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):  # OrderedDict included: state dicts are plain
        for key, value in obj.items():
            if not isinstance(key, str | int | float | bool | type(None)):
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} is not plain data")
            check_plain(value, f"{where}.{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
    else:
        raise TypeError(f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not a tensor or plain "
                        "data; convert it (numpy arrays with .tolist(), configs with .to_dict())")


def save_checkpoint(path: str | Path, model: torch.nn.Module, **extra: Any) -> None:
    """Everything needed to rebuild and use the model: its arguments, weights and ``extra``
    (config, feature normalisation, AU thresholds, extractors, optimiser state, ...), all plain."""
    from pipeline.runs import atomic_output

    model = getattr(model, "module", model)  # unwrap DDP
    state = {"model_args": model.args, "state_dict": model.state_dict(), **extra}
    check_plain(state)
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def rewrite_checkpoint(path: str | Path, ckpt: dict, **changes: Any) -> None:
    """Write ``ckpt`` back to ``path`` with ``changes`` (e.g. settings chosen after training)."""
    from pipeline.runs import atomic_output

    state = {**ckpt, **changes}
    check_plain(state)
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The contents of a checkpoint, loaded as tensors and plain data only: unpickling never runs
    code, and a file that would need it is refused with :class:`UnsafeCheckpoint`."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # code it would run, or a file that is truncated or no torch file at all
        needs = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if needs:
            raise UnsafeCheckpoint(f"{path}: refused: it holds objects that would run code when loaded "
                                   f"({needs.group(1)}); a checkpoint of this project holds tensors and plain "
                                   "data only") from None
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise ValueError(f"{path}: not a usable checkpoint of this project ({type(e).__name__}: {first})") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a usable checkpoint of this project (holds a {type(ckpt).__name__})")
    return ckpt


class PerTaskModel(torch.nn.Module):
    """Each task's output from the weights of the epoch that was best for that task (a checkpoint
    trained with ``selection: per_task``), behind the interface of one ``MultiTaskModel``."""

    def __init__(self, args: dict, states: dict[str, dict]) -> None:
        super().__init__()
        self.models = torch.nn.ModuleDict()
        for task, state in states.items():
            self.models[task] = MultiTaskModel(**args)
            self.models[task].load_state_dict(state)
        first = next(iter(self.models.values()))
        self.args, self.tasks, self.au_output = first.args, first.tasks, first.au_output

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {task: model(x, mask)[task] for task, model in self.models.items()}

    def probabilities(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return next(iter(self.models.values())).probabilities(out)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model of a checkpoint written by ``save_checkpoint``; returns (model, contents).
    A checkpoint holding each task's best weights rebuilds as a :class:`PerTaskModel`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    ckpt = read_checkpoint(path, device)
    try:
        model = MultiTaskModel(**ckpt["model_args"])
        model.load_state_dict(ckpt["state_dict"])
        if ckpt.get("task_state_dicts"):
            states = {t: ckpt["task_state_dicts"].get(t, ckpt["state_dict"]) for t in model.tasks}
            model = PerTaskModel(ckpt["model_args"], states)
    except Exception as e:
        raise ValueError(f"{path}: not a usable checkpoint of this project ({type(e).__name__}: {e})") from e
    return model.to(device).eval(), ckpt


def smooth(values: np.ndarray, window: int | list[int]) -> np.ndarray:
    """Centred moving average of (n, c) values over ``window`` frames (1 or less: unchanged); a list
    gives each column its own window (valence and arousal smoothed apart)."""
    windows = list(window) if isinstance(window, list | tuple) else [window] * values.shape[-1]
    if len(windows) != values.shape[-1]:
        raise ValueError(f"{len(windows)} smoothing windows for {values.shape[-1]} columns")
    if all(w <= 1 for w in windows) or len(values) == 0:
        return values
    columns = []
    for j, w in enumerate(windows):
        half = max(int(w), 1) // 2
        padded = np.pad(values[:, j], (half, half), mode="edge")
        columns.append(np.convolve(padded, np.ones(2 * half + 1) / (2 * half + 1), mode="valid"))
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
