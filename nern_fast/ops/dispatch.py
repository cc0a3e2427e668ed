"""One dispatcher for every decode backend.

Backends register in priority order. Each answers ``unavailable_reason(request)`` with None (it can
take the call) or a sentence saying why not. ``backend="auto"`` takes the first that can; a backend
named explicitly (argument, ``NERN_FAST_BACKEND``, or a name stored in a predictor's file: see
:func:`requested_backend_name` for which wins) raises :class:`BackendUnavailable` with its reason,
and the backends that could take the call, instead of falling back.

A backend may also offer ``prepare(weights, biases, layout, encoding, precision)`` and take its
result as ``decode(..., prepared=...)``: work on the parameters done once for several decodes while
their values stay the same (the Triton backend's packing, and the first-layer tables of the calls'
layer range; ``nern_fast.inference`` shares one for the decodes of a forward).

A backend whose forward decode works through a scratch buffer sized by a memory budget (activations
of a chunk or tile of rows: the Triton chunked schedule, the CUDA decoder of ``csrc``) says so with
``bounded_workspace = True`` and takes ``decode(..., workspace_bytes=N)``: that call's scratch then
holds at most N bytes (at least one chunk or tile of rows, whatever N), instead of its default
budget. ``nern_fast.inference`` uses it to bound what an on-demand decode allocates.

A backend with ``takes_layer_range = True`` takes ``decode(..., layers=range(a, b))`` for a subset
call whose rows all lie in layers a..b-1 (checked for CPU rows; on a GPU the caller's promise, as
checking would read the rows back: a row outside them decodes to meaningless values there — zeros
from ``csrc``, the range's first table rows from the Triton kernels — but nothing is read out of
bounds): work sized by the whole network, such as the Triton backend's separable first-layer tables
or the CUDA decoder of ``csrc``'s, is then sized by those layers (:func:`call_layer_range` checks
the argument).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch

from ..encoding import EncodingSpec
from ..layout import LayerRange, WeightLayout

ENV_BACKEND = "NERN_FAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """A named backend cannot take this call; the message says why and what to do."""


@dataclass(frozen=True)
class DecodeRequest:
    """What a backend needs to know to accept or refuse a decode call."""

    device: torch.device
    dtype: torch.dtype
    precision: str
    hidden: int
    num_blocks: int
    kernel_size: int
    encoding: str
    levels: int
    subset: bool
    needs_grad: bool
    explicit: bool = False  # the user named this backend (allows test-only paths)

    @property
    def device_type(self) -> str:
        return self.device.type


class Backend(Protocol):
    name: str

    def unavailable_reason(self, request: DecodeRequest) -> Optional[str]:
        ...

    def decode(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
               layout: WeightLayout, encoding: EncodingSpec, rows: Optional[torch.Tensor],
               precision: str) -> torch.Tensor:
        ...


_BACKENDS: list[tuple[int, Backend]] = []
_LOAD_ERRORS: dict[str, str] = {}


def register_backend(backend: Backend, priority: int) -> None:
    """Add (or replace) a backend; lower priority numbers are tried first by ``auto``."""
    global _BACKENDS
    _BACKENDS = sorted([(p, b) for p, b in _BACKENDS if b.name != backend.name] + [(priority, backend)],
                       key=lambda pb: pb[0])
    _LOAD_ERRORS.pop(backend.name, None)


def record_load_error(name: str, reason: str) -> None:
    """A backend that could not even be loaded (missing triton, extension not built)."""
    if all(b.name != name for _, b in _BACKENDS):
        _LOAD_ERRORS[name] = reason


def backend_names() -> list[str]:
    return [b.name for _, b in _BACKENDS] + [n for n in _LOAD_ERRORS]


def get_backend(name: str) -> Backend:
    for _, b in _BACKENDS:
        if b.name == name:
            return b
    if name in _LOAD_ERRORS:
        raise BackendUnavailable(f"backend '{name}' is not available: {_LOAD_ERRORS[name]}")
    raise BackendUnavailable(f"unknown backend '{name}'; known backends: {backend_names()}")


def requested_backend_name(name: str = "auto", from_file: bool = False) -> str:
    """The backend the user asks for. A name given now (an argument, ``pred.backend = ...``) wins,
    then ``NERN_FAST_BACKEND``, then a name that merely came from a file (``from_file``: a predictor
    saved with it, perhaps on a machine with other backends), then "auto"."""
    named = name if name and name != "auto" else None
    if named and not from_file:
        return named
    return os.environ.get(ENV_BACKEND, "").strip() or named or "auto"


def availability(request: DecodeRequest) -> dict[str, Optional[str]]:
    """For every known backend, None if it could take ``request`` or the reason it cannot."""
    report = {b.name: b.unavailable_reason(request) for _, b in _BACKENDS}
    report.update(_LOAD_ERRORS)
    return report


def select_backend(request: DecodeRequest, name: str = "auto") -> Backend:
    name = requested_backend_name(name)
    if name != "auto":
        backend = get_backend(name)
        explicit = dataclasses.replace(request, explicit=True)  # (torch 2.11 Dynamo cannot trace **obj.__dict__)
        reason = backend.unavailable_reason(explicit)
        if reason is not None:
            raise BackendUnavailable(f"backend '{name}' cannot decode this call: "
                                     f"{reason.rstrip('.')}. {_how_to_choose_another(request, name)}")
        return backend
    reasons = []
    for _, backend in _BACKENDS:
        reason = backend.unavailable_reason(request)
        if reason is None:
            return backend
        reasons.append(f"{backend.name}: {reason}")
    raise BackendUnavailable("no backend can decode this call: " + "; ".join(reasons))


def _how_to_choose_another(request: DecodeRequest, refused: str) -> str:
    """What to do when a named backend refuses a call: the backends that can take it, and where to
    name one (a name in code beats the variable, which beats a name stored in a file)."""
    able = [n for n, reason in availability(request).items() if reason is None and n != refused]
    choices = " or ".join(f"'{n}'" for n in able + ["auto"])
    return (f"To decode it here, choose another backend: backend={choices} (pred.backend = ..., or the "
            f"backend= argument of FastPredictor.load / load_compressed), or {ENV_BACKEND} when no "
            f"backend is named in code")


def call_layer_range(layout: WeightLayout, layers: range, rows: Optional[torch.Tensor]) -> LayerRange:
    """The spans of ``decode(..., layers=...)``'s layers; ValueError for a full decode (rows=None),
    a range that is not non-empty, consecutive and inside the layout, or CPU ``rows`` outside it (on
    a GPU checking them would read them back: there the backends decode such a row as zeros or, in
    the Triton kernels, from the range's first table rows, never reading out of bounds)."""
    if rows is None:
        raise ValueError(f"layers={layers!r} is for subset calls (rows given, all inside those "
                         f"layers); a full decode (rows=None) covers every layer")
    span = layout.layer_range(layers)
    if rows.device.type == "cpu" and rows.numel():
        (k0, k1), (lo, hi) = span.kernels, (int(v) for v in torch.aminmax(rows))
        if lo < k0 or hi >= k1:
            raise ValueError(f"rows must lie in layers {layers.start}..{layers.stop - 1} (kernels "
                             f"{k0}..{k1 - 1}) when layers={layers!r} is given, got {lo}..{hi}")
    return span
