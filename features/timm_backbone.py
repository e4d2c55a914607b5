"""Any timm backbone as a feature extractor, named by a YAML in ``configs/features/`` that has a
``timm:`` key: the timm model, the user's weights file (safetensors, or a plain state dict), the
model's own preprocessing (input size, mean/std, interpolation, crop) unless the YAML overrides it,
and the features as the model pools them (its head's pre-logits: class token, average pool, ...).

Every such YAML is an extractor under its own name: the shipped ones are registered when
:mod:`features` is imported, a user's own (in ``$AFFECT_CONFIG_DIR/features/``) when
:func:`features.build_extractor` is first asked for it.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
import yaml

from features.base import EXTRACTORS, Extractor, load_checked, read_state_dict, require_weights, sha256_file

log = logging.getLogger("features")

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "features"


class TimmExtractor(Extractor):
    """(b, 3, s, s) -> (b, num_features): ``timm.create_model(timm, num_classes=0)``, whose output
    is its ``forward_head(forward_features(x), pre_logits=True)``.

    ``model_args`` go to ``timm.create_model`` (``depth``, ``dynamic_img_size``, ...);
    ``mean`` / ``std`` are in timm's 0-1 units; ``crop_pct`` below 1 resizes the crop to
    ``floor(size / crop_pct)`` and takes the centre, as timm's evaluation transform does (1 keeps
    the whole aligned face). A ViT's position embeddings are resampled to ``input_size`` by timm's
    own checkpoint filter, which also reads the original (non-timm) layouts it knows.
    """

    def __init__(self, timm: str, name: str, weights: str | None = None, random_init: bool = False,
                 input_size: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, interpolation: str | None = None,
                 crop_pct: float | None = None, pool: str | None = None, allow_missing: Sequence[str] = (),
                 model_args: dict | None = None):
        super().__init__()
        import timm as timm_lib

        require_weights(name, weights, random_init)
        self.name, self.arch = name, timm
        kw = {"pretrained": False, "num_classes": 0, **({"global_pool": pool} if pool else {}), **(model_args or {})}
        try:
            self.net = timm_lib.create_model(timm, **kw, **({"img_size": input_size} if input_size else {}))
        except TypeError:  # a convolutional network takes any size
            self.net = timm_lib.create_model(timm, **kw)
        except RuntimeError as e:
            raise ValueError(f"{name}: timm has no model {timm!r} ({e})") from None
        cfg = timm_lib.data.resolve_model_data_config(self.net)
        self.input_size = int(input_size or cfg["input_size"][-1])
        self.mean = tuple(255 * m for m in (mean or cfg["mean"]))
        self.std = tuple(255 * s for s in (std or cfg["std"]))
        self.interpolation = interpolation or cfg["interpolation"]
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"{name}: interpolation {self.interpolation!r}: choose bilinear or bicubic")
        self.crop_pct = float(crop_pct if crop_pct is not None else cfg.get("crop_pct", 1.0))
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"{name}: crop_pct={self.crop_pct} must lie in (0, 1]")
        self.dim = int(self.net.num_features)
        if weights is None:
            return
        load_checked(self.net, timm_state(self.net, read_state_dict(weights), weights, name), weights,
                     allow_missing=allow_missing)
        self.weights_sha256, self.weights_file = sha256_file(weights), Path(weights).name

    @property
    def crop_size(self) -> int:
        """``floor(input_size / crop_pct)``: the size timm resizes to before its centre crop."""
        return self.input_size if self.crop_pct >= 1 else math.floor(self.input_size / self.crop_pct)

    def fit(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Resized to ``floor(size / crop_pct)``, then the centre ``size`` (timm's evaluation
        transform), whatever the crop's size; with ``crop_pct`` 1 as any extractor."""
        if self.crop_pct >= 1:
            return super().fit(x, size)
        scale = math.floor(size[0] / self.crop_pct)
        x = super().fit(x, (scale, scale))
        top = int(round((scale - size[0]) / 2.0))  # torchvision's CenterCrop, which timm uses
        return x[..., top : top + size[0], top : top + size[1]].contiguous()

    def describe(self) -> dict:
        return {**super().describe(), "timm": self.arch, "crop_pct": self.crop_pct}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def timm_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, name: str) -> dict:
    """``state`` as ``model`` holds it: timm's own checkpoint filter for the model's family (layout
    conversion, position embeddings resampled to the model's size), the classifier dropped."""
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    classifier = model.pretrained_cfg.get("classifier")
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])
    dropped = sorted(k for k in state for h in heads if k == h or k.startswith(f"{h}.")) if heads else []
    own = model.state_dict()
    dropped = [k for k in dropped if k not in own]  # a head the model keeps (a norm) is loaded
    if dropped:
        log.info("%s: the classifier of %s is not used (%s)", name, source, ", ".join(dropped))
    return {k: v for k, v in state.items() if k not in dropped}


def yaml_extractors(folders: Sequence[Path]) -> dict[str, dict]:
    """name -> the YAML's keys, for every ``<folder>/<name>.yaml`` with a ``timm:`` key (earlier
    folders first, as configs are looked up)."""
    found: dict[str, dict] = {}
    for folder in reversed(list(folders)):
        for path in sorted(Path(folder).glob("*.yaml")):
            try:
                keys = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue  # the config loader reports a broken YAML where it is used
            if isinstance(keys, dict) and keys.get("timm"):
                found[path.stem] = keys
    return found


def factory(name: str, defaults: dict) -> Callable[..., TimmExtractor]:
    """The extractor ``name``: :class:`TimmExtractor` with its YAML's keys, overridden by the call's."""
    build = partial(_build, name, {k: v for k, v in defaults.items() if k != "name"})
    build.__name__ = name
    build.__doc__ = f"timm's {defaults['timm']} ({name}.yaml)"
    return build


def _build(name: str, defaults: dict, **kw) -> TimmExtractor:
    return TimmExtractor(name=name, **{**defaults, **{k: v for k, v in kw.items() if k != "name"}})


def register_yaml_extractors(folders: Sequence[Path] = (SHIPPED,)) -> list[str]:
    """Register every timm YAML of ``folders`` not registered yet; returns their names."""
    added = []
    for name, keys in yaml_extractors(folders).items():
        if name not in EXTRACTORS:
            EXTRACTORS[name] = factory(name, keys)
            added.append(name)
    return added


register_yaml_extractors()
