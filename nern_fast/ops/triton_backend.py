"""The ``triton`` backend: fused decode kernels (``nern_fast.kernels``) behind torch.library ops.

Three tiers (DESIGN.md): the Triton kernels -> the launchers below (check inputs, pick a launch
configuration, allocate, launch) -> two ``torch.library`` custom ops, ``nern_fast::triton_decode``
and ``nern_fast::triton_decode_backward``, tied together with ``register_autograd`` so that autograd
and ``torch.compile(fullgraph=True)`` see one opaque, differentiable op.

Which calls it takes: CUDA tensors (chosen by ``auto``); CPU tensors only under the Triton
interpreter (``TRITON_INTERPRET=1``, set before triton is imported) and only when the call names
the backend (tests). float32 parameters, hidden size <= 2048, kernel size <= 8.

Settings (environment variables, read at each call; the first three can also be set as attributes
``atomic``, ``memory_budget_mb``, ``first_layer`` of ``nern_fast.ops.get_backend("triton")``):
  NERN_FAST_TRITON_ATOMICS=1          weight gradients by atomic adds (faster, not deterministic)
  NERN_FAST_TRITON_BWD_MEMORY_MB=1024 memory for the backward's per-program partials and scratch
  NERN_FAST_TRITON_FIRST_LAYER=auto   "separable" | "direct" | "auto" (timed per configuration)
  NERN_FAST_TRITON_AUTOTUNE=1         0: take the first candidate configuration, time nothing
  NERN_FAST_TRITON_FP32_DOT=ieee      tf32x3: the fp32 mode's products as three tf32 products
  NERN_FAST_TRITON_TUNE_LOG=1         print every timed candidate and the choice (stderr)
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence

import torch
import triton  # a missing triton makes register() fail with ModuleNotFoundError: recorded, not fatal
from triton.runtime.interpreter import InterpretedFunction

from nern_fast.kernels import decode_bwd, decode_fwd

from ..layout import WeightLayout
from .dispatch import DecodeRequest, register_backend

BACKEND_NAME = "triton"
PRIORITY = 10
MAX_HIDDEN = 2048
MAX_KERNEL_SIZE = 8  # k² <= 64 output columns per row
# Precision of the kernels' dots. "fp32x3" is the fp32 mode computed with three tf32 tensor-core
# products per fp32 product (near-fp32 accuracy, tensor-core speed); only when
# NERN_FAST_TRITON_FP32_DOT=tf32x3 is set: fp32 means IEEE by default.
PRECISION_CODES = {"fp32": 0, "tf32": 1, "bf16": 2, "fp32x3": 3}
REQUEST_PRECISIONS = ("fp32", "tf32", "bf16")
FIRST_LAYER_MODES = ("auto", "separable", "direct")

# Whether triton was imported in interpreter mode (decided by TRITON_INTERPRET at import time).
INTERPRETED = isinstance(decode_fwd.decode_fwd_kernel, InterpretedFunction)
_INTERPRETER_PROGRAMS = 3  # "SMs" under the interpreter: several programs, several tiles each


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------- call description
@dataclass(frozen=True)
class DecodeShape:
    """Everything about a call that shapes the kernels (compile-time constants and sizes)."""

    rows: int  # R: kernels decoded (full: all of them)
    subset: bool
    hidden: int  # H
    num_hidden: int  # NH = num_blocks - 2
    enc_size: int  # E = 6·levels
    levels: int
    kernel_size: int  # k
    ffn: bool
    permuted: bool
    crop: bool  # some layer has s < k
    has_max: bool  # some layer with s < k uses max pooling
    precision: str
    f64: bool
    num_layers: int
    num_filters: int  # Σ C_out (rows of the filter table)
    num_channels: int  # Σ C_in

    @property
    def k2(self) -> int:
        return self.kernel_size ** 2

    @property
    def k2_pad(self) -> int:
        return max(16, triton.next_power_of_2(self.k2))

    @property
    def precision_code(self) -> int:
        return PRECISION_CODES[self.precision]

    @property
    def enc_stride(self) -> int:  # E_S: padded row length of W1 and of the encoding scratch
        return _round16(self.enc_size)

    @property
    def hidden_stride(self) -> int:  # H_S: padded row length of hidden/last weights and activations
        return _round16(self.hidden)

    @property
    def slot_size(self) -> int:
        """Values of one weight-gradient partial (see :func:`slot_layout`)."""
        return slot_layout(self.hidden, self.enc_size, self.num_hidden, self.k2)[-1]

    @property
    def table_rows(self) -> int:
        return self.num_layers + self.num_filters + self.num_channels

    @property
    def scratch_dtype(self) -> torch.dtype:
        if self.f64:
            return torch.float64
        if self.precision == "bf16" and not INTERPRETED:
            return torch.bfloat16  # activations are bf16 operands of the next layer anyway
        return torch.float32

    @property
    def acc_dtype(self) -> torch.dtype:
        return torch.float64 if self.f64 else torch.float32


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


def slot_layout(hidden: int, enc_size: int, num_hidden: int, k2: int) -> tuple[int, ...]:
    """Offsets of W1, W_hidden, W_last, b1, b_hidden, b_last and the total in a gradient slot.

    Rows are padded as the kernels read the weights: W1 (H, E_S), W_hidden (NH, H, H_S),
    W_last (k², H_S), b1 (H_S), b_hidden (NH, H_S), b_last (K2P); every offset is a multiple of 16.
    """
    e_s, h_s = _round16(enc_size), _round16(hidden)
    k2p = max(16, triton.next_power_of_2(k2))
    o_wh = hidden * e_s
    o_wl = o_wh + num_hidden * hidden * h_s
    o_b1 = o_wl + k2 * h_s
    o_bh = o_b1 + h_s
    o_bl = o_bh + num_hidden * h_s
    return 0, o_wh, o_wl, o_b1, o_bh, o_bl, o_bl + k2p


def unpack_gradients(flat: torch.Tensor, weights: Sequence[torch.Tensor]) -> tuple[list, list]:
    """A gradient slot -> per-parameter gradients shaped like the weights and biases."""
    h, e = weights[0].shape
    nh, k2 = len(weights) - 2, weights[-1].shape[0]
    e_s, h_s = _round16(e), _round16(h)
    o_w1, o_wh, o_wl, o_b1, o_bh, o_bl, _ = slot_layout(h, e, nh, k2)

    def matrix(offset, rows, stride, cols):
        m = flat[offset:offset + rows * stride].view(rows, stride)
        return m if stride == cols else m[:, :cols].contiguous()

    grads_w = ([matrix(o_w1, h, e_s, e)] + [matrix(o_wh + i * h * h_s, h, h_s, h) for i in range(nh)]
               + [matrix(o_wl, k2, h_s, h)])
    grads_b = ([flat[o_b1:o_b1 + h]] + [flat[o_bh + i * h_s:o_bh + i * h_s + h] for i in range(nh)]
               + [flat[o_bl:o_bl + k2]])
    return grads_w, grads_b


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes of one launch: BM rows per tile, BN output / BK reduction columns per chunk."""

    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int
    programs_per_sm: int
    separable: bool

    def describe(self) -> str:
        return (f"BM={self.bm} BN={self.bn} BK={self.bk} warps={self.num_warps} "
                f"stages={self.num_stages} programs/SM={self.programs_per_sm} "
                f"first_layer={'separable' if self.separable else 'direct'}")


