"""The extractor contract, the registry and checked weight loading shared by every backbone."""

from __future__ import annotations

import hashlib
import importlib
import logging
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

log = logging.getLogger("features")

EXTRACTORS: dict[str, Callable[..., Extractor]] = {}


class Extractor(nn.Module):
    """A frozen image backbone that maps face crops to one vector per crop.

    Subclasses set the class attributes below; ``mean``/``std`` are in 0-255 pixel units, so
    ``(x - mean) / std`` is the whole normalisation, whatever the backbone was trained with.
    """

    name: str = "extractor"
    input_size: int = 112
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: str = "RGB"
    interpolation: str = "bilinear"
    dim: int = 0
    weights_sha256: str | None = None  # None: random weights
    weights_file: str | None = None  # the weights' file name, recorded beside the checksum

    def preprocess(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 RGB crops (b, h, w, 3) -> normalised float input (b, 3, s, s) on the crops' device."""
        if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
            got = f"{crops.dtype} {tuple(crops.shape)}"
            raise ValueError(f"{self.name}: expected uint8 crops (b, h, w, 3), got {got}")
        x = rearrange(crops, "b h w c -> b c h w")  # a channels-last view, no copy
        if self.channel_order == "BGR":
            x = x.flip(1)
        x = self.fit(x, (self.input_size, self.input_size))
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)  # x is always a fresh tensor here, so in place is safe

    @property
    def crop_size(self) -> int:
        """The side of the aligned crop this extractor reads without resizing it up: its input
        size, or more where its preprocessing resizes and then crops the centre."""
        return int(self.input_size)

    def fit(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """uint8 (b, 3, h, w) -> float (b, 3, *size) in 0-255: resized where it is not that size."""
        return self.resize(x, size) if x.shape[-2:] != size else x.float()

    def resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """uint8 (b, 3, h, w) -> float (b, 3, *size) in 0-255.

        Bilinear and bicubic resize 8-bit images, antialiased, as PIL and OpenCV do in the
        backbones' own training pipelines; on CPU this is also several times faster than resizing
        floats. Devices without 8-bit kernels resize floats, then round and clip to 8 bits, which
        agrees within a grey level or two. ``area`` averages in float (MTCNN's own resampling).
        """
        smooth = self.interpolation in ("bilinear", "bicubic")
        kw = {"antialias": True, "align_corners": False} if smooth else {}
        if self.interpolation == "area":
            return F.interpolate(x.float(), size=size, mode="area")
        if x.device.type == "cpu":
            return F.interpolate(x, size=size, mode=self.interpolation, **kw).float()
        return F.interpolate(x.float(), size=size, mode=self.interpolation, **kw).round_().clamp_(0, 255)

    def describe(self) -> dict:
        """The preprocessing and output, as stored in the feature cache's attributes."""
        return {
            "extractor": self.name,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "pixel_range": "0-255",
            "channel_order": self.channel_order,
            "interpolation": self.interpolation,
            "resize_precision": "float32" if self.interpolation == "area" else "uint8",
            "dim": self.dim,
        }


def register_extractor(fn: Callable[..., Extractor]) -> Callable[..., Extractor]:
    """Add a variant function to ``EXTRACTORS`` under its own name."""
    EXTRACTORS[fn.__name__] = fn
    return fn


def build_extractor(name: str, **kw) -> Extractor:
    """Build a registered extractor, or ``package.module:function`` from a plug-in, in eval mode."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"extractor plug-in {name!r} cannot be loaded: {e}") from e
    elif name in EXTRACTORS or _user_timm_yaml(name):
        factory = EXTRACTORS[name]
    else:
        raise ValueError(
            f"unknown extractor {name!r}; choose one of {', '.join(sorted(EXTRACTORS))} "
            "or give a plug-in as package.module:function"
        )
    model = factory(**kw)
    missing = [a for a in ("preprocess", "forward", "describe", "dim", "input_size") if not hasattr(model, a)]
    if not isinstance(model, nn.Module) or missing:
        need = ", ".join(missing) or "the Extractor API"
        raise TypeError(f"extractor {name!r} must return an nn.Module with {need}")
    return model.eval().requires_grad_(False)


def crop_size(extractor: str | nn.Module) -> int:
    """The aligned crop side an extractor reads (:attr:`Extractor.crop_size`); given a name, from
    the network built on the meta device: no weights read, nothing allocated."""
    if isinstance(extractor, str):
        with torch.device("meta"):
            extractor = build_extractor(extractor, random_init=True)
    return int(getattr(extractor, "crop_size", extractor.input_size))  # a plug-in may give its input size only


def _user_timm_yaml(name: str) -> bool:
    """Register the user's own timm YAMLs (``$AFFECT_CONFIG_DIR/features/*.yaml``); whether
    ``name`` is now an extractor."""
    from features.timm_backbone import register_yaml_extractors
    from pipeline.config import ConfigError, config_dirs

    try:
        register_yaml_extractors([d / "features" for d in config_dirs()])
    except ConfigError:
        return False
    return name in EXTRACTORS


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def require_weights(name: str, weights: str | None, random_init: bool) -> None:
    """Refuse to build a backbone that would silently compute features from random weights."""
    if weights is None and not random_init:
        raise ValueError(
            f"{name}: no weights given; set extractor.weights=/path/to/checkpoint, "
            "or extractor.random_init=true for a smoke test with meaningless features"
        )
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"{name}: weights file {weights} not found")


def _plain_extras() -> list:
    """The plain data classes the field's training scripts save beside the weights, allowed by
    name when a checkpoint is read (and then ignored): MAE's and timm's ``args``
    (``argparse.Namespace``, whose values may be paths), numpy scalars such as a best metric."""
    import argparse
    import pathlib

    import numpy as np

    numpy_core = getattr(np, "_core", None) or np.core
    extras = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
              pathlib.PureWindowsPath, numpy_core.multiarray.scalar, np.dtype]
    extras += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return extras


# how torch's weights-only unpickler names what it refused, across versions
UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", re.I)


def load_plain(path: str | Path) -> object:
    """``torch.load`` of a weights file with ``weights_only=True``, the plain extras of
    :func:`_plain_extras` allowed; a file that needs any other global to load (code would run)
    is refused in one line naming the file and the global."""
    try:
        with torch.serialization.safe_globals(_plain_extras()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = UNSUPPORTED_GLOBAL.search(str(e))
        what = f"the global {found[1].rstrip('.')}" if found else "an object that is not plain data"
        raise ValueError(f"{path}: refused: loading it would run code ({what}); save the model's state dict "
                         "(model.state_dict()) instead") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict from a checkpoint file, unwrapping ``model``/``state_dict`` and ``module.``;
    what a training script saved beside it (``args``, ``epoch``, optimiser state) is ignored."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = load_plain(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checked(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                 allow_missing: Iterable[str] = ()) -> None:
    """Load ``state`` into ``model``; any missing key beyond ``allow_missing``, any unexpected key
    or any shape mismatch is an error naming the keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - set(allow_missing))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]
        parts = [f"missing keys: {show(missing)}" if missing else "",
                 f"unexpected keys: {show(unexpected)}" if unexpected else "",
                 f"shape mismatch: {show(shapes)}" if wrong else ""]
        problems = "; ".join(p for p in parts if p)
        raise ValueError(f"{source}: weights do not fit {type(model).__name__}: {problems}")
    model.load_state_dict(state, strict=not allow_missing)
