"""Command: turn a published file that this project does not load as it is into a plain state dict.

    python -m pipeline.convert hsemotion FILE.pt OUT.safetensors

``hsemotion``: HSEmotion's networks are published as whole pickled modules (``torch.save(model)``).
The file is read by torch's weights-only unpickler, allowed exactly the torch and timm module
classes it names (:func:`features.hsemotion.convert`); anything else it would need is refused.
The command says which classes were rebuilt.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.convert",
                                     description="Published weights -> a plain state dict (safetensors).")
    sub = parser.add_subparsers(dest="kind", required=True)
    hse = sub.add_parser("hsemotion", help="HSEmotion's FILE.pt (a pickled module) -> OUT.safetensors")
    hse.add_argument("source")
    hse.add_argument("out")
    args = parser.parse_args(argv)
    from features.hsemotion import convert

    try:
        classes = convert(args.source, args.out)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.source}: rebuilt with torch's weights-only unpickler from {len(classes)} torch/timm module "
          f"classes ({', '.join(c.rpartition('.')[2] for c in classes)}), whose state torch.nn.Module.__setstate__ "
          f"restores; no other code ran -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
