"""Transformer encoder over a feature sequence (pre-norm, or post-norm as torch's defaults), with key
padding and an optional local band."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# how a step's position enters: fixed codes, the same with the first step's code zero (a table whose
# row 0 is padding, as the ABAW4 winner's), a learned embedding, or not at all
POSITIONS = ("sinusoidal", "sinusoidal_zero_first", "learned", "none")
NORMS = ("pre", "post")  # LayerNorm before each residual branch (and at the end), or after each residual sum
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


def check_choice(option: str, value: object, choices: Iterable[str]) -> None:
    """Refuse ``value`` outside ``choices``, naming the option, before any layer is built."""
    if value not in choices:
        raise ValueError(f"{option}={value!r}: choose one of {', '.join(choices)}")


def sinusoidal_positions(t: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed sine/cosine position codes, (t, dim); computed per call so any length works."""
    pos = torch.arange(t, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    codes = torch.zeros(t, dim, device=device)
    codes[:, 0::2] = torch.sin(pos * freq)
    codes[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return codes


def zero_first_positions(t: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """The ABAW4 winner's position codes, (t, dim): angle pos / 10000 ** (2 (j // 2) / dim) in
    float64, its sine at even and cosine at odd dimensions, rounded to float32, and row 0 zero (their
    table's ``padding_idx=0``, although position 0 is the first step of every window)."""
    pos = torch.arange(t, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    codes = torch.where(torch.arange(dim) % 2 == 0, angle.sin(), angle.cos())
    codes[0] = 0.0
    return codes.float().to(device)


def attention_mask(mask: torch.Tensor, window: int = 0) -> torch.Tensor:
    """Which keys each query may attend to, (b, 1, t, t) bool, True = allowed.

    Queries never see invalid keys. A query always sees itself, so a step whose whole band is
    invalid (a long run of missing faces) still has a finite softmax; valid queries are unaffected
    because their own key is valid anyway.
    """
    t = mask.shape[1]
    allowed = rearrange(mask, "b j -> b 1 1 j").expand(-1, 1, t, t)
    idx = torch.arange(t, device=mask.device)
    if window > 0:
        allowed = allowed & ((idx[:, None] - idx[None, :]).abs() <= window)
    return allowed | torch.eye(t, dtype=torch.bool, device=mask.device)


class Block(nn.Module):
    """Self-attention + MLP, both residual; ``norm="post"`` computes as ``nn.TransformerEncoderLayer``
    with ``norm_first=False``."""

    def __init__(
        self, dim: int, heads: int, ffn_dim: int, dropout: float, norm: str = "pre", activation: str = "gelu"
    ) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"transformer width {dim} must be divisible by heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.pre = norm == "pre"
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, ffn_dim), ACTIVATIONS[activation](), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def attend(self, h: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """h (b, t, d), allowed (b, 1, t, t) -> the attention branch (b, t, d)."""
        q, k, v = rearrange(self.qkv(h), "b t (three n d) -> three b n t d", three=3, n=self.heads)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        return self.drop(self.proj(rearrange(a, "b n t d -> b t (n d)")))

    def forward(self, h: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """h (b, t, d), allowed (b, 1, t, t) -> (b, t, d)."""
        if self.pre:
            h = h + self.attend(self.norm1(h), allowed)
            return h + self.drop(self.mlp(self.norm2(h)))
        h = self.norm1(h + self.attend(h, allowed))
        return self.norm2(h + self.drop(self.mlp(h)))


class TransformerEncoder(nn.Module):
    """Input projection, positions, ``layers`` blocks and, when pre-norm, a final LayerNorm.

    ``positions``: ``sinusoidal`` (any length), ``sinusoidal_zero_first`` (the same, the first
    step without a code), ``learned`` (up to ``max_len`` steps) or ``none``. ``attend_invalid``:
    every step attends to every key, padding and steps without a face too (their inputs are zeros),
    as ``nn.TransformerEncoder`` without a key padding mask does; by default they are masked out.
    ``window``: each step attends to keys at most ``window`` steps away; 0 = the whole sequence.
    ``norm``: ``pre`` or ``post`` (torch's ``nn.TransformerEncoderLayer`` default, no final LayerNorm).
    ``ffn_dim``: MLP width; 0 = ``ffn_mult * hidden``. ``head_dim`` > 0 sets heads = width // head_dim
    instead of ``heads``, so branches of different widths keep one head size.
    ``input_projection=False`` keeps the input width (``hidden`` is then unused), for branches that
    read another encoder's output; ``input_dropout`` drops out the (projected) input.
    """

    def __init__(
        self,
        d_in: int,
        hidden: int = 256,
        layers: int = 4,
        heads: int = 4,
        ffn_mult: int = 4,
        dropout: float = 0.1,
        positions: str = "sinusoidal",
        window: int = 0,
        max_len: int = 1024,
        norm: str = "pre",
        ffn_dim: int = 0,
        activation: str = "gelu",
        input_projection: bool = True,
        input_dropout: bool = True,
        head_dim: int = 0,
        attend_invalid: bool = False,
    ) -> None:
        super().__init__()
        check_choice("positions", positions, POSITIONS)
        check_choice("norm", norm, NORMS)
        check_choice("activation", activation, ACTIVATIONS)
        width = hidden if input_projection else d_in
        if head_dim:
            if not 0 < head_dim <= width:
                raise ValueError(f"head_dim={head_dim} must lie in 1..{width} (the transformer width)")
            heads = width // head_dim
        self.positions, self.window, self.max_len = positions, window, max_len
        self.attend_invalid = attend_invalid
        self.inp = nn.Sequential(
            *([nn.Linear(d_in, width)] if input_projection else []),
            *([nn.Dropout(dropout)] if input_dropout else []),
        )
        self.pos = nn.Embedding(max_len, width) if positions == "learned" else None
        self.blocks = nn.ModuleList(
            Block(width, heads, ffn_dim or ffn_mult * width, dropout, norm, activation) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width) if norm == "pre" else nn.Identity()
        self.out_dim = width

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (b, t, d_in), mask (b, t) bool True = valid -> (b, t, out_dim)."""
        b, t, _ = x.shape
        mask = mask.bool()
        # Invalid steps may hold anything, even NaN, which would leak through 0-weighted values.
        h = self.inp(torch.where(mask[..., None], x, 0.0))
        if self.positions == "sinusoidal":
            h = h + sinusoidal_positions(t, h.shape[-1], h.device)
        elif self.positions == "sinusoidal_zero_first":
            h = h + zero_first_positions(t, h.shape[-1], h.device)
        elif self.pos is not None:
            if t > self.max_len:
                raise ValueError(f"sequence of {t} steps exceeds learned positions max_len={self.max_len}")
            h = h + self.pos.weight[:t]
        allowed = attention_mask(torch.ones_like(mask) if self.attend_invalid else mask, self.window)
        for block in self.blocks:
            h = block(h, allowed)
        return self.norm(h)
