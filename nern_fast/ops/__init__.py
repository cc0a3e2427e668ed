"""How kernels are decoded: backends behind one dispatcher, and the ``decode`` entry point.

Backends, in the order ``auto`` tries them: ``triton`` (CUDA tensors), ``csrc`` (the compiled
extension ``nern_fast._C``), ``eager`` (plain torch, always there). A backend that cannot be loaded
(no triton, extension not built) is recorded with its reason and never breaks the import.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional, Sequence

import torch

from ..encoding import EncodingSpec
from ..layout import WeightLayout
from ..reference import check_precision
from .dispatch import (ENV_BACKEND, Backend, BackendUnavailable, DecodeRequest, availability,
                       backend_names, get_backend, record_load_error, register_backend,
                       requested_backend_name, select_backend)
from .eager import EagerBackend

__all__ = ["decode", "make_request", "check_decode_inputs", "Backend", "BackendUnavailable",
           "DecodeRequest", "availability", "backend_names", "get_backend", "register_backend",
           "select_backend", "ENV_BACKEND", "requested_backend_name"]

register_backend(EagerBackend(), priority=100)

# Optional backends: module name -> what to say when its module is absent from this build.
_OPTIONAL = {"triton": "nern_fast.ops.triton_backend", "csrc": "nern_fast.ops.csrc_backend"}


def _load_optional_backends() -> None:
    for name, module in _OPTIONAL.items():
        try:
            importlib.import_module(module).register()
        except ModuleNotFoundError as exc:
            if exc.name == module:
                record_load_error(name, "not part of this installation")
            else:
                record_load_error(name, f"missing dependency '{exc.name}'")
        except Exception as exc:  # never fail the import because of an optional backend
            record_load_error(name, f"failed to load ({type(exc).__name__}: {exc})")
            warnings.warn(f"nern_fast: the '{name}' backend failed to load and is disabled: {exc}",
                          RuntimeWarning, stacklevel=2)


_load_optional_backends()


def check_decode_inputs(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                        layout: WeightLayout, encoding: EncodingSpec,
                        rows: Optional[torch.Tensor]) -> None:
    """Shapes, devices and dtypes of the MLP parameters and the row indices, with clear errors."""
    if len(weights) != len(biases) or len(weights) < 2:
        raise ValueError(f"expected matching lists of >= 2 weights and biases, got {len(weights)} "
                         f"weights and {len(biases)} biases")
    hidden = weights[0].shape[0]
    k2 = layout.kernel_size ** 2
    expected = [(hidden, encoding.size)] + [(hidden, hidden)] * (len(weights) - 2) + [(k2, hidden)]
    device, dtype = weights[0].device, weights[0].dtype
    for i, (w, b, shape) in enumerate(zip(weights, biases, expected)):
        if tuple(w.shape) != shape or tuple(b.shape) != (shape[0],):
            raise ValueError(f"MLP layer {i}: expected weight {shape} and bias ({shape[0]},), got "
                             f"{tuple(w.shape)} and {tuple(b.shape)} (encoding size "
                             f"{encoding.size}, kernel {layout.kernel_size}x{layout.kernel_size})")
        for t, what in ((w, "weight"), (b, "bias")):
            if t.device != device:
                raise ValueError(f"MLP layer {i} {what} is on {t.device}, layer 0 weight on {device}; "
                                 f"move the predictor to one device (.to(device))")
            if t.dtype != dtype:
                raise ValueError(f"MLP layer {i} {what} has dtype {t.dtype}, layer 0 weight {dtype}; "
                                 f"use one dtype for all parameters")
    if rows is not None:
        if rows.dtype not in (torch.int32, torch.int64) or rows.dim() != 1:
            raise ValueError(f"rows must be a 1-D int32/int64 tensor of flat kernel indices, got "
                             f"dtype {rows.dtype} with shape {tuple(rows.shape)}")
        if rows.device != device:
            raise ValueError(f"rows are on {rows.device} but the predictor is on {device}")
        if rows.numel() and rows.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(rows.min()), int(rows.max())
            if lo < 0 or hi >= layout.num_kernels:
                raise IndexError(f"kernel index out of range [0, {layout.num_kernels}): got "
                                 f"min {lo}, max {hi}")
        elif rows.numel():  # no host sync on accelerators or in graphs: a device-side check instead
            torch._assert_async(((rows >= 0) & (rows < layout.num_kernels)).all())


def make_request(weights: Sequence[torch.Tensor], layout: WeightLayout, encoding: EncodingSpec,
                 rows: Optional[torch.Tensor], precision: str) -> DecodeRequest:
    w0 = weights[0]
    return DecodeRequest(device=w0.device, dtype=w0.dtype, precision=precision, hidden=w0.shape[0],
                         num_blocks=len(weights), kernel_size=layout.kernel_size,
                         encoding=encoding.kind, levels=encoding.levels, subset=rows is not None,
                         needs_grad=torch.is_grad_enabled() and any(w.requires_grad for w in weights))


def decode(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], layout: WeightLayout,
           encoding: EncodingSpec, rows: Optional[torch.Tensor] = None, precision: str = "fp32",
           backend: str = "auto") -> torch.Tensor:
    """Decode every kernel (flat weight buffer) or the flat kernel indices ``rows`` (padded rows).

    Differentiable with respect to ``weights`` and ``biases`` on every backend.
    """
    check_precision(precision)
    check_decode_inputs(weights, biases, layout, encoding, rows)
    request = make_request(weights, layout, encoding, rows, precision)
    chosen = select_backend(request, backend)
    return chosen.decode(weights, biases, layout, encoding, rows, precision)
