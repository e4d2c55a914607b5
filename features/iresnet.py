"""ArcFace IResNet backbones whose parameter names match insightface's ``arcface_torch``, so a
``backbone.pth`` state dict loads strictly. Input 112x112 RGB scaled to [-1, 1]; output 512-d."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from features.base import (
    Extractor,
    load_checked,
    read_state_dict,
    register_extractor,
    require_weights,
    sha256_file,
)


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=k // 2, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style block: BN, conv3x3, BN, PReLU, conv3x3 (strided), BN, plus shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv(cin, cout, 3)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv(cout, cout, 3, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(Extractor):
    """(b, 3, 112, 112) in [-1, 1] -> (b, 512) embedding (before L2 normalisation)."""

    input_size = 112
    mean = (127.5, 127.5, 127.5)
    std = (127.5, 127.5, 127.5)
    dim = 512

    def __init__(self, layers: tuple[int, int, int, int], name: str, weights: str | None = None,
                 random_init: bool = False):
        super().__init__()
        require_weights(name, weights, random_init)
        self.name = name
        self.conv1 = _conv(3, 64, 3)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        widths, cin = (64, 128, 256, 512), 64
        for i, (width, depth) in enumerate(zip(widths, layers, strict=True)):
            blocks = [IBasicBlock(cin if j == 0 else width, width, 2 if j == 0 else 1) for j in range(depth)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = width
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * 7 * 7, self.dim)  # four stride-2 stages: 112 -> 7
        self.features = nn.BatchNorm1d(self.dim, eps=1e-5)
        if weights is not None:
            load_checked(self, read_state_dict(weights), weights)
            self.weights_sha256, self.weights_file = sha256_file(weights), Path(weights).name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x).flatten(1))
        return self.features(self.fc(x))


@register_extractor
def iresnet18(**kw) -> IResNet:
    return IResNet((2, 2, 2, 2), "iresnet18", **kw)


@register_extractor
def iresnet34(**kw) -> IResNet:
    return IResNet((3, 4, 6, 3), "iresnet34", **kw)


@register_extractor
def iresnet50(**kw) -> IResNet:
    return IResNet((3, 4, 14, 3), "iresnet50", **kw)


@register_extractor
def iresnet100(**kw) -> IResNet:
    return IResNet((3, 13, 30, 3), "iresnet100", **kw)
