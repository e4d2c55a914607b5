"""Where an aligned face's five landmarks go: the templates the faces stage aligns crops to."""

from __future__ import annotations

import numpy as np

# Landmark templates in a 112x112 crop, MTCNN order: left eye, right eye, nose, mouth left, mouth right.
TEMPLATES: dict[str, np.ndarray] = {
    # the ArcFace / insightface reference points
    "arcface": np.array(
        [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
        dtype=np.float32,
    ),
}


def template(name: str = "arcface", size: int = 112) -> np.ndarray:
    """The named template scaled to a ``size`` x ``size`` crop -> (5, 2) float32 pixels."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown alignment template {name!r}; choose one of {', '.join(TEMPLATES)}")
    # pixel centres sit at integer coordinates, so scaling keeps the half-pixel offset right
    return ((TEMPLATES[name] + 0.5) * (size / 112.0) - 0.5).astype(np.float32)
