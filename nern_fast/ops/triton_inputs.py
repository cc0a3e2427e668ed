"""What the Triton launchers get: the call's shape, its checked tensors and the packed parameters.

``make_launch_inputs`` checks devices, dtypes, shapes and contiguity once, before anything is
launched. ``LaunchInputs.packed()`` pads and converts the MLP weights into the layout the kernels
read (and holds the separable first-layer tables built from them). A forward hands its packed
parameters to its own backward (autograd guarantees the saved parameters are unchanged in
between). Reuse *across* calls is opt-in (``NERN_FAST_TRITON_PARAM_CACHE=1``): a set is reused
while the parameters are the same tensor objects with the same storage and autograd version
counter — which misses writes through ``.data`` (``torch.autograd.gradcheck`` and many optimizers
write that way), hence not the default; after such a write call :func:`clear_parameter_cache`.
"""
from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from triton.runtime.interpreter import InterpretedFunction

from nern_fast.kernels import decode_fwd

# Whether triton was imported in interpreter mode (decided by TRITON_INTERPRET at import time).
INTERPRETED = isinstance(decode_fwd.decode_fwd_kernel, InterpretedFunction)


def _interpreter_problem() -> Optional[str]:
    """Why this triton's interpreter cannot run the kernels here, or None. Triton 3.6's interpreter
    turns scalar arguments used as loop bounds into Python ints with ``int()`` of a 1-element array,
    which numpy refuses from 2.4 on; triton 3.8 runs them with numpy 2.4 (both checked)."""
    if not INTERPRETED:
        return None
    import numpy
    import triton

    def version(text: str) -> tuple:
        return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())
    if version(triton.__version__) < (3, 8) and version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter cannot run with numpy {numpy.__version__} "
                f"(int() of 1-element arrays, refused since numpy 2.4): pip install 'numpy<2.4' or "
                f"triton >= 3.8")
    return None


INTERPRETER_PROBLEM = _interpreter_problem()

# Whether packing makes the tf32/bf16 operand copies a GPU call uses. Under the interpreter it does
# not (the kernels compute in fp32 and emulate bf16 themselves); ``bench.decode_host_time
# --stub-triton`` turns it on to time a GPU call's host path on the CPU.
CONVERT_ON_PACK = not INTERPRETED

MAX_HIDDEN = 2048
MAX_KERNEL_SIZE = 8  # k² <= 64 output columns per row
# Precision of the kernels' dots. "fp32x3" is the fp32 mode computed with three tf32 tensor-core
# products per fp32 product (opt-in, see the backend's NERN_FAST_TRITON_FP32_DOT).
PRECISION_CODES = {"fp32": 0, "tf32": 1, "bf16": 2, "fp32x3": 3}


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division (triton.cdiv is a constexpr function: slow to call from Python)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def round16(n: int) -> int:
    return (n + 15) // 16 * 16


def env_flag(name: str, default: bool) -> bool:
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
        return max(16, next_power_of_2(self.k2))

    @property
    def precision_code(self) -> int:
        return PRECISION_CODES[self.precision]

    @property
    def enc_stride(self) -> int:  # E_S: padded row length of W1 and of the encoding scratch
        return round16(self.enc_size)

    @property
    def hidden_stride(self) -> int:  # H_S: padded row length of hidden/last weights and activations
        return round16(self.hidden)

    @property
    def slot_size(self) -> int:
        """Values of one weight-gradient partial (see :func:`slot_layout`)."""
        return slot_layout(self.hidden, self.enc_size, self.num_hidden, self.k2)[-1]

    @property
    def table_rows(self) -> int:
        return self.num_layers + self.num_filters + self.num_channels

    @property
    def search_steps(self) -> int:  # binary-search steps of layer_of: ceil(log2 L)
        return (self.num_layers - 1).bit_length()

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


