"""CIFAR ResNets (He et al. 2016, §4.2): 3 stages of 16/32/64 channels, shortcut option A.

Depth 6n+2: ResNet-20/32/44/56/110. Option A shortcuts downsample by striding and zero-pad the
new channels, so the only convs are the stem and the 3×3 convs inside the blocks (NeRN's code
represents all of them: ``include=None``; the ``"nern"`` preset takes the blocks' only). Each
block has a parameter-free ``residual`` module, the hook point of NeRN's post-add feature map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = (20, 32, 44, 56, 110)


class ShortcutA(nn.Module):
    """Identity, or stride-2 subsampling with zero-padded channels when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.pad = planes - in_planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(in_planes, planes, stride)
        # No parameters: a hook point for the map after the residual add, before the ReLU (the
        # block's second feature map in NeRN's code; the "nern" feature-map preset).
        self.residual = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(self.residual(out + self.shortcut(x)))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (e.g. {DEPTHS}), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        planes, stages = width, []
        for i, out_planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(planes, out_planes, stride))
                planes = out_planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(x)


def cifar_resnet(depth: int = 20, num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet(depth, num_classes, **kwargs)
