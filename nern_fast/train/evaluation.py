"""Running a network with decoded weights, and measuring it (accuracy, reconstruction error).

The reconstructed network is the original module called with its represented conv weights
replaced through ``torch.func.functional_call`` — no copy of the model, no rewriting, gradients
flow from the outputs into the flat weight buffer (and so into the predictor).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from ..layout import WeightLayout


def weight_dict(layout: WeightLayout, flat: torch.Tensor) -> dict:
    """``{"<layer>.weight": view}`` of a flat weight buffer, for ``functional_call``."""
    return {f"{l.name}.weight": w for l, w in zip(layout.layers, layout.split(flat))}


def autocast_context(device: torch.device, mode: str):
    """bf16 autocast for the CNN forward (``mode='bf16'``), or nothing."""
    if mode == "bf16":
        # No weight-cast cache: it would keep stale casts across steps and CUDA-graph replays.
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def forward_with_weights(model: nn.Module, layout: WeightLayout, flat: Optional[torch.Tensor],
                         x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with the represented conv weights taken from ``flat`` (None: its own)."""
    if flat is None:
        return model(x)
    return torch.func.functional_call(model, weight_dict(layout, flat), (x,))


@torch.no_grad()
def accuracy(model: nn.Module, batches, layout: Optional[WeightLayout] = None,
             flat: Optional[torch.Tensor] = None, autocast: str = "none") -> float:
    """Top-1 accuracy in percent over ``batches`` of (x, y) (one host sync at the end)."""
    was_training = model.training
    model.eval()
    correct = None
    total = 0
    try:
        for x, y in batches:
            with autocast_context(x.device, autocast):
                logits = forward_with_weights(model, layout, flat, x)
            hits = (logits.argmax(dim=1) == y).sum()
            correct = hits if correct is None else correct + hits
            total += y.shape[0]
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("accuracy: the evaluation set is empty")
    return 100.0 * float(correct) / total
