"""Permutation computation on one conv layer (default 64×64 3×3 = 4,096 kernels, NERN_SPEC §6).

Providers: ``nern_loop`` — NeRN's greedy chain as a Python loop over a precomputed cosine matrix
(bench.nern_style, always on the CPU with numpy, as NeRN runs it) — and ``vectorised`` — the
project's version in ``nern_fast.permutations`` (issue #5) on the benchmark device. ``variant`` is
the mode (crossfilter / infilter). The vectorised order is checked against the loop's and the
result noted. Run alone: ``python -m bench.permutations [--quick] [--device cuda]``."""
from __future__ import annotations

import importlib
import re
from typing import Callable, Optional

import torch

from .nern_style import crossfilter_loop, infilter_loop, same_chain
from .operation import Operation, Step
from .providers import Provider

MODES = ("crossfilter", "infilter")
# nern_fast.permutations' per-layer entry points: weight (C_out, C_in, s, s) -> NeRN's order form.
ENTRY_POINTS = {"crossfilter": "crossfilter", "infilter": "infilter"}
LOOPS = {"crossfilter": crossfilter_loop, "infilter": infilter_loop}


def parse_conv_layout(name: str) -> tuple[int, int]:
    """``conv64x64`` -> (C_out, C_in)."""
    match = re.fullmatch(r"conv(\d+)x(\d+)", name)
    if match is None:
        raise ValueError(f"permutation benchmarks take a layout named convCOUTxCIN (e.g. conv64x64), "
                         f"got '{name}'")
    return int(match.group(1)), int(match.group(2))


def vectorised_entry_point(mode: str) -> tuple[Optional[Callable], Optional[str]]:
    """(function, None) or (None, why it is not there)."""
    try:
        module = importlib.import_module("nern_fast.permutations")
    except ModuleNotFoundError as exc:
        if exc.name == "nern_fast.permutations":
            return None, "nern_fast.permutations (issue #5) is not in this build yet"
        return None, f"nern_fast.permutations needs missing module '{exc.name}'"
    fn = getattr(module, ENTRY_POINTS[mode], None)
    if not callable(fn):
        return None, (f"nern_fast.permutations has no function '{ENTRY_POINTS[mode]}'; name its {mode} "
                      f"entry point in bench.permutations.ENTRY_POINTS")
    return fn, None


class LayerWeight:
    """The 'workload' of a permutation case: one random conv weight on the device."""

    def __init__(self, layout: str, device: torch.device):
        c_out, c_in = parse_conv_layout(layout)
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(c_out, c_in, 3, 3, generator=g).to(device)
        self.device = device


class NernLoopProvider(Provider):
    name = "nern_loop"
    fixed_precision = "fp32"


class VectorisedProvider(Provider):
    name = "vectorised"
    fixed_precision = "fp32"


def matches_loop(mode: str, result, loop_result) -> Optional[bool]:
    if mode == "crossfilter":
        return same_chain(result, loop_result)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        return None
    filters = same_chain(result[0], loop_result[0])
    channels = [same_chain(got, ref) for got, ref in zip(result[1], loop_result[1])]
    if filters is None or any(c is None for c in channels):
        return None
    return filters and all(channels)


class Permutations(Operation):
    name = "permutations"
    baseline = NernLoopProvider.name

    def providers(self):
        return [NernLoopProvider(), VectorisedProvider()]

    def workload(self, case, device):
        return LayerWeight(case.layout, device)

    def workload_key(self, case):
        return (case.layout, "permutations")

    def kernels(self, case, work):
        return work.weight.shape[0] * work.weight.shape[1]

    def unavailable_reason(self, case, work, provider, precision):
        if case.variant not in MODES:
            return f"unknown permutation mode '{case.variant}' (one of {MODES})"
        if isinstance(provider, VectorisedProvider):
            return vectorised_entry_point(case.variant)[1]
        return None

    def prepare(self, case, work, provider, precision):
        mode, weight = case.variant, work.weight
        if isinstance(provider, NernLoopProvider):
            cpu_weight = weight.cpu()
            return Step(lambda: LOOPS[mode](cpu_weight))
        fn, _ = vectorised_entry_point(mode)

        def check():
            same = matches_loop(mode, fn(weight), LOOPS[mode](weight.cpu()))
            return {True: "same order as the NeRN loop", False: "ORDER DIFFERS from the NeRN loop",
                    None: "result format not recognised: order not compared"}[same]

        return Step(lambda: fn(weight), check)


OPERATION = Permutations()

if __name__ == "__main__":
    from .suite import main_for_operation
    raise SystemExit(main_for_operation(OPERATION.name))
