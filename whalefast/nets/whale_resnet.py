"""The reference's small ResNet: a 3x3 conv stem and three stages of basic blocks."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv + batch-norm layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def whale_resnet_body(widths=(32, 64, 128), blocks: int = 3) -> nn.Sequential:
    """The reference's small ResNet body: a 3x3 conv + BN stem and three stages of three basic blocks."""
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    c_in = widths[0]
    for i, width in enumerate(widths):
        for j in range(blocks):
            layers.append(BasicBlock(c_in, width, stride=2 if (j == 0 and i > 0) else 1))
            c_in = width
    return nn.Sequential(*layers)