def slot_layout(hidden: int, enc_size: int, num_hidden: int, k2: int) -> tuple[int, ...]:
    """Offsets of W1, W_hidden, W_last, b1, b_hidden, b_last and the total in a gradient slot.

    Rows are padded as the kernels read the weights: W1 (H, E_S), W_hidden (NH, H, H_S),
    W_last (k², H_S), b1 (H_S), b_hidden (NH, H_S), b_last (K2P); every offset is a multiple of 16.
    """
    e_s, h_s = round16(enc_size), round16(hidden)
    k2p = max(16, next_power_of_2(k2))
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
    e_s, h_s = round16(e), round16(h)
    o_w1, o_wh, o_wl, o_b1, o_bh, o_bl, _ = slot_layout(h, e, nh, k2)

    def matrix(offset, rows, stride, cols):
        m = flat[offset:offset + rows * stride].view(rows, stride)
        return m if stride == cols else m[:, :cols].contiguous()

    grads_w = ([matrix(o_w1, h, e_s, e)] + [matrix(o_wh + i * h * h_s, h, h_s, h) for i in range(nh)]
               + [matrix(o_wl, k2, h_s, h)])
    grads_b = ([flat[o_b1:o_b1 + h]] + [flat[o_bh + i * h_s:o_bh + i * h_s + h] for i in range(nh)]
               + [flat[o_bl:o_bl + k2]])
    return grads_w, grads_b


# ----------------------------------------------------------------------------- parameter cache
class _Fingerprint:
    """Identity, storage and version counter of tensors: equal while none of them was replaced,
    moved or modified in place (through autograd-visible operations)."""

    __slots__ = ("refs", "state")

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.refs = [weakref.ref(t) for t in tensors]
        self.state = [(t.data_ptr(), t._version) for t in tensors]

    def matches(self, tensors: Sequence[torch.Tensor], versions: bool = True) -> bool:
        """Same tensors with the same storage (and, with ``versions``, unmodified since)."""
        if len(tensors) != len(self.refs):
            return False
        for ref, (ptr, version), t in zip(self.refs, self.state, tensors):
            if ref() is not t or t.data_ptr() != ptr or (versions and t._version != version):
                return False
        return True


def cross_call_reuse() -> bool:
    """Whether packed parameters may be reused across calls (NERN_FAST_TRITON_PARAM_CACHE=1)."""
    return env_flag("NERN_FAST_TRITON_PARAM_CACHE", False)


def _cacheable(tensors: Sequence[torch.Tensor]) -> bool:
    if not cross_call_reuse() or torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False  # a graph must record the packing: its replays then read the live parameters
    # Inference tensors have no version counter; tensors of a graph being traced are not real.
    return not any(t.is_inference() for t in tensors)


