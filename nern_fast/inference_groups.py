"""Decode groups: consecutive represented layers that an attached model decodes with one call.

A decode's cost on a GPU is mostly fixed per call (launches, the kernel's walk through every MLP
layer, a few programs on a GPU of a hundred SMs for a small layer): the 54 layer decodes of an
on-demand ResNet-56 forward took ~0.14 ms of GPU time each (H200, tf32), one decode of all its
94,208 kernels 0.5 ms. Decoding a few consecutive layers at once keeps the memory bound of on-demand
inference — at most two groups alive (the one the convs read, the next one being prefetched), each
at most half of (largest layer + predictor), or one layer where a layer is larger — while cutting
the number of calls (ResNet-56 at H=280: 54 → 6; ResNet-20 at H=180: 18 → 4). Consecutive layers
in layout order have consecutive kernel rows, so a group's rows are one slice of the flat index
space and its output splits into per-layer views without a copy.

Every mode of an attachment decodes through the same groups, so on_demand, cached and materialized
still give identical outputs.
"""
from __future__ import annotations

from typing import Optional, Sequence


def default_group_bytes(layer_bytes: Sequence[int], predictor_bytes: int) -> int:
    """The budget ``attach(group_bytes=None)`` uses: half of (largest layer + predictor), so that
    two groups alive at once (prefetch) stay within the on-demand bound of largest layer +
    predictor."""
    return (max(layer_bytes) + predictor_bytes) // 2


def check_group_bytes(group_bytes: Optional[int]) -> None:
    if group_bytes is not None and (isinstance(group_bytes, bool) or not isinstance(group_bytes, int)
                                    or group_bytes < 0):
        raise ValueError(f"group_bytes must be a non-negative integer (bytes of decoded weights per "
                         f"decode call; 0: one layer per call) or None (automatic), got {group_bytes!r}")


def groups_for(layer_bytes: Sequence[int], predictor_bytes: int,
               group_bytes: Optional[int] = None) -> tuple[int, list[range]]:
    """(budget, groups) of an attachment: ``group_bytes``, or the default budget when None."""
    budget = default_group_bytes(layer_bytes, predictor_bytes) if group_bytes is None else group_bytes
    return budget, plan_groups(layer_bytes, budget)


def plan_groups(layer_bytes: Sequence[int], budget: int) -> list[range]:
    """Split layers ``0..n-1`` (layout order) into consecutive groups of at most ``budget`` bytes
    of weights each; a layer larger than the budget is a group of its own (``budget=0``: one layer
    per group)."""
    groups: list[range] = []
    start, held = 0, 0
    for i, size in enumerate(layer_bytes):
        if i > start and held + size > budget:
            groups.append(range(start, i))
            start, held = i, 0
        held += size
    if layer_bytes:
        groups.append(range(start, len(layer_bytes)))
    return groups
