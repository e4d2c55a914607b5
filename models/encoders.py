"""The temporal encoder registry: ``build_encoder("gru", d_in=512, hidden=128)``.

Every entry follows one contract: ``forward(x (b, t, d), mask (b, t) bool, True = valid) ->
(b, t, out_dim)``, and outputs at valid steps never depend on the content of invalid steps.
"""

from __future__ import annotations

import inspect

from torch import nn

from models.gru import GRUEncoder
from models.identity import IdentityEncoder
from models.lstm import LSTMEncoder
from models.transformer import TransformerEncoder

ENCODERS: dict[str, type[nn.Module]] = {
    "transformer": TransformerEncoder,
    "lstm": LSTMEncoder,
    "gru": GRUEncoder,
    "none": IdentityEncoder,
}


def _choices() -> str:
    """Registry names for messages: the no-context ``none`` first, then the temporal ones sorted."""
    return ", ".join(sorted(ENCODERS, key=lambda name: (name != "none", name)))


def encoder_options(name: str) -> set[str]:
    """Constructor options of a registry entry besides ``d_in``; unknown names list the valid ones."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {_choices()}")
    return set(inspect.signature(ENCODERS[name]).parameters) - {"d_in"}


def build_encoder(name: str, d_in: int, **kw) -> nn.Module:
    """An encoder by registry name with constructor kwargs; unknown names list the valid ones."""
    known = encoder_options(name)
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ValueError(
            f"encoder {name!r} has no option {', '.join(unknown)}; options: {', '.join(sorted(known))}"
        )
    return ENCODERS[name](d_in, **kw)


def encoder_from(spec: dict, d_in: int, **override) -> nn.Module:
    """Build from a config section such as ``{"name": "gru", "hidden": 128}``; ``override`` wins."""
    kw = {**spec, **override}
    if "name" not in kw:
        raise ValueError(
            f"encoder config {dict(spec)!r} has no 'name'; choose one of {_choices()}"
        )
    return build_encoder(kw.pop("name"), d_in, **kw)