@dataclass
class PackedParameters:
    """Kernel-ready parameters and, once built, the separable first-layer tables of one layout.

    ``prepared_for`` is set by ``TritonBackend.prepare``: such a set is handed to several calls
    (``decode(..., prepared=...)``) for the parameters it was packed from, with the precision it
    was packed for; its tables are built by the first call that needs them and kept for the next
    calls with the same layout tensors (one layer range's at a time).
    """

    params: list
    tables: Optional[tuple] = None  # (weak references to the layout tensors, tables)
    prepared_for: Optional[tuple] = None  # (_Fingerprint of the parameters, kernel precision)

    def serves(self, tensors: Sequence[torch.Tensor], precision: str) -> bool:
        """Whether this prepared set was packed from these parameters (same tensors and storage:
        the caller vouches for their values) for this kernel precision."""
        return (self.prepared_for is not None and self.prepared_for[1] == precision
                and self.prepared_for[0].matches(tensors, versions=False))

    def first_layer_tables(self, layout_tensors: Sequence[torch.Tensor],
                           build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tables for these layout tensors (immutable: a layout's cached metadata), built once."""
        if self.tables is not None and all(r() is t for r, t in zip(self.tables[0], layout_tensors)):
            return self.tables[1]
        tables = build()
        self.tables = ([weakref.ref(t) for t in layout_tensors], tables)
        return tables


_PARAM_CACHE: "OrderedDict[tuple, tuple[_Fingerprint, PackedParameters]]" = OrderedDict()
_PARAM_CACHE_SIZE = 2


def clear_parameter_cache() -> None:
    """Forget every packed parameter set (needed only after writes through ``.data``)."""
    _PARAM_CACHE.clear()


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
    packed_params: Optional[PackedParameters] = None  # packed once per call (or handed over)

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    def prefix(self, rows: int) -> "LaunchInputs":
        """The same call restricted to its first ``rows`` rows (what the tuner times on large calls:
        a full decode of R' < N rows decodes flat kernels 0..R'-1); shares the packed parameters."""
        if rows >= self.shape.rows:
            return self
        self.packed()
        shape = DecodeShape(**{**self.shape.__dict__, "rows": rows})
        sub = None if self.rows is None else self.rows[:rows]
        return LaunchInputs(**{**self.__dict__, "shape": shape, "rows": sub})

    def packed(self) -> PackedParameters:
        """The packed parameters of this call: packed at the first use (or handed over by the
        forward of this backward), or from the opt-in cross-call cache."""
        if self.packed_params is None:
            self.packed_params = self._cached_or_packed()
        return self.packed_params

    def _cached_or_packed(self) -> PackedParameters:
        tensors = self.weights + self.biases
        if not _cacheable(tensors):
            return PackedParameters(self._pack())
        key = (tuple(id(t) for t in tensors), self.shape.precision)
        entry = _PARAM_CACHE.get(key)
        if entry is not None and entry[0].matches(tensors):
            _PARAM_CACHE.move_to_end(key)
            return entry[1]
        packed = PackedParameters(self._pack())
        _PARAM_CACHE[key] = (_Fingerprint(tensors), packed)
        while len(_PARAM_CACHE) > _PARAM_CACHE_SIZE:
            _PARAM_CACHE.popitem(last=False)
        return packed

    def prepare(self) -> PackedParameters:
        """A fresh packed set to hand to several calls of these parameters (see
        :class:`PackedParameters`); never from, nor into, the cross-call cache."""
        return PackedParameters(self._pack(),
                                prepared_for=(_Fingerprint(self.weights + self.biases), self.shape.precision))

    def layout_tensors(self) -> list[torch.Tensor]:
        """What the separable tables depend on besides W1 and b1."""
        return [self.pos_layer, self.pos_filter, self.pos_channel, self.enc_table]

    def _pack(self) -> list[torch.Tensor]:
        """The kernels' parameter layout (see :func:`pack_parameters`); tf32 and bf16 conversions on
        accelerators only (the interpreter computes in fp32 and emulates bf16 itself)."""
        on_device = CONVERT_ON_PACK and not self.shape.f64
        return pack_parameters(self.weights, self.biases, self.shape.enc_stride, self.shape.hidden_stride,
                               round_tf32=on_device and self.shape.precision == "tf32",
                               bf16_hidden=on_device and self.shape.precision == "bf16")


def pack_parameters(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], enc_stride: int,
                    hidden_stride: int, round_tf32: bool = False,
                    bf16_hidden: bool = False) -> list[torch.Tensor]:
    """[W1 (H, E_S), b1, W_hidden (NH, H, H_S), b_hidden (NH, H), W_last (k², H_S), b_last].

    Rows zero-padded to ``enc_stride`` / ``hidden_stride`` values (multiples of 16) so that the
    kernels' loads vectorise (and, for bf16, can be staged asynchronously); the hidden layers in one
    buffer (the kernels loop over them). ``round_tf32``: the weight matrices rounded to the nearest
    tf32 values (the tensor cores then truncate nothing); ``bf16_hidden``: bf16 copies of the hidden
    weights (half the memory traffic). b1 and b_last are the parameters themselves.

    Every call pays this on the host, so it is a handful of ops whatever the depth: one concatenation
    of the H-long rows (hidden and last layers; tf32: of every matrix, for one rounding pass over
    all of them), one padding, one stack of the hidden biases — fp32 3 ops, bf16 4, tf32 7 (packing
    matrix by matrix took 4, 5 and 16).
    """
    with torch.no_grad():  # fresh copies: never part of an autograd graph
        w1 = weights[0]
        hidden, enc = w1.shape
        num_hidden = len(weights) - 2
        if round_tf32:  # one rounding pass over every matrix
            flat = _round_to_tf32(torch.cat([w.reshape(-1) for w in weights]))
            w1, rows = flat[:hidden * enc].view(hidden, enc), flat[hidden * enc:].view(-1, hidden)
        else:  # W1 as it is (no copy unless padded)
            rows = torch.cat(list(weights[1:]))
        # rows: every hidden layer's rows, then the last layer's (all H long)
        if enc_stride != enc:
            w1 = torch.nn.functional.pad(w1, (0, enc_stride - enc))
        if hidden_stride != hidden:
            rows = torch.nn.functional.pad(rows, (0, hidden_stride - hidden))
        n_wh = num_hidden * hidden
        wl = rows[n_wh:]
        if num_hidden:
            wh = rows[:n_wh].view(num_hidden, hidden, hidden_stride)
            if bf16_hidden:
                wh = wh.to(torch.bfloat16)
            bh = torch.stack(list(biases[1:-1]))
        else:  # num_blocks == 2: never read, any valid pointer
            wh, bh = w1, biases[0]
        return [w1.contiguous(), biases[0], wh.contiguous(), bh, wl.contiguous(), biases[-1]]


def _round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """A copy rounded to the nearest tf32 values (ties away from zero), as the kernels round their
    own operands: the tensor cores then truncate nothing. NaN stays NaN (the bit arithmetic alone
    carries a NaN with a full mantissa, such as CUDA's 0x7FFFFFFF, into the sign bit: -0.0)."""
    rounded = ((t.view(torch.int32) + 0x1000) & -8192).view(torch.float32)
    return torch.where(torch.isnan(t), t, rounded)


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
    w0 = weights[0]
    device, dtype = w0.device, w0.dtype
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("the Triton kernels got CPU tensors but triton was not imported in interpreter "
                           "mode; set TRITON_INTERPRET=1 before importing nern_fast, or use CUDA tensors")
    if dtype is not torch.float32 and not (INTERPRETED and dtype is torch.float64):
        raise ValueError(f"the Triton decoder needs float32 parameters, got {dtype}"
                         + ("" if INTERPRETED else " (float64 only under the interpreter)"))
    if dtype is torch.float64 and precision != "fp32":
        raise ValueError(f"float64 parameters decode in fp32 mode only (got precision '{precision}'): "
                         f"they exist for gradient checks")
    hidden = w0.shape[0]
    levels = enc_table.shape[0] // 3 if ffn else enc_table.shape[0]
    enc_size = 6 * levels
    k2 = kernel_size * kernel_size
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases)):
        shp = (hidden, enc_size) if i == 0 else ((k2, hidden) if i == last else (hidden, hidden))
        if w.shape != shp or b.shape != shp[:1]:
            raise ValueError(f"MLP layer {i}: expected weight {shp} and bias ({shp[0]},), got "
                             f"{tuple(w.shape)} and {tuple(b.shape)}")
        for t, what in ((w, "weight"), (b, "bias")):
            if t.device != device or t.dtype is not dtype:
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
    layout_tensors = (("kernel_offsets", kernel_offsets, torch.int64),
                      ("weight_offsets", weight_offsets, torch.int64), ("meta", meta, torch.int32),
                      ("pos_layer", pos_layer, torch.float32), ("pos_filter", pos_filter, torch.float32),
                      ("pos_channel", pos_channel, torch.float32), ("enc_table", enc_table, torch.float32),
                      ("coord_rows", coord_rows, torch.int64), ("rows", rows, torch.int64))
    for name, t, want in layout_tensors:
        if t is None:
            continue
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the parameters are on {device}; build the "
                             f"layout tensors with layout.tensors(device)")
        if t.dtype is not want:
            raise ValueError(f"{name} must be {want}, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if rows is not None and rows.dim() != 1:
        raise ValueError(f"rows must be 1-D flat kernel indices, got shape {tuple(rows.shape)}")
    shape = DecodeShape(
        rows=int(rows.shape[0]) if rows is not None else num_kernels, subset=rows is not None,
        hidden=hidden, num_hidden=len(weights) - 2, enc_size=enc_size, levels=levels,
        kernel_size=kernel_size, ffn=ffn, permuted=coord_rows is not None, crop=bool(crop_flags & 1),
        has_max=bool(crop_flags & 2), precision=precision, f64=dtype is torch.float64,
        num_layers=int(meta.shape[0]), num_filters=int(pos_filter.shape[0]),
        num_channels=int(pos_channel.shape[0]))
    return LaunchInputs(shape, weights, biases, rows, kernel_offsets, weight_offsets, meta, coord_rows,
                        pos_layer, pos_filter, pos_channel, enc_table, num_weights)
