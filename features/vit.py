"""Vision Transformers from timm, average-pooled over patch tokens, loading official MAE
checkpoints (``{"model": state}``, optionally with the decoder) or timm-layout state dicts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from features.base import (
    Extractor,
    load_checked,
    read_state_dict,
    register_extractor,
    require_weights,
    sha256_file,
)

log = logging.getLogger("features")

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Pre-training only: the MAE decoder and mask token, and a classifier head we never use.
DROPPED_PREFIXES = ("decoder_", "mask_token", "head.")


def mae_to_timm(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop MAE pre-training keys; MAE's encoder already uses timm's parameter names."""
    kept = {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}
    return kept, sorted(set(state) - set(kept))


class ViTExtractor(Extractor):
    """(b, 3, 224, 224) -> (b, embed_dim): the mean of the patch tokens (class token excluded).

    A pre-training checkpoint has ``norm`` (applied to every token before pooling); a fine-tuned
    MAE checkpoint has ``fc_norm`` (applied after pooling); the timm model is built to match.
    """

    input_size = 224
    interpolation = "bicubic"

    def __init__(self, arch: str, name: str, weights: str | None = None, random_init: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        import timm
        from timm.data import resolve_data_config
        from timm.layers import resample_abs_pos_embed

        require_weights(name, weights, random_init)
        self.name = name
        state, dropped = ({}, []) if weights is None else mae_to_timm(read_state_dict(weights))
        fc_norm = "fc_norm.weight" in state if state else None
        self.vit = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="avg",
                                     fc_norm=fc_norm, img_size=self.input_size)
        self.dim = self.vit.num_features
        cfg = resolve_data_config({}, model=self.vit)
        self.mean = tuple(mean or tuple(m * 255 for m in cfg["mean"]))
        self.std = tuple(std or tuple(s * 255 for s in cfg["std"]))
        if weights is None:
            return
        if dropped:
            log.info("%s: dropped %d pre-training keys from %s (%s...)",
                     name, len(dropped), weights, dropped[0])
        pos = state.get("pos_embed")
        if pos is not None and pos.shape != self.vit.pos_embed.shape:
            grid = list(self.vit.patch_embed.grid_size)
            log.info("%s: interpolating position embeddings %s -> grid %s", name, tuple(pos.shape), grid)
            state["pos_embed"] = resample_abs_pos_embed(
                pos, new_size=grid, num_prefix_tokens=self.vit.num_prefix_tokens)
        load_checked(self.vit, state, weights)
        self.weights_sha256, self.weights_file = sha256_file(weights), Path(weights).name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)


@register_extractor
def mae_vit_base(**kw) -> ViTExtractor:
    """ViT-B/16 for MAE ``mae_pretrain_vit_base.pth`` (or fine-tuned) weights, 768-d."""
    kw["mean"], kw["std"] = kw.get("mean") or IMAGENET_MEAN, kw.get("std") or IMAGENET_STD
    return ViTExtractor("vit_base_patch16_224", "mae_vit_base", **kw)


@register_extractor
def mae_vit_large(**kw) -> ViTExtractor:
    """ViT-L/16 for MAE ``mae_pretrain_vit_large.pth`` (or fine-tuned) weights, 1024-d."""
    kw["mean"], kw["std"] = kw.get("mean") or IMAGENET_MEAN, kw.get("std") or IMAGENET_STD
    return ViTExtractor("vit_large_patch16_224", "mae_vit_large", **kw)


@register_extractor
def vit_tiny(**kw) -> ViTExtractor:
    """ViT-Ti/16 for quick runs, 192-d; normalisation from timm's defaults for the architecture."""
    return ViTExtractor("vit_tiny_patch16_224", "vit_tiny", **kw)
