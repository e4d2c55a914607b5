"""Swappable frame-level feature extractors, picked by name: ``build_extractor("iresnet50", weights=...)``."""

from features import fer_xception, iresnet, onet, vit  # noqa: F401 - importing registers the variants
from features.base import EXTRACTORS, Extractor, build_extractor, register_extractor

__all__ = ["EXTRACTORS", "Extractor", "build_extractor", "register_extractor"]
