"""MTCNN's ONet (facenet-pytorch, weights in its wheel) as a small, fast extractor: its last
hidden layer, 256-d, from 48x48 RGB crops normalised as MTCNN does, ``(x - 127.5) / 128``."""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange

from features.base import Extractor, load_checked, read_state_dict, register_extractor, sha256_file


class ONetExtractor(Extractor):
    """(b, 3, 48, 48) -> (b, 256): ONet's ``prelu5`` activations."""

    name = "onet"
    input_size = 48
    mean = (127.5, 127.5, 127.5)
    std = (128.0, 128.0, 128.0)
    interpolation = "area"  # MTCNN's own resampling of boxes to 48x48
    dim = 256

    def __init__(self, weights: str | None = None, random_init: bool = False):
        super().__init__()
        import facenet_pytorch
        from facenet_pytorch.models.mtcnn import ONet

        self.net = ONet(pretrained=False)
        if random_init and weights is None:
            return
        weights = weights or str(Path(facenet_pytorch.__file__).parent / "data" / "onet.pt")
        load_checked(self.net, read_state_dict(weights), weights)
        self.weights_sha256, self.weights_file = sha256_file(weights), Path(weights).name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.pool1(n.prelu1(n.conv1(x)))
        x = n.pool2(n.prelu2(n.conv2(x)))
        x = n.pool3(n.prelu3(n.conv3(x)))
        x = n.prelu4(n.conv4(x))
        # the weights were ported from Caffe, whose dense layer reads the map transposed (w, h)
        x = rearrange(x, "b c h w -> b (w h c)")
        return n.prelu5(n.dense5(x))


@register_extractor
def onet(**kw) -> ONetExtractor:
    return ONetExtractor(**kw)
