"""torchvision ResNet-18/34/50 (random init: no pretrained weights can be downloaded here).

``small_input=True`` swaps the 7×7 stride-2 stem and its max-pool for a 3×3 stride-1 conv, the
usual adaptation for 32×32 images; the blocks, and so what ``include="nern"`` represents (the 3×3
convs inside BasicBlock / Bottleneck), are unchanged.
"""
from __future__ import annotations

from torch import nn

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50")


def torchvision_resnet(name: str, num_classes: int = 1000, in_channels: int = 3,
                       small_input: bool = False, **kwargs) -> nn.Module:
    try:
        import torchvision.models as tvm
    except ImportError as exc:  # pragma: no cover - torchvision is a dependency
        raise ImportError(f"model '{name}' needs torchvision (pip install torchvision)") from exc
    if name not in TORCHVISION_RESNETS:
        raise ValueError(f"unknown torchvision ResNet '{name}'; choose one of {TORCHVISION_RESNETS}")
    model = getattr(tvm, name)(weights=None, num_classes=num_classes, **kwargs)
    if small_input:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model