def _tile_candidates(kind: str, shape: DecodeShape) -> list[tuple]:
    """(BM, BN, BK, warps, stages, programs/SM), most likely best first (the default).

    Chosen from sm_90 compiles of these kernels (ptxas register/spill counts, see kernels/README.md):
    the forward candidates compile without spills (separable first layer); backward ones spill a
    few dozen bytes per thread (more with the max crop).
    """
    if INTERPRETED:
        return [(64, 64, 64, 4, 1, 1)]
    big = shape.hidden >= 768
    if shape.precision == "fp32":  # IEEE fp32: FMA dots, no tensor cores; operands live in registers
        if kind == "fwd":
            return [(64, 64, 32, 4, 2, 2), (32, 64, 32, 4, 2, 4), (128, 64, 16, 8, 2, 1)]
        return [(32, 64, 32, 4, 1, 2), (64, 64, 16, 8, 1, 1)]
    if shape.precision == "fp32x3":  # the split operands need registers: smaller accumulators
        if kind == "fwd":
            return [(128, 64, 32, 8, 3, 1), (128, 128, 16, 8, 3, 1), (64, 64, 32, 4, 3, 2)]
        return [(64, 64, 32, 4, 2, 2), (128, 64, 32, 8, 2, 1)]
    if shape.precision == "tf32":
        if kind == "fwd":
            if big:
                return [(128, 128, 32, 8, 3, 1), (128, 256, 32, 8, 3, 1), (64, 256, 32, 8, 3, 1)]
            return [(128, 128, 32, 8, 3, 1), (64, 128, 32, 4, 3, 2), (64, 64, 32, 4, 3, 2)]
        return [(64, 64, 32, 4, 2, 2), (128, 64, 32, 8, 2, 1)]
    if kind == "fwd":  # bf16
        if big:
            return [(128, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 1), (64, 256, 64, 8, 3, 1)]
        return [(128, 128, 64, 8, 3, 1), (64, 128, 64, 4, 3, 2), (64, 64, 64, 4, 3, 2)]
    return [(128, 64, 64, 8, 2, 1), (128, 128, 64, 8, 2, 1), (64, 64, 64, 4, 2, 2)]


