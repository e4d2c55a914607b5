"""The temporal encoder registry: ``build_encoder("gru", d_in=512, hidden=128)``.

Every entry follows one contract: ``forward(x (b, t, d), mask (b, t) bool, True = valid) ->
(b, t, out_dim)``, and outputs at valid steps never depend on the content of invalid steps.
A name of the form ``package.module:Class`` is a plug-in, built as ``Class(d_in, **options)``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from torch import nn

from models.frame import FrameEncoder
from models.gru import GRUEncoder
from models.identity import IdentityEncoder
from models.lstm import LSTMEncoder
from models.tcn import TCNEncoder
from models.transformer import TransformerEncoder

ENCODERS: dict[str, type[nn.Module]] = {
    "transformer": TransformerEncoder,
    "lstm": LSTMEncoder,
    "gru": GRUEncoder,
    "tcn": TCNEncoder,
    "frame": FrameEncoder,
    "none": IdentityEncoder,
}


def _choices() -> str:
    """Registry names for messages: the no-context ``none`` first, then the others sorted."""
    return ", ".join(sorted(ENCODERS, key=lambda name: (name != "none", name)))


def encoder_class(name: str) -> Callable[..., nn.Module]:
    """A registry entry, or the class a ``package.module:Class`` plug-in name points to."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"encoder plug-in {name!r} cannot be loaded: {e}") from e
        if not callable(cls):
            raise ValueError(f"encoder plug-in {name!r} is a {type(cls).__name__}, not a class")
        return cls
    if name not in ENCODERS:
        raise ValueError(
            f"unknown encoder {name!r}; choose one of {_choices()} or give a plug-in as package.module:Class"
        )
    return ENCODERS[name]


def encoder_options(name: str) -> set[str]:
    """Constructor options besides the first, ``d_in``; unknown names list the valid ones."""
    params = list(inspect.signature(encoder_class(name)).parameters.values())[1:]
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def build_encoder(name: str, d_in: int, **kw) -> nn.Module:
    """An encoder by registry or plug-in name with constructor kwargs; unknown names list the valid
    ones, and a plug-in that does not keep the contract is refused here rather than mid-training."""
    known = encoder_options(name)
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ValueError(
            f"encoder {name!r} has no option {', '.join(unknown)}; options: {', '.join(sorted(known))}"
        )
    enc = encoder_class(name)(d_in, **kw)
    missing = [] if hasattr(enc, "out_dim") else ["out_dim"]
    if getattr(type(enc), "forward", nn.Module.forward) is nn.Module.forward:  # nn.Module's own only raises
        missing.append("forward")
    if missing or not isinstance(enc, nn.Module):
        need = " and ".join(missing) or "the encoder contract"
        raise ValueError(f"encoder {name!r} must build an nn.Module with {need}: "
                         "forward(x (b, t, d), mask (b, t) bool) -> (b, t, out_dim)")
    return enc


def encoder_from(spec: dict, d_in: int, **override) -> nn.Module:
    """Build from a config section such as ``{"name": "gru", "hidden": 128}``; ``override`` wins."""
    kw = {**spec, **override}
    if "name" not in kw:
        raise ValueError(
            f"encoder config {dict(spec)!r} has no 'name'; choose one of {_choices()}"
        )
    return build_encoder(kw.pop("name"), d_in, **kw)
