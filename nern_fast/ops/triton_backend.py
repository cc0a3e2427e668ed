"""The ``triton`` backend: Triton decode kernels (``nern_fast.kernels``) behind torch.library ops.

Three tiers (DESIGN.md): the Triton kernels -> the launchers (``triton_fused``: one persistent
launch per call; ``triton_chunked``: per chunk of rows one GEMM launch per layer, for large H),
chosen per call shape by ``triton_tuner`` -> two ``torch.library`` custom ops,
``nern_fast::triton_decode`` and ``nern_fast::triton_decode_backward``, tied together with
``register_autograd`` so that autograd and ``torch.compile(fullgraph=True)`` see one opaque,
differentiable op. Outside of compilation the backend calls the same launchers through a plain
``autograd.Function`` (the custom-op dispatch costs tens of microseconds per call, which matters for
small layouts whose whole decode takes a fraction of a millisecond).

Which calls it takes: CUDA tensors (chosen by ``auto``); CPU tensors only under the Triton
interpreter (``TRITON_INTERPRET=1``, set before triton is imported) and only when the call names
the backend (tests). float32 parameters, hidden size <= 2048, kernel size <= 8.

Settings (environment variables, read at each call; ``atomic``, ``memory_budget_mb``,
``first_layer`` and ``schedule`` can also be set as attributes of
``nern_fast.ops.get_backend("triton")``, which win over the environment):
  NERN_FAST_TRITON_SCHEDULE=auto      "fused" | "chunked" | "auto" (timed per configuration on CUDA;
                                      untuned: chunked for H >= 512)
  NERN_FAST_TRITON_FIRST_LAYER=auto   "separable" | "direct" | "auto" (timed per configuration)
  NERN_FAST_TRITON_ATOMICS=1          fused backward: weight gradients by atomic adds (faster, not
                                      deterministic; the chunked backward is always deterministic)
  NERN_FAST_TRITON_BWD_MEMORY_MB=1024 backward working memory (fused: per-program partials and
                                      scratch; chunked: the chunk's activations and the partials)
  NERN_FAST_TRITON_FWD_MEMORY_MB=256  chunked forward: the chunk's activation buffers (a call's
                                      ``decode(..., workspace_bytes=N)`` wins)
  NERN_FAST_TRITON_CHUNK_ROWS=        chunked: force this many rows per chunk (tests)
  NERN_FAST_TRITON_AUTOTUNE=1         0: take the first candidate configuration, time nothing
  NERN_FAST_TRITON_TUNE_CACHE=        tuning decisions on disk: a path, or 0 (default
                                      ~/.cache/nern_fast/triton_tune.json)
  NERN_FAST_TRITON_FP32_DOT=ieee      tf32x3: the fp32 mode's products as three tf32 products
  NERN_FAST_TRITON_PARAM_CACHE=0      1: reuse packed parameters across calls while the parameters'
                                      version counters are unchanged (misses writes through .data;
                                      see triton_inputs)
  NERN_FAST_TRITON_TUNE_LOG=1         print every timed candidate and the choice (stderr)
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, List, Optional

import torch
import triton  # noqa: F401  (a missing triton makes register() fail: recorded, not fatal)

from ..layout import LayerRange, WeightLayout
from . import triton_chunked, triton_fused
from .dispatch import DecodeRequest, call_layer_range, register_backend
from .layout_cache import LayoutCache
from .triton_inputs import (INTERPRETED, INTERPRETER_PROBLEM, MAX_HIDDEN, MAX_KERNEL_SIZE, DecodeShape,
                            LaunchInputs, PackedParameters, clear_parameter_cache, cross_call_reuse,
                            env_flag, make_launch_inputs, slot_layout, unpack_gradients)
from .triton_tuner import (FIRST_LAYER_MODES, SCHEDULES, TUNE_ROWS, LaunchConfig, candidate_configs,
                           choose_config, tuned_configs, tuning_enabled)

__all__ = ["TritonBackend", "INTERPRETER_PROBLEM", "register", "triton_decode", "triton_decode_backward", "forward", "backward",
           "DecodeShape", "LaunchConfig", "candidate_configs", "choose_config", "tuned_configs",
           "clear_parameter_cache", "crop_flags", "INTERPRETED"]

BACKEND_NAME = "triton"
PRIORITY = 10
REQUEST_PRECISIONS = ("fp32", "tf32", "bf16")
_MB = 1 << 20


# ----------------------------------------------------------------------------- forward / backward
def _compile_errors() -> tuple:
    """Exceptions that mean "this configuration does not build on this device" (skip it)."""
    errors = []
    for module, name in (("triton.runtime.errors", "OutOfResources"), ("triton.runtime.errors", "PTXASError"),
                         ("triton.compiler.errors", "CompilationError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


_COMPILE_ERRORS = _compile_errors()
_FALLBACK: dict[tuple, LaunchConfig] = {}  # (call key, chosen config that failed to build) -> what ran


def _run_with_fallback(chosen: LaunchConfig, candidates, run: Callable[[LaunchConfig], object],
                       key: tuple = ()):
    """Run ``chosen``; if it does not compile on this device (an untuned default, a stale decision),
    the next candidate that does, remembered for the process per call ``key``."""
    config = _FALLBACK.get((key, chosen), chosen)
    try:
        return run(config)
    except _COMPILE_ERRORS:
        if config not in candidates or len(candidates) == 1:
            raise
    for alt in candidates:
        if alt == config:
            continue
        try:
            result = run(alt)
        except _COMPILE_ERRORS:
            continue
        _FALLBACK[(key, chosen)] = alt
        return result
    raise RuntimeError(f"no Triton launch configuration of this decode compiles on this device "
                       f"({chosen.describe()} and {len(candidates) - 1} others failed); use another backend")


def _run_forward(inputs: LaunchInputs, config: LaunchConfig, out: torch.Tensor, chunk_budget: int) -> None:
    if config.schedule == "chunked":
        triton_chunked.run_forward(inputs, config, out, chunk_budget)
    else:
        triton_fused.run_forward(inputs, config, out)


def _run_backward(inputs: LaunchInputs, grad: torch.Tensor, config: LaunchConfig, atomic: bool,
                  memory_budget: int) -> torch.Tensor:
    if config.schedule == "chunked":
        return triton_chunked.run_backward(inputs, grad, config, memory_budget)
    return triton_fused.run_backward(inputs, grad, config, atomic, memory_budget)


def _choose(kind: str, inputs: LaunchInputs, first_layer: str, schedule: str,
            run: Callable[[LaunchInputs, LaunchConfig], object]):
    """Pick the configuration (tuning on a prefix of the rows: large calls cost the same per row)
    and run the whole call with it."""
    tune = tuning_enabled(inputs.device)
    prepared = inputs.packed_params is not None and inputs.packed_params.prepared_for is not None
    sample = inputs.prefix(TUNE_ROWS) if tune else inputs
    # Time the tables as a call pays for them: rebuilt per call, unless reused across calls (and a
    # prepared set's tables must stay the ones its callers, e.g. captured graphs, read).
    rebuild_tables = not cross_call_reuse() and not prepared

    def timed(config: LaunchConfig):
        if rebuild_tables:
            sample.packed().tables = None
        return run(sample, config)

    config = choose_config(kind, inputs.shape, inputs.device, first_layer, timed, tune=tune,
                           schedule=schedule)
    candidates = candidate_configs(kind, inputs.shape, first_layer, schedule, tune)
    return _run_with_fallback(config, candidates, lambda c: run(inputs, c), (kind, inputs.shape))


def forward(inputs: LaunchInputs, first_layer: str = "auto", schedule: str = "auto",
            chunk_budget: int = 256 * _MB) -> torch.Tensor:
    shape = inputs.shape
    if shape.subset:
        out = torch.empty((shape.rows, shape.k2), device=inputs.device, dtype=inputs.weights[0].dtype)
    else:
        out = torch.empty(inputs.num_weights, device=inputs.device, dtype=inputs.weights[0].dtype)
    _choose("fwd", inputs, first_layer, schedule, lambda i, c: _run_forward(i, c, out, chunk_budget))
    return out


def backward(inputs: LaunchInputs, grad: torch.Tensor, first_layer: str = "auto", atomic: bool = False,
             memory_budget: int = 1 << 30, schedule: str = "auto") -> torch.Tensor:
    expected = (inputs.shape.rows, inputs.shape.k2) if inputs.shape.subset else (inputs.num_weights,)
    if tuple(grad.shape) != expected:
        raise ValueError(f"gradient of the decode has shape {tuple(grad.shape)}, expected {expected}")
    grad = grad.to(inputs.weights[0].dtype).contiguous()
    return _choose("bwd", inputs, first_layer, schedule,
                   lambda i, c: _run_backward(i, grad, c, atomic, memory_budget))


# ----------------------------------------------------------------------------- torch.library ops
def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the parameters' device."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _decode_impl(weights, biases, rows, kernel_offsets, weight_offsets, meta, coord_rows, pos_layer,
                 pos_filter, pos_channel, enc_table, kernel_size, num_kernels, num_weights, crop_flags,
                 ffn, precision, first_layer, schedule, atomic, memory_budget,
                 chunk_budget,
                 packed: Optional[PackedParameters] = None) -> tuple[torch.Tensor, LaunchInputs]:
    inputs = make_launch_inputs(weights, biases, rows, kernel_offsets, weight_offsets, meta, coord_rows,
                                pos_layer, pos_filter, pos_channel, enc_table, kernel_size, num_kernels,
                                num_weights, crop_flags, ffn, precision)
    inputs.packed_params = packed  # a prepared set (TritonBackend.prepare), or None: packed here
    with _on_device(inputs.device):
        return forward(inputs, first_layer, schedule, chunk_budget), inputs


def _decode_backward_impl(grad, weights, biases, rows, kernel_offsets, weight_offsets, meta, coord_rows,
                          pos_layer, pos_filter, pos_channel, enc_table, kernel_size, num_kernels,
                          num_weights, crop_flags, ffn, precision, first_layer, schedule, atomic,
                          memory_budget, chunk_budget, packed: Optional[PackedParameters] = None):
    inputs = make_launch_inputs(weights, biases, rows, kernel_offsets, weight_offsets, meta, coord_rows,
                                pos_layer, pos_filter, pos_channel, enc_table, kernel_size, num_kernels,
                                num_weights, crop_flags, ffn, precision)
    inputs.packed_params = packed  # the forward's, when it handed them over
    with _on_device(inputs.device):
        return backward(inputs, grad, first_layer, atomic, memory_budget, schedule)


@torch.library.custom_op("nern_fast::triton_decode", mutates_args=())
def triton_decode(weights: List[torch.Tensor], biases: List[torch.Tensor], rows: Optional[torch.Tensor],
                  kernel_offsets: torch.Tensor, weight_offsets: torch.Tensor, meta: torch.Tensor,
                  coord_rows: Optional[torch.Tensor], pos_layer: torch.Tensor, pos_filter: torch.Tensor,
                  pos_channel: torch.Tensor, enc_table: torch.Tensor, kernel_size: int, num_kernels: int,
                  num_weights: int, crop_flags: int, ffn: bool, precision: str, first_layer: str,
                  schedule: str, atomic: bool, memory_budget: int, chunk_budget: int) -> torch.Tensor:
    """Decode every kernel (flat buffer of ``num_weights``) or ``rows`` ((len(rows), k²))."""
    return _decode_impl(weights, biases, rows, kernel_offsets, weight_offsets, meta, coord_rows, pos_layer,
                        pos_filter, pos_channel, enc_table, kernel_size, num_kernels, num_weights,
                        crop_flags, ffn, precision, first_layer, schedule, atomic, memory_budget,
                        chunk_budget)[0]


@triton_decode.register_fake
def _triton_decode_fake(weights, biases, rows, kernel_offsets, weight_offsets, meta, coord_rows,
                        pos_layer, pos_filter, pos_channel, enc_table, kernel_size, num_kernels,
                        num_weights, crop_flags, ffn, precision, first_layer, schedule, atomic,
                        memory_budget, chunk_budget):
    if rows is not None:
        return weights[0].new_empty((rows.shape[0], kernel_size * kernel_size))
    return weights[0].new_empty((num_weights,))


@torch.library.custom_op("nern_fast::triton_decode_backward", mutates_args=())
def triton_decode_backward(grad: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                           rows: Optional[torch.Tensor], kernel_offsets: torch.Tensor,
                           weight_offsets: torch.Tensor, meta: torch.Tensor,
                           coord_rows: Optional[torch.Tensor],
                           pos_layer: torch.Tensor, pos_filter: torch.Tensor, pos_channel: torch.Tensor,
                           enc_table: torch.Tensor, kernel_size: int, num_kernels: int, num_weights: int,
                           crop_flags: int, ffn: bool, precision: str, first_layer: str, schedule: str,
                           atomic: bool, memory_budget: int, chunk_budget: int) -> torch.Tensor:
    """All weight and bias gradients, flattened (W1, W_hidden..., W_last, b1, b_hidden..., b_last)."""
    return _decode_backward_impl(grad, weights, biases, rows, kernel_offsets, weight_offsets, meta,
                                 coord_rows, pos_layer, pos_filter, pos_channel, enc_table, kernel_size,
                                 num_kernels, num_weights, crop_flags, ffn, precision, first_layer,
                                 schedule, atomic, memory_budget, chunk_budget)


@triton_decode_backward.register_fake
def _triton_decode_backward_fake(grad, weights, biases, rows, kernel_offsets, weight_offsets, meta,
                                 coord_rows, pos_layer, pos_filter, pos_channel, enc_table, kernel_size,
                                 num_kernels, num_weights, crop_flags, ffn, precision, first_layer, schedule,
                                 atomic, memory_budget, chunk_budget):
    h, e = weights[0].shape
    return weights[0].new_empty((slot_layout(h, e, len(weights) - 2, weights[-1].shape[0])[-1],))


_TENSOR_ARGS = ("rows", "kernel_offsets", "weight_offsets", "meta", "coord_rows", "pos_layer",
                "pos_filter", "pos_channel", "enc_table")
_STATIC_ARGS = ("kernel_size", "num_kernels", "num_weights", "crop_flags", "ffn", "precision",
                "first_layer", "schedule", "atomic", "memory_budget", "chunk_budget")


def _setup_context(ctx, inputs, output):
    weights, biases, *rest = inputs
    ctx.num_weights_list = len(weights)
    tensors = rest[:len(_TENSOR_ARGS)]
    ctx.optional_missing = [t is None for t in tensors]
    ctx.save_for_backward(*weights, *biases, *[t for t in tensors if t is not None])
    ctx.static = rest[len(_TENSOR_ARGS):]


def _backward(ctx, grad):
    saved = list(ctx.saved_tensors)
    n = ctx.num_weights_list
    weights, biases, present = saved[:n], saved[n:2 * n], iter(saved[2 * n:])
    tensors = [None if missing else next(present) for missing in ctx.optional_missing]
    flat = triton_decode_backward(grad, weights, biases, *tensors, *ctx.static)
    grads_w, grads_b = unpack_gradients(flat, weights)
    return (grads_w, grads_b) + (None,) * (len(_TENSOR_ARGS) + len(_STATIC_ARGS))


triton_decode.register_autograd(_backward, setup_context=_setup_context)


class _DecodeFunction(torch.autograd.Function):
    """The ops' forward and backward as a plain autograd.Function: what eager calls use (no custom-op
    dispatch); ``torch.compile`` traces the custom op instead."""

    @staticmethod
    def forward(ctx, tensors, static, prepared, *params):
        n = len(params) // 2
        out, inputs = _decode_impl(list(params[:n]), list(params[n:]), *tensors, *static, packed=prepared)
        if any(ctx.needs_input_grad[3:]):
            ctx.tensors, ctx.static = tensors, static
            ctx.packed = inputs.packed_params  # the backward reuses the packing and the tables
            ctx.save_for_backward(*params)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        params = ctx.saved_tensors  # autograd checks they were not modified since the forward
        n = len(params) // 2
        weights, biases = list(params[:n]), list(params[n:])
        flat = _decode_backward_impl(grad, weights, biases, *ctx.tensors, *ctx.static, packed=ctx.packed)
        ctx.packed = None
        grads_w, grads_b = unpack_gradients(flat, weights)
        return (None, None, None, *grads_w, *grads_b)


# ----------------------------------------------------------------------------- the backend
def crop_flags(layout: WeightLayout) -> int:
    """bit 0: some layer is smaller than k×k (crop needed); bit 1: one of those uses max pooling."""
    k = layout.kernel_size
    cropped = [l for l in layout.layers if l.size < k]
    return (1 if cropped else 0) | (2 if any(l.crop == "max" for l in cropped) else 0)


class TritonBackend:
    """Triton decoder (forward and backward). See the module docstring for its settings."""

    name = BACKEND_NAME

    def __init__(self, atomic: Optional[bool] = None, memory_budget_mb: Optional[int] = None,
                 first_layer: Optional[str] = None, schedule: Optional[str] = None):
        self.atomic = atomic
        self.memory_budget_mb = memory_budget_mb
        self.first_layer = first_layer
        self.schedule = schedule
        self._layout_args = LayoutCache()  # per-layout constant arguments (see _layout_arguments)

    # Settings: an attribute set on the object wins over the environment variable.
    def _atomic(self) -> bool:
        return self.atomic if self.atomic is not None else env_flag("NERN_FAST_TRITON_ATOMICS", False)

    @staticmethod
    def _megabytes(name: str, default: int) -> int:
        value = os.environ.get(name, "").strip()
        try:
            return int(value) * _MB if value else default * _MB
        except ValueError:
            raise ValueError(f"{name}='{value}' is not a whole number of megabytes") from None

    def _memory_budget(self) -> int:
        if self.memory_budget_mb is not None:
            return int(self.memory_budget_mb) * _MB
        return self._megabytes("NERN_FAST_TRITON_BWD_MEMORY_MB", 1024)

    def _kernel_precision(self, precision: str) -> str:
        if precision != "fp32":
            return precision
        dot = os.environ.get("NERN_FAST_TRITON_FP32_DOT", "ieee").strip().lower() or "ieee"
        if dot not in ("ieee", "tf32x3"):
            raise ValueError(f"NERN_FAST_TRITON_FP32_DOT='{dot}' is not 'ieee' or 'tf32x3'")
        return "fp32" if dot == "ieee" else "fp32x3"

    def _first_layer(self) -> str:
        mode = self.first_layer or os.environ.get("NERN_FAST_TRITON_FIRST_LAYER", "auto").strip() or "auto"
        if mode not in FIRST_LAYER_MODES:
            raise ValueError(f"NERN_FAST_TRITON_FIRST_LAYER='{mode}' is not one of {FIRST_LAYER_MODES}")
        return mode

    def _schedule(self) -> str:
        mode = self.schedule or os.environ.get("NERN_FAST_TRITON_SCHEDULE", "auto").strip() or "auto"
        if mode not in SCHEDULES:
            raise ValueError(f"NERN_FAST_TRITON_SCHEDULE='{mode}' is not one of {SCHEDULES}")
        return mode

    def unavailable_reason(self, request: DecodeRequest) -> Optional[str]:
        # Plain attribute checks only: dynamo traces this inside torch.compile(fullgraph=True).
        if request.device_type == "cpu":
            if not INTERPRETED:
                return ("CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1 set before "
                        "importing nern_fast, for tests); move the predictor to CUDA")
            if not request.explicit:
                return ("the Triton interpreter is for tests: on CPU name backend='triton' explicitly "
                        "(auto uses a compiled backend)")
            if INTERPRETER_PROBLEM is not None:
                return INTERPRETER_PROBLEM
        elif request.device_type != "cuda":
            return (f"device type '{request.device_type}' is not supported (CUDA, or CPU under the "
                    f"interpreter)")
        if request.dtype != torch.float32:
            return (f"parameters must be float32, got {request.dtype}; use the eager backend for other "
                    f"dtypes")
        if request.hidden > MAX_HIDDEN:
            return f"hidden size {request.hidden} > {MAX_HIDDEN} is not supported (scratch grows with H)"
        if request.kernel_size > MAX_KERNEL_SIZE:
            return f"kernel size {request.kernel_size} > {MAX_KERNEL_SIZE} is not supported"
        if request.precision not in REQUEST_PRECISIONS:
            return f"precision '{request.precision}' is not supported"
        return None

    @staticmethod
    def _layout_key(layout: WeightLayout, encoding, device: torch.device) -> tuple:
        return (id(layout), encoding.kind, encoding.levels, encoding.base, tuple(encoding.gauss_scale),
                str(device))

    def _layout_arguments(self, layout: WeightLayout, encoding, device: torch.device) -> tuple:
        """(layout tensors, kernel_size, num_kernels, num_weights, crop_flags, ffn) of a layout, kept
        per (layout, encoding, device)."""
        return self._layout_args.get(layout, self._layout_key(layout, encoding, device),
                                     lambda: self._build_layout_arguments(layout, encoding, device))

    @staticmethod
    def _build_layout_arguments(layout: WeightLayout, encoding, device: torch.device) -> tuple:
        t = layout.tensors(device)
        return ((t.kernel_offsets, t.weight_offsets, t.meta, t.coord_rows, t.pos_layer, t.pos_filter,
                 t.pos_channel, encoding.kernel_table(device)),
                (layout.kernel_size, layout.num_kernels, layout.num_weights, crop_flags(layout),
                 encoding.kind == "ffn"))

    def prepare(self, weights, biases, layout: WeightLayout, encoding, precision) -> PackedParameters:
        """The parameters packed as the kernels read them, made once for several decodes of
        ``layout`` from these parameters while their values do not change — the layer decodes of one
        on-demand forward — instead of at every call::

            prepared = backend.prepare(weights, biases, layout, encoding, precision)
            for rows, layers in per_layer_calls:
                backend.decode(weights, biases, layout, encoding, rows, precision, prepared=prepared,
                               layers=layers)

        The separable first-layer tables are built by the first decode that needs them and kept in
        the set for the next decodes with the same layer range (one range's tables at a time: a call
        for another range replaces them, so decodes layer by layer never hold the whole network's).
        A call checks that the prepared set belongs to the same parameter tensors (identity and
        storage) and precision; their values are the caller's promise (an in-place update needs a
        new ``prepare``; a CUDA graph that captured ``prepare`` refreshes the set in place).
        """
        device = weights[0].device
        tensors, static = self._layout_arguments(layout, encoding, device)
        inputs = make_launch_inputs(list(weights), list(biases), None, *tensors, *static,
                                    self._kernel_precision(precision))
        with torch.no_grad(), _on_device(device):
            return inputs.prepare()

    def _range_arguments(self, layout: WeightLayout, encoding, device: torch.device, span: LayerRange) -> tuple:
        """The layout arguments of a call whose rows all lie in the layers of ``span``: the same
        but for the filter and channel positions (those layers' only) and the per-layer table
        offsets in ``meta`` (rebased to them), so that its separable first-layer tables hold
        L + Σ C_out + Σ C_in rows of those layers instead of the whole network's (on a ResNet-56 at
        H=280 with local normalisation: 4.4 MB, more than its conv weights). Kept per range."""
        tensors, static = self._layout_arguments(layout, encoding, device)
        if span.is_whole:
            return tensors, static
        key = self._layout_key(layout, encoding, device) + (span.layers.start, span.layers.stop)
        return self._layout_args.get(layout, key, lambda: self._build_range_arguments(tensors, static, span))

    @staticmethod
    def _build_range_arguments(tensors: tuple, static: tuple, span: LayerRange) -> tuple:
        koff, woff, meta, coord, pos_l, pos_f, pos_c, table = tensors
        (f0, f1), (c0, c1) = span.filters, span.channels
        meta = meta.clone()
        meta[:, 6] -= f0  # table rows of the range's filters / channels start at 0
        meta[:, 7] -= c0
        # Layers outside the range: kernel_coords reads their rows from table row 0 (slices, not a
        # mask: nothing here may synchronise, a CUDA graph capture can be the first call of a range).
        meta[:span.layers.start, 6:8] = -1
        meta[span.layers.stop:, 6:8] = -1
        return (koff, woff, meta, coord, pos_l, pos_f[f0:f1], pos_c[c0:c1], table), static

    bounded_workspace = True  # decode(workspace_bytes=...): the chunked forward's chunk budget
    takes_layer_range = True  # decode(layers=range(a, b)): every row lies in layers a..b-1

    def decode(self, weights, biases, layout: WeightLayout, encoding, rows, precision,
               prepared: Optional[PackedParameters] = None, workspace_bytes: Optional[int] = None,
               layers: Optional[range] = None) -> torch.Tensor:
        device = weights[0].device
        (koff, woff, meta, coord, pos_l, pos_f, pos_c, table), static = (
            self._layout_arguments(layout, encoding, device) if layers is None
            else self._range_arguments(layout, encoding, device, call_layer_range(layout, layers, rows)))
        if rows is not None:
            rows = rows.to(device=device, dtype=torch.long).contiguous()
        chunk_budget = (self._megabytes("NERN_FAST_TRITON_FWD_MEMORY_MB", 256) if workspace_bytes is None
                        else int(workspace_bytes))
        settings = (self._kernel_precision(precision), self._first_layer(), self._schedule(), self._atomic(),
                    self._memory_budget(), chunk_budget)
        tensors = (rows, koff, woff, meta, coord, pos_l, pos_f, pos_c, table)
        if torch.compiler.is_compiling():  # the custom op packs inside (a traced graph holds no set)
            return triton_decode(list(weights), list(biases), *tensors, *static, *settings)
        if prepared is not None and not prepared.serves((*weights, *biases), settings[0]):
            raise ValueError("the prepared parameters were made for other parameter tensors or another "
                             "precision; call prepare() again with these parameters")
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in (*weights, *biases)):
            # Nothing to differentiate: the autograd.Function's machinery is ~8 µs of host time.
            return _decode_impl(list(weights), list(biases), *tensors, *static, *settings, packed=prepared)[0]
        return _DecodeFunction.apply(tensors, static + settings, prepared, *weights, *biases)


def register() -> None:
    register_backend(TritonBackend(), priority=PRIORITY)