def candidate_configs(kind: str, shape: DecodeShape, first_layer: str = "auto") -> list[LaunchConfig]:
    """Launch configurations worth timing for ``kind`` ("fwd" or "bwd") on this call."""
    if first_layer not in FIRST_LAYER_MODES:
        raise ValueError(f"first_layer '{first_layer}' is not one of {FIRST_LAYER_MODES}")
    if shape.ffn and first_layer == "separable":
        raise ValueError("the ffn encoding mixes the three indices inside every sine: its first layer "
                         "is not separable; use first_layer='direct' or 'auto'")
    modes = ([True, False] if first_layer == "auto" else [first_layer == "separable"])
    if shape.ffn:
        modes = [False]
    # Chunks wider than the (power-of-two-rounded) hidden size or rows than the call has only waste.
    cap_h = max(16, triton.next_power_of_2(shape.hidden))
    cap_m = max(16, triton.next_power_of_2(max(shape.rows, 1)))
    out, seen = [], set()
    for bm, bn, bk, warps, stages, pps in _tile_candidates(kind, shape):
        tile = (min(bm, cap_m), min(bn, cap_h), min(bk, cap_h), warps, stages, pps)
        for separable in modes:
            if (tile, separable) not in seen:
                seen.add((tile, separable))
                out.append(LaunchConfig(*tile, separable=separable))
    return out


# ----------------------------------------------------------------------------- tuning
_TUNED: dict[tuple, LaunchConfig] = {}
_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def _device_key(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


def _time_ms(fn: Callable[[], None]) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=3, rep=15)


def tuning_enabled(device: torch.device) -> bool:
    """Time candidates on CUDA unless NERN_FAST_TRITON_AUTOTUNE=0 (never under the interpreter)."""
    return not INTERPRETED and device.type == "cuda" and _env_flag("NERN_FAST_TRITON_AUTOTUNE", True)


def choose_config(kind: str, shape: DecodeShape, device: torch.device, first_layer: str,
                  run: Callable[[LaunchConfig], None], tune: Optional[bool] = None,
                  timer: Callable[[Callable[[], None]], float] = _time_ms) -> LaunchConfig:
    """The fastest candidate for (kind, shape, device), timed once per process and remembered.

    Without tuning (interpreter, CPU, NERN_FAST_TRITON_AUTOTUNE=0) the first candidate is taken.
    Candidates that fail to compile or launch (e.g. out of shared memory) are skipped.
    """
    candidates = candidate_configs(kind, shape, first_layer)
    if tune is None:
        tune = tuning_enabled(device)
    if len(candidates) == 1 or not tune:
        return candidates[0]
    rows_bucket = max(0, round(math.log2(max(shape.rows, 1)) / 2))  # powers of 4
    key = (kind, _device_key(device), replace(shape, rows=rows_bucket), first_layer)
    if key not in _TUNED:
        log = _env_flag("NERN_FAST_TRITON_TUNE_LOG", False)
        timings = {}
        for config in candidates:
            try:
                timings[config] = timer(lambda: run(config))
            except Exception as exc:  # a candidate the device cannot run: skip it
                timings[config] = float("inf")
                if log:
                    print(f"[nern_fast.triton] {kind} {config.describe()}: failed ({exc})", file=sys.stderr)
        best = min(timings, key=timings.get)
        if timings[best] == float("inf"):
            raise RuntimeError(f"no Triton launch configuration runs the {kind} decode on {device} "
                               f"(hidden {shape.hidden}, precision {shape.precision}); use another backend")
        if log:
            for config, ms in sorted(timings.items(), key=lambda kv: kv[1]):
                print(f"[nern_fast.triton] {kind} H={shape.hidden} {shape.precision} rows={shape.rows}: "
                      f"{ms:9.4f} ms  {config.describe()}", file=sys.stderr)
        _TUNED[key] = best
    return _TUNED[key]


