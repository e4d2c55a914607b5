"""HSEmotion's affect networks (Savchenko; ``hsemotion`` / ``emotiefflib`` on PyPI, Apache-2.0):
EfficientNets trained on AffectNet, as extractors that also give their heads' outputs.

Features are the pooled vector before the classifier (1280-d for B0, 1408-d for B2), as
``HSEmotionRecognizer.extract_features`` returns them; :meth:`HSEmotionExtractor.heads` gives the
expression probabilities (softmax of the classifier's first 7 or 8 outputs, in HSEmotion's class
order) and, for the ``_va_mtl`` networks, valence and arousal (its last two outputs, as they come).
Preprocessing is theirs: the crop resized to 224 (B0) or 260 (B2) pixels, bilinear, ImageNet mean
and std.

Their published ``.pt`` files are whole pickled modules (``torch.save(model)``), which this
project does not load as they are: ``python -m pipeline.convert hsemotion FILE.pt OUT.safetensors``
turns one into a plain state dict once (below), and the extractor reads that.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from features.base import Extractor, load_checked, read_state_dict, register_extractor, require_weights, sha256_file

CLASSES_8 = ("Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise")
CLASSES_7 = ("Anger", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise")
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# HSEmotion's networks: the timm EfficientNet each was trained from, its input size, its classes,
# and whether it also regresses valence and arousal (hsemotion's facial_emotions.py)
NETWORKS = {
    "enet_b0_8_best_afew": ("tf_efficientnet_b0", 224, CLASSES_8, False),
    "enet_b0_8_best_vgaf": ("tf_efficientnet_b0", 224, CLASSES_8, False),
    "enet_b0_8_va_mtl": ("tf_efficientnet_b0", 224, CLASSES_8, True),
    "enet_b2_8": ("tf_efficientnet_b2", 260, CLASSES_8, False),
    "enet_b2_7": ("tf_efficientnet_b2", 260, CLASSES_7, False),
}


class HSEmotionExtractor(Extractor):
    """(b, 3, s, s) -> (b, 1280 or 1408): the EfficientNet's pooled features; its classifier in
    :meth:`heads`."""

    interpolation = "bilinear"
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, name: str, weights: str | None = None, random_init: bool = False):
        super().__init__()
        import timm

        arch, self.input_size, self.classes, self.has_va = NETWORKS[name]
        require_weights(name, weights, random_init)
        self.name = name
        self.net = timm.create_model(arch, pretrained=False, num_classes=0)
        self.dim = int(self.net.num_features)
        self.classifier = torch.nn.Linear(self.dim, len(self.classes) + 2 * self.has_va)
        if weights is None:
            return
        if not str(weights).endswith(".safetensors") and is_pickled_module(weights):
            raise ValueError(f"{weights}: a whole pickled module (HSEmotion's published .pt), which is not loaded "
                             f"as it is; convert it once: python -m pipeline.convert hsemotion {weights} "
                             f"{Path(weights).with_suffix('.safetensors')}")
        state = read_state_dict(weights)
        state = {k.replace("classifier.0.", "classifier."): v for k, v in state.items()}  # a Sequential head
        head = {k.removeprefix("classifier."): state.pop(k) for k in list(state) if k.startswith("classifier.")}
        load_checked(self.net, state, weights)
        load_checked(self.classifier, head, f"{weights} (classifier)")
        self.weights_sha256, self.weights_file = sha256_file(weights), Path(weights).name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def heads(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``expr`` (b, classes) probabilities, and ``va`` (b, 2) for the ``_va_mtl`` networks."""
        scores = self.classifier(features)
        k = len(self.classes)
        out = {"expr": scores[:, :k].softmax(-1)}
        if self.has_va:
            out["va"] = scores[:, k : k + 2]
        return out

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, s, s) -> (b, classes) expression probabilities, in the order of :attr:`classes`."""
        return self.heads(self(x))["expr"]

    def forward_with_probabilities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and expression probabilities from one pass (the features stage stores both)."""
        features = self(x)
        return features, self.heads(features)["expr"]

    def describe(self) -> dict:
        return {**super().describe(), "classes": list(self.classes), "valence_arousal": self.has_va}


def _variant(name: str):
    def build(**kw) -> HSEmotionExtractor:
        return HSEmotionExtractor(name, **kw)

    build.__name__ = name
    build.__doc__ = f"HSEmotion's {name} ({NETWORKS[name][0]}, {len(NETWORKS[name][2])} expressions"
    build.__doc__ += ", valence and arousal)" if NETWORKS[name][3] else ")"
    return register_extractor(build)


for _name in NETWORKS:
    _variant(_name)


# ---- converting a published file ---------------------------------------------------------------------


def is_pickled_module(path: str | Path) -> bool:
    """Whether ``path`` needs globals beyond plain data to load (a pickled module, not a state dict)."""
    try:
        return bool(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not a zip checkpoint: read_state_dict says what it is
        return False


def module_classes(path: str | Path) -> list[type]:
    """The classes a pickled module needs, each checked to be a ``torch.nn.Module`` from torch or
    timm (their state is restored by ``torch.nn.Module.__setstate__``); anything else is refused."""
    classes = []
    for name in sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))):
        module, _, attr = name.rpartition(".")
        if not module.startswith(("torch.nn.", "timm.")):
            raise ValueError(f"{path}: needs {name}, which is not a torch or timm module class; not converted")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{path}: needs {name}, which this timm does not have ({e}); not converted") from None
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise ValueError(f"{path}: needs {name}, which is not a module class; not converted")
        classes.append(cls)
    return classes


def convert(source: str | Path, out: str | Path) -> list[str]:
    """A pickled HSEmotion module ``source`` -> its state dict as safetensors at ``out``; returns
    the module classes that were rebuilt. torch's weights-only unpickler reads the file, allowed
    exactly those classes; no other code is run."""
    from safetensors.torch import save_file

    classes = module_classes(source)
    with torch.serialization.safe_globals(classes):
        model = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{source}: holds a {type(model).__name__}, not a module")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return [f"{c.__module__}.{c.__qualname__}" for c in classes]
