"""The shape of one benchmarked operation (each lives in its own module, e.g. bench.decode_forward).

An operation says which providers it compares, what one timed call does (``prepare`` returns a
:class:`Step`), how many FLOPs that call counts (for TFLOP/s, or None) and how much decoding it
implies (for the CPU time gate). The runner in bench.suite does the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .providers import NERN_BASELINE, Provider, decode_providers
from .workloads import Case, Workload


class Skip(Exception):
    """This provider cannot run this case; the message is the recorded reason."""


@dataclass
class Step:
    """One prepared, timed call. ``check`` (after timing) returns a short note, e.g. the error
    against the fp32 reference; ``release`` frees what ``prepare`` set up."""

    run: Callable[[], object]
    check: Optional[Callable[[], str]] = None
    release: Callable[[], None] = field(default=lambda: None)


class Operation:
    name: str = ""
    baseline: str = NERN_BASELINE  # speed-ups are over this provider, same case, same run
    needs_grad: bool = False
    subset: bool = False
    needs_model: bool = False

    def providers(self) -> list:
        return decode_providers()

    def workload(self, case: Case, device: torch.device):
        return Workload(case.layout, case.hidden, device, with_model=self.needs_model)

    def workload_key(self, case: Case) -> tuple:
        return (case.layout, case.hidden, self.needs_model)

    def unavailable_reason(self, case: Case, work, provider: Provider, precision: str) -> Optional[str]:
        return provider.unavailable_reason(work, precision, self.subset, self.needs_grad)

    def kernels(self, case: Case, work) -> Optional[int]:
        return work.layout.num_kernels

    def flops(self, case: Case, work) -> Optional[float]:
        """FLOPs one call counts for TFLOP/s; None leaves the column blank."""
        return None

    def decode_flops_implied(self, case: Case, work, provider) -> float:
        """Decode FLOPs one call (or its set-up) implies, whoever does them: gates slow cases."""
        return self.flops(case, work) or 0.0

    def case_inputs(self, case: Case, work) -> None:
        """Create (and keep on ``work``) inputs every provider shares, before memory is measured."""

    def prepare(self, case: Case, work, provider, precision: str) -> Step:
        raise NotImplementedError


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out − ref| / max |ref| (one number that is comparable across layouts)."""
    scale = ref.abs().max().clamp_min(1e-30)
    return float((out.float() - ref.float()).abs().max() / scale)