def tuned_configs() -> dict:
    """What the tuner chose so far: {(kind, device, shape, first_layer): LaunchConfig}."""
    return dict(_TUNED)


# ----------------------------------------------------------------------------- launch inputs
@dataclass
class LaunchInputs:
    """Checked, launch-ready tensors of one call."""

    shape: DecodeShape
    weights: List[torch.Tensor]
    biases: List[torch.Tensor]
    rows: Optional[torch.Tensor]
    kernel_offsets: torch.Tensor
    weight_offsets: torch.Tensor
    meta: torch.Tensor
    coord_rows: Optional[torch.Tensor]
    pos_layer: torch.Tensor
    pos_filter: torch.Tensor
    pos_channel: torch.Tensor
    enc_table: torch.Tensor
    num_weights: int

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    def packed_parameters(self) -> list[torch.Tensor]:
        """[W1 (H, E_S), b1, W_hidden (NH, H, H_S), b_hidden (NH, H), W_last (k², H_S), b_last].

        Rows zero-padded to multiples of 16 values so that the kernels' loads vectorise (and, for
        bf16, can be staged asynchronously); the hidden layers in one buffer (the kernel loops over
        them); bf16 precision keeps bf16 copies of the hidden weights (half the memory traffic).
        """
        shape = self.shape
        w1, wl = self.weights[0], self.weights[-1]
        if shape.enc_stride != shape.enc_size:
            w1 = torch.nn.functional.pad(w1, (0, shape.enc_stride - shape.enc_size))
        if shape.hidden_stride != shape.hidden:
            wl = torch.nn.functional.pad(wl, (0, shape.hidden_stride - shape.hidden))
        if shape.num_hidden:
            wh = torch.stack(self.weights[1:-1])
            if shape.hidden_stride != shape.hidden:
                wh = torch.nn.functional.pad(wh, (0, shape.hidden_stride - shape.hidden))
            if shape.precision == "bf16" and not INTERPRETED and not shape.f64:
                wh = wh.to(torch.bfloat16)
            bh = torch.stack(self.biases[1:-1])
        else:  # num_blocks == 2: never read, any valid pointer
            wh, bh = w1, self.biases[0]
        if shape.precision == "tf32" and not INTERPRETED:
            w1, wh, wl = (_round_to_tf32(w) for w in (w1, wh, wl))
        return [w1, self.biases[0], wh, bh, wl, self.biases[-1]]


def _round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """A copy rounded to the nearest tf32 values (ties away from zero), as the kernels round their
    own operands: the tensor cores then truncate nothing."""
    return ((t.view(torch.int32) + 0x1000) & -8192).view(torch.float32)


