"""Swappable frame-level feature extractors, picked by name: ``build_extractor("iresnet50", weights=...)``."""

from features import fer_xception, hsemotion, iresnet, onet, timm_backbone, vit  # noqa: F401 - importing registers them
from features.base import EXTRACTORS, Extractor, build_extractor, crop_size, register_extractor

__all__ = ["EXTRACTORS", "Extractor", "build_extractor", "crop_size", "register_extractor"]
