"""The networks benchmarked and what one case needs: layout, predictor, targets, model, inputs.

A :class:`Case` is a small serialisable description (it crosses into the memory-probe
subprocess); a :class:`Workload` is what it builds on a device, once per (layout, hidden).
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from nern_fast import FastPredictor, WeightLayout
from nern_fast.models import cifar_resnet

from .resnet18 import resnet18

# NERN_SPEC §9: NeRN's hidden sizes (5 blocks, levels 40, base 0.76 throughout).
NERN_HIDDEN = {"resnet20": 180, "resnet56": 280, "resnet18": 1256}
SUBSET_SIZE = 4096  # NeRN's weights_batch_size: kernels per reconstruction step
NUM_BLOCKS, LEVELS, BASE = 5, 40, 0.76


# name -> (model builder, input shape of one image)
NETWORKS = {
    "tiny": (lambda: cifar_resnet(8, width=4), (3, 16, 16)),  # harness self-test, a few hundred kernels
    "resnet20": (lambda: cifar_resnet(20), (3, 32, 32)),
    "resnet32": (lambda: cifar_resnet(32), (3, 32, 32)),
    "resnet44": (lambda: cifar_resnet(44), (3, 32, 32)),
    "resnet56": (lambda: cifar_resnet(56), (3, 32, 32)),
    "resnet110": (lambda: cifar_resnet(110), (3, 32, 32)),
    "resnet18": (resnet18, (3, 224, 224)),  # ImageNet; torchvision's when it imports
}


def build_model(name: str) -> nn.Module:
    if name not in NETWORKS:
        raise ValueError(f"unknown benchmark network '{name}'; known: {sorted(NETWORKS)}")
    torch.manual_seed(0)
    return NETWORKS[name][0]().eval()


@functools.lru_cache(maxsize=None)
def layout_of(name: str) -> WeightLayout:
    """NeRN's choice of layers (``include="nern"``: the 3×3 convs inside residual blocks)."""
    return WeightLayout.from_model(build_model(name), include="nern")


def image_shape(name: str) -> tuple:
    return NETWORKS[name][1]


@dataclass(frozen=True)
class Case:
    """One measurement's configuration (providers and precision are chosen on top of it)."""

    operation: str
    layout: str
    hidden: int
    batch: Optional[int] = None  # images per step (distillation, inference)
    variant: str = ""  # operation-specific (permutation mode)

    def describe(self) -> dict:
        return asdict(self)


class Workload:
    """Everything a case decodes on one device: the predictor's parameters, targets and network.

    The predictor keeps NeRN's fmod initialisation and gets non-zero biases so every term of the
    decode does work. Targets are the network's own (random) conv weights.
    """

    def __init__(self, layout_name: str, hidden: int, device: torch.device, with_model: bool = False):
        self.layout_name = layout_name
        self.hidden = hidden
        self.device = device
        self.layout = layout_of(layout_name)
        torch.manual_seed(0)
        self.predictor = FastPredictor(self.layout, hidden=hidden, num_blocks=NUM_BLOCKS, levels=LEVELS,
                                       base=BASE)
        with torch.no_grad():
            for b in self.predictor.biases():
                b.uniform_(-0.1, 0.1)
        self.predictor.to(device)
        self.encoding = self.predictor.encoding
        model = build_model(layout_name)
        self.target = self.layout.flatten(model).to(device)
        self.model = model.to(device) if with_model else None
        self.layout.tensors(device)  # build the cached metadata outside every timed region

    @property
    def weights(self) -> list[torch.Tensor]:
        return self.predictor.weights()

    @property
    def biases(self) -> list[torch.Tensor]:
        return self.predictor.biases()

    @property
    def parameters(self) -> list[torch.Tensor]:
        return list(self.predictor.parameters())

    def set_requires_grad(self, flag: bool) -> None:
        for p in self.parameters:
            p.requires_grad_(flag)
            p.grad = None

    def subset_rows(self, size: int = SUBSET_SIZE, seed: int = 0) -> torch.Tensor:
        """A fixed uniform random subset of flat kernel indices (NeRN's random batch)."""
        g = torch.Generator().manual_seed(seed)
        size = min(size, self.layout.num_kernels)
        return torch.randperm(self.layout.num_kernels, generator=g)[:size].to(self.device)

    def images(self, batch: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn((batch,) + image_shape(self.layout_name), generator=g).to(self.device)