def make_launch_inputs(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                       rows: Optional[torch.Tensor], kernel_offsets: torch.Tensor,
                       weight_offsets: torch.Tensor, meta: torch.Tensor, coord_rows: Optional[torch.Tensor],
                       pos_layer: torch.Tensor, pos_filter: torch.Tensor, pos_channel: torch.Tensor,
                       enc_table: torch.Tensor, kernel_size: int, num_kernels: int, num_weights: int,
                       crop_flags: int, ffn: bool, precision: str) -> LaunchInputs:
    """Check devices, dtypes, shapes and contiguity before anything is launched."""
    weights, biases = list(weights), list(biases)
    if len(weights) < 2 or len(weights) != len(biases):
        raise ValueError(f"expected matching lists of >= 2 weights and biases, got {len(weights)} and "
                         f"{len(biases)}")
    if precision not in PRECISION_CODES:
        raise ValueError(f"precision '{precision}' is not one of {tuple(PRECISION_CODES)}")
    device, dtype = weights[0].device, weights[0].dtype
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("the Triton kernels got CPU tensors but triton was not imported in interpreter "
                           "mode; set TRITON_INTERPRET=1 before importing nern_fast, or use CUDA tensors")
    allowed = (torch.float32, torch.float64) if INTERPRETED else (torch.float32,)
    if dtype not in allowed:
        raise ValueError(f"the Triton decoder needs float32 parameters, got {dtype}"
                         + ("" if INTERPRETED else " (float64 only under the interpreter)"))
    hidden = weights[0].shape[0]
    levels = enc_table.shape[0] // 3 if ffn else enc_table.shape[0]
    enc_size = 6 * levels
    k2 = kernel_size ** 2
    expected = [(hidden, enc_size)] + [(hidden, hidden)] * (len(weights) - 2) + [(k2, hidden)]
    for i, (w, b, shp) in enumerate(zip(weights, biases, expected)):
        if tuple(w.shape) != shp or tuple(b.shape) != (shp[0],):
            raise ValueError(f"MLP layer {i}: expected weight {shp} and bias ({shp[0]},), got "
                             f"{tuple(w.shape)} and {tuple(b.shape)}")
        for t, what in ((w, "weight"), (b, "bias")):
            if t.device != device or t.dtype != dtype:
                raise ValueError(f"MLP layer {i} {what} is {t.dtype} on {t.device}; layer 0 weight is "
                                 f"{dtype} on {device}; use one dtype and device for all parameters")
            if not t.is_contiguous():
                raise ValueError(f"MLP layer {i} {what} is not contiguous (strides {t.stride()}); pass "
                                 f"contiguous parameters (.contiguous())")
    if not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} is outside 1..{MAX_HIDDEN} supported by the Triton decoder")
    if not 1 <= kernel_size <= MAX_KERNEL_SIZE:
        raise ValueError(f"kernel size {kernel_size} is outside 1..{MAX_KERNEL_SIZE} supported by the "
                         f"Triton decoder")
    layout_tensors = {"kernel_offsets": (kernel_offsets, torch.int64),
                      "weight_offsets": (weight_offsets, torch.int64), "meta": (meta, torch.int32),
                      "pos_layer": (pos_layer, torch.float32), "pos_filter": (pos_filter, torch.float32),
                      "pos_channel": (pos_channel, torch.float32), "enc_table": (enc_table, torch.float32)}
    if coord_rows is not None:
        layout_tensors["coord_rows"] = (coord_rows, torch.int64)
    if rows is not None:
        layout_tensors["rows"] = (rows, torch.int64)
    for name, (t, want) in layout_tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the parameters are on {device}; build the "
                             f"layout tensors with layout.tensors(device)")
        if t.dtype != want:
            raise ValueError(f"{name} must be {want}, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    num_layers = meta.shape[0]
    if rows is not None and rows.dim() != 1:
        raise ValueError(f"rows must be 1-D flat kernel indices, got shape {tuple(rows.shape)}")
    shape = DecodeShape(
        rows=int(rows.shape[0]) if rows is not None else num_kernels, subset=rows is not None,
        hidden=hidden, num_hidden=len(weights) - 2, enc_size=enc_size, levels=levels,
        kernel_size=kernel_size, ffn=ffn, permuted=coord_rows is not None, crop=bool(crop_flags & 1),
        has_max=bool(crop_flags & 2), precision=precision, f64=dtype == torch.float64,
        num_layers=num_layers, num_filters=int(pos_filter.shape[0]),
        num_channels=int(pos_channel.shape[0]))
    return LaunchInputs(shape, weights, biases, rows, kernel_offsets, weight_offsets, meta, coord_rows,
                        pos_layer, pos_filter, pos_channel, enc_table, num_weights)


# ----------------------------------------------------------------------------- launchers
def _table_tiles() -> tuple[int, int, int, int]:
    """(BT, BN, BK, warps) of the table kernel (small: a few thousand rows)."""
    return (32, 32, 32, 4) if INTERPRETED else (64, 64, 32, 4)


def launch_first_layer_tables(inputs: LaunchInputs, w1: torch.Tensor) -> torch.Tensor:
    """Separable first layer: rows [0, L) layer terms (+ b1), then filter, then channel terms.
    ``w1`` is the padded W1 (H, E_S)."""
    shape = inputs.shape
    h_s = shape.hidden_stride
    tables = torch.empty((shape.table_rows, h_s), device=inputs.device, dtype=shape.acc_dtype)
    bt, bn, bk, warps = _table_tiles()
    grid = (triton.cdiv(shape.table_rows, bt), triton.cdiv(h_s, bn))
    decode_fwd.first_layer_tables_kernel[grid](
        tables, shape.table_rows, shape.num_layers, shape.num_filters,
        inputs.pos_layer, inputs.pos_filter, inputs.pos_channel, inputs.enc_table, shape.levels,
        shape.enc_size, shape.enc_stride, w1, inputs.biases[0], shape.hidden, h_s,
        PRECISION=shape.precision_code, INTERPRET=INTERPRETED, F64=shape.f64,
        BT=bt, BN=bn, BK=bk, num_warps=warps)
    return tables


def _common_args(inputs: LaunchInputs, params: list, tables: Optional[torch.Tensor]) -> list:
    shape = inputs.shape
    dummy = inputs.kernel_offsets  # any valid pointer for arguments a specialisation never reads
    return [inputs.rows if inputs.rows is not None else dummy, shape.rows,
            inputs.kernel_offsets, inputs.weight_offsets, inputs.meta,
            inputs.coord_rows if inputs.coord_rows is not None else dummy,
            inputs.pos_layer, inputs.pos_filter, inputs.pos_channel, inputs.enc_table,
            shape.num_layers, max(0, math.ceil(math.log2(shape.num_layers))), shape.levels, shape.enc_size,
            *params, shape.hidden, shape.num_hidden,
            tables if tables is not None else inputs.pos_layer,
            shape.num_layers, shape.num_layers + shape.num_filters]


def _constexprs(shape: DecodeShape, config: LaunchConfig) -> dict:
    return dict(K=shape.kernel_size, K2P=shape.k2_pad, SUBSET=shape.subset, PERMUTED=shape.permuted,
                FFN=shape.ffn, SEPARABLE=config.separable, CROP=shape.crop,
                PRECISION=shape.precision_code, INTERPRET=INTERPRETED, F64=shape.f64,
                BM=config.bm, BN=config.bn, BK=config.bk, BS=min(config.bn, 64),
                num_warps=config.num_warps, num_stages=config.num_stages)


def _programs(shape: DecodeShape, config: LaunchConfig, device: torch.device) -> int:
    return max(1, min(triton.cdiv(shape.rows, config.bm), _num_sms(device) * config.programs_per_sm))


def run_forward(inputs: LaunchInputs, config: LaunchConfig, out: torch.Tensor) -> None:
    """One forward decode into ``out`` (flat buffer, or (R, k²) rows for a subset)."""
    shape = inputs.shape
    if shape.rows == 0:
        return
    params = inputs.packed_parameters()
    tables = launch_first_layer_tables(inputs, params[0]) if config.separable else None
    programs = _programs(shape, config, inputs.device)
    e_s, h_s = shape.enc_stride, shape.hidden_stride
    enc_width = 0 if config.separable else e_s
    scratch = torch.empty(programs * config.bm * (enc_width + 2 * h_s), device=inputs.device,
                          dtype=shape.scratch_dtype)
    scratch32 = torch.empty(programs * config.bm * shape.k2_pad if shape.crop else 1,
                            device=inputs.device, dtype=shape.acc_dtype)
    decode_fwd.decode_fwd_kernel[(programs,)](
        out, *_common_args(inputs, params, tables), scratch, scratch32, e_s, h_s,
        **_constexprs(shape, config))


def forward(inputs: LaunchInputs, first_layer: str = "auto") -> torch.Tensor:
    shape = inputs.shape
    if shape.subset:
        out = torch.empty((shape.rows, shape.k2), device=inputs.device, dtype=inputs.weights[0].dtype)
    else:
        out = torch.empty(inputs.num_weights, device=inputs.device, dtype=inputs.weights[0].dtype)
    config = choose_config("fwd", shape, inputs.device, first_layer, lambda c: run_forward(inputs, c, out))
    run_forward(inputs, config, out)
    return out


def _backward_programs(shape: DecodeShape, config: LaunchConfig, device: torch.device, atomic: bool,
                       memory_budget: int) -> int:
    """As many programs as the device runs at once, fewer if their partials + scratch would exceed
    ``memory_budget`` bytes (partials: one slot per program in deterministic mode)."""
    programs = _programs(shape, config, device)
    e_s, h_s = shape.enc_stride, shape.hidden_stride
    scratch = config.bm * (e_s + (shape.num_hidden + 3) * h_s) * shape.scratch_dtype.itemsize
    slot = 0 if atomic else shape.slot_size * shape.acc_dtype.itemsize
    fits = max(1, memory_budget // max(1, scratch + slot))
    return max(1, min(programs, fits))


def run_backward(inputs: LaunchInputs, grad: torch.Tensor, config: LaunchConfig, atomic: bool,
                 memory_budget: int) -> torch.Tensor:
    """Gradients of every MLP weight and bias as one slot (see :func:`slot_layout`)."""
    shape = inputs.shape
    slot_size = shape.slot_size
    if shape.rows == 0:
        return torch.zeros(slot_size, device=inputs.device, dtype=shape.acc_dtype)
    params = inputs.packed_parameters()
    tables = launch_first_layer_tables(inputs, params[0]) if config.separable else None
    programs = _backward_programs(shape, config, inputs.device, atomic, memory_budget)
    e_s, h_s = shape.enc_stride, shape.hidden_stride
    scratch = torch.empty(programs * config.bm * (e_s + (shape.num_hidden + 3) * h_s),
                          device=inputs.device, dtype=shape.scratch_dtype)
    scratch32 = torch.empty(programs * 2 * config.bm * shape.k2_pad if shape.has_max else 1,
                            device=inputs.device, dtype=shape.acc_dtype)
    if atomic:
        partials = torch.zeros(slot_size, device=inputs.device, dtype=shape.acc_dtype)
    else:
        partials = torch.empty(programs * slot_size, device=inputs.device, dtype=shape.acc_dtype)
    decode_bwd.decode_bwd_kernel[(programs,)](
        grad, *_common_args(inputs, params, tables), scratch, scratch32, e_s, h_s, partials, slot_size,
        HAS_MAX=shape.has_max, ATOMIC=atomic, **_constexprs(shape, config))
    if atomic:
        return partials
    if programs == 1:
        return partials
    out = torch.empty(slot_size, device=inputs.device, dtype=shape.acc_dtype)
    block = 1024
    decode_bwd.reduce_partials_kernel[(triton.cdiv(slot_size, block),)](
        partials, out, programs, slot_size, BLOCK=block, num_warps=4)
    return out


def backward(inputs: LaunchInputs, grad: torch.Tensor, first_layer: str = "auto", atomic: bool = False,
             memory_budget: int = 1 << 30) -> torch.Tensor:
    expected = (inputs.shape.rows, inputs.shape.k2) if inputs.shape.subset else (inputs.num_weights,)
    if tuple(grad.shape) != expected:
        raise ValueError(f"gradient of the decode has shape {tuple(grad.shape)}, expected {expected}")
    grad = grad.to(inputs.weights[0].dtype).contiguous()
    config = choose_config("bwd", inputs.shape, inputs.device, first_layer,
                           lambda c: run_backward(inputs, grad, c, False, memory_budget))
    return run_backward(inputs, grad, config, atomic, memory_budget)


# ----------------------------------------------------------------------------- torch.library ops
def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the parameters' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()



@torch.library.custom_op("nern_fast::triton_decode", mutates_args=())
def triton_decode(weights: List[torch.Tensor], biases: List[torch.Tensor], rows: Optional[torch.Tensor],
                  kernel_offsets: torch.Tensor, weight_offsets: torch.Tensor, meta: torch.Tensor,
                  coord_rows: Optional[torch.Tensor], pos_layer: torch.Tensor, pos_filter: torch.Tensor,
                  pos_channel: torch.Tensor, enc_table: torch.Tensor, kernel_size: int, num_kernels: int,
                  num_weights: int, crop_flags: int, ffn: bool, precision: str, first_layer: str,
                  atomic: bool, memory_budget: int) -> torch.Tensor:
    """Decode every kernel (flat buffer of ``num_weights``) or ``rows`` ((len(rows), k²))."""
    inputs = make_launch_inputs(weights, biases, rows, kernel_offsets, weight_offsets, meta, coord_rows,
                                pos_layer, pos_filter, pos_channel, enc_table, kernel_size, num_kernels,
                                num_weights, crop_flags, ffn, precision)
    with _on_device(inputs.device):
        return forward(inputs, first_layer)


@triton_decode.register_fake
def _triton_decode_fake(weights, biases, rows, kernel_offsets, weight_offsets, meta, coord_rows,
                        pos_layer, pos_filter, pos_channel, enc_table, kernel_size, num_kernels,
                        num_weights, crop_flags, ffn, precision, first_layer, atomic, memory_budget):
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
                           crop_flags: int, ffn: bool, precision: str, first_layer: str, atomic: bool,
                           memory_budget: int) -> torch.Tensor:
    """All weight and bias gradients, flattened (W1, W_hidden..., W_last, b1, b_hidden..., b_last)."""
    inputs = make_launch_inputs(weights, biases, rows, kernel_offsets, weight_offsets, meta, coord_rows,
                                pos_layer, pos_filter, pos_channel, enc_table, kernel_size, num_kernels,
                                num_weights, crop_flags, ffn, precision)
    with _on_device(inputs.device):
        return backward(inputs, grad, first_layer, atomic, memory_budget)


@triton_decode_backward.register_fake
def _triton_decode_backward_fake(grad, weights, biases, rows, kernel_offsets, weight_offsets, meta,
                                 coord_rows, pos_layer, pos_filter, pos_channel, enc_table, kernel_size,
                                 num_kernels, num_weights, crop_flags, ffn, precision, first_layer, atomic,
                                 memory_budget):
    h, e = weights[0].shape
    return weights[0].new_empty((slot_layout(h, e, len(weights) - 2, weights[-1].shape[0])[-1],))


_TENSOR_ARGS = ("rows", "kernel_offsets", "weight_offsets", "meta", "coord_rows", "pos_layer",
                "pos_filter", "pos_channel", "enc_table")
_STATIC_ARGS = ("kernel_size", "num_kernels", "num_weights", "crop_flags", "ffn", "precision",
                "first_layer", "atomic", "memory_budget")


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


# ----------------------------------------------------------------------------- the backend
def crop_flags(layout: WeightLayout) -> int:
    """bit 0: some layer is smaller than k×k (crop needed); bit 1: one of those uses max pooling."""
    k = layout.kernel_size
    cropped = [l for l in layout.layers if l.size < k]
    return (1 if cropped else 0) | (2 if any(l.crop == "max" for l in cropped) else 0)


_ENC_TABLES: dict[tuple, torch.Tensor] = {}


def encoding_table(encoding, device: torch.device) -> torch.Tensor:
    """basic: the frequencies (levels,); ffn: B (3·levels, 3) — float32, cached per device."""
    make = (lambda: encoding.ffn_matrix(device).contiguous()) if encoding.kind == "ffn" else (
        lambda: encoding.frequencies(device).contiguous())
    if torch.compiler.is_compiling():
        return make()
    key = (encoding.kind, encoding.levels, encoding.base, encoding.gauss_scale, str(device))
    if key not in _ENC_TABLES:
        _ENC_TABLES[key] = make()
    return _ENC_TABLES[key]


class TritonBackend:
    """Fused Triton decoder (forward and backward). See the module docstring for its settings."""

    name = BACKEND_NAME

    def __init__(self, atomic: Optional[bool] = None, memory_budget_mb: Optional[int] = None,
                 first_layer: Optional[str] = None):
        self.atomic = atomic
        self.memory_budget_mb = memory_budget_mb
        self.first_layer = first_layer

    # Settings: an attribute set on the object wins over the environment variable.
    def _atomic(self) -> bool:
        return self.atomic if self.atomic is not None else _env_flag("NERN_FAST_TRITON_ATOMICS", False)

    def _memory_budget(self) -> int:
        mb = self.memory_budget_mb
        if mb is None:
            mb = int(os.environ.get("NERN_FAST_TRITON_BWD_MEMORY_MB", "1024") or 1024)
        return int(mb) << 20

    def _kernel_precision(self, precision: str) -> str:
        if precision != "fp32":
            return precision
        dot = os.environ.get("NERN_FAST_TRITON_FP32_DOT", "ieee").strip().lower() or "ieee"
        if dot not in ("ieee", "tf32x3"):
            raise ValueError(f"NERN_FAST_TRITON_FP32_DOT='{dot}' is not 'ieee' or 'tf32x3'")
        return "fp32" if dot == "ieee" else "fp32x3"

    def _first_layer(self) -> str:
        mode = self.first_layer or os.environ.get("NERN_FAST_TRITON_FIRST_LAYER", "auto") or "auto"
        if mode not in FIRST_LAYER_MODES:
            raise ValueError(f"NERN_FAST_TRITON_FIRST_LAYER='{mode}' is not one of {FIRST_LAYER_MODES}")
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

    def decode(self, weights, biases, layout: WeightLayout, encoding, rows, precision) -> torch.Tensor:
        device = weights[0].device
        t = layout.tensors(device)
        if rows is not None:
            rows = rows.to(device=device, dtype=torch.long).contiguous()
        return triton_decode(list(weights), list(biases), rows, t.kernel_offsets, t.weight_offsets, t.meta,
                             t.coord_rows, t.pos_layer, t.pos_filter, t.pos_channel,
                             encoding_table(encoding, device), layout.kernel_size, layout.num_kernels,
                             layout.num_weights,
                             crop_flags(layout), encoding.kind == "ffn", self._kernel_precision(precision),
                             self._first_layer(),
                             self._atomic(), self._memory_budget())


def register() -> None:
    register_backend(TritonBackend(), priority=PRIORITY)
