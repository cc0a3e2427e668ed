"""Who decodes: the decode providers compared side by side.

* ``nern_eager``: NeRN's own eager decode (bench.nern_style), fp32 whatever the case asks — the
  baseline every speed-up is measured against;
* ``eager``: ``reference_decode`` (one chain over all kernels) at the case's precision (best eager);
* ``compile``: ``torch.compile`` of that same function;
* one provider per backend of the dispatcher other than eager (``triton``, ``csrc``, and any
  backend registered later), called through ``ops.decode(..., backend=name)``. Whether it can
  take a case is the dispatcher's own answer, recorded as the skip reason when it cannot.

A provider gives decode functions: ``full(work, precision)`` -> ``f(weights, biases)`` returning
the flat weight buffer, and ``subset(work, precision)`` -> ``f(weights, biases, rows)``.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Optional

import torch

from nern_fast import ops
from nern_fast.reference import reference_decode

from .nern_style import NernStyleDecoder
from .workloads import Workload

NERN_BASELINE = "nern_eager"


class Provider:
    name: str = ""
    fixed_precision: Optional[str] = None  # a provider that always runs at one precision

    def unavailable_reason(self, work: Workload, precision: str, subset: bool, needs_grad: bool) -> Optional[str]:
        return None

    def full(self, work: Workload, precision: str) -> Callable:
        raise NotImplementedError

    def subset(self, work: Workload, precision: str) -> Callable:
        raise NotImplementedError


class NernEagerProvider(Provider):
    name = NERN_BASELINE
    fixed_precision = "fp32"

    # Each call precomputes the encodings (outside the timed region, as NeRN does once per run);
    # the returned function keeps them alive, so they count in the provider's memory.
    def full(self, work, precision):
        return NernStyleDecoder(work.layout, work.encoding, work.device).decode

    def subset(self, work, precision):
        return NernStyleDecoder(work.layout, work.encoding, work.device).decode_rows


class EagerProvider(Provider):
    name = "eager"

    def full(self, work, precision):
        layout, encoding = work.layout, work.encoding
        return lambda w, b: reference_decode(w, b, layout, encoding, None, precision)

    def subset(self, work, precision):
        layout, encoding = work.layout, work.encoding
        return lambda w, b, rows: reference_decode(w, b, layout, encoding, rows, precision)


class CompileProvider(Provider):
    """``torch.compile(reference_decode)``; shapes are static in every case, so ``dynamic=False``."""

    name = "compile"

    def unavailable_reason(self, work, precision, subset, needs_grad):
        if work.device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++")
                                              or shutil.which("cc")):
            return "torch.compile on CPU needs a C++ compiler (none on PATH)"
        return None

    def _compiled(self):
        return torch.compile(reference_decode, dynamic=False)

    def full(self, work, precision):
        fn, layout, encoding = self._compiled(), work.layout, work.encoding
        return lambda w, b: fn(w, b, layout, encoding, None, precision)

    def subset(self, work, precision):
        fn, layout, encoding = self._compiled(), work.layout, work.encoding
        return lambda w, b, rows: fn(w, b, layout, encoding, rows, precision)


class DispatcherProvider(Provider):
    """A backend of ``nern_fast.ops`` named explicitly."""

    def __init__(self, backend: str):
        self.name = backend

    def unavailable_reason(self, work, precision, subset, needs_grad):
        if self.name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            return ("TRITON_INTERPRET=1 is set: the Triton interpreter's timings say nothing about "
                    "the kernels (unset it to benchmark on a GPU)")
        rows = work.subset_rows(1) if subset else None
        with torch.set_grad_enabled(needs_grad):
            weights = [w.detach().requires_grad_(needs_grad) for w in work.weights]
            request = ops.make_request(weights, work.layout, work.encoding, rows, precision)
        reason = ops.availability(request).get(self.name, "not registered with the dispatcher")
        if reason is None:
            return None
        return f"dispatcher: {reason}"

    def full(self, work, precision):
        layout, encoding, name = work.layout, work.encoding, self.name
        return lambda w, b: ops.decode(w, b, layout, encoding, None, precision, name)

    def subset(self, work, precision):
        layout, encoding, name = work.layout, work.encoding, self.name
        return lambda w, b, rows: ops.decode(w, b, layout, encoding, rows, precision, name)


def decode_providers() -> list[Provider]:
    """Every decode provider of this build, the NeRN-style baseline first.

    Dispatcher backends are discovered at call time, so a backend that registers later (Triton,
    the extension) is benchmarked without changes here.
    """
    fused = [DispatcherProvider(name) for name in ops.backend_names() if name != "eager"]
    return [NernEagerProvider(), EagerProvider(), CompileProvider()] + fused
