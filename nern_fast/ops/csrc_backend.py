"""The ``csrc`` backend: the compiled extension ``nern_fast._C`` behind the dispatcher.

The extension registers three ops with torch.library (``torch.ops.nern_fast_C``):
``decode_forward`` (full flat buffer or subset rows), ``decode_backward`` (gradients of every MLP
weight and bias) and, on CPU, ``decode_forward_saving`` (the forward that also keeps the hidden
activations of layers 1..nb-2 for as many rows as a memory budget allows, so that the backward
skips recomputing them). This module loads it safely (a missing or broken build is a recorded
reason, never an import error), makes both forward ops differentiable (``register_autograd``) and
traceable by ``torch.compile`` (``register_fake``), and exposes them as the backend named
``"csrc"``.

The CPU decoder's bf16 mode multiplies bf16 operands with fp32 accumulation. Where the CPU has
bf16 matrix instructions (x86 AVX512-BF16 or AMX, Arm BF16) ATen's bf16 GEMMs do that fast;
elsewhere (e.g. an AVX2-only x86) they ran 20x slower than fp32 ones, so the decoder multiplies
the same bf16 values with fp32 GEMMs instead (:func:`cpu_bf16_gemm`; the op's internal precision
``"bf16_fp32_gemm"``). ``NERN_FAST_CPU_BF16_GEMM=native|fp32`` overrides the choice.

``NERN_FAST_CPU_SAVE_MB`` (default 1024) is the budget of the kept activations of one CPU decode
that will be differentiated; 0 turns keeping off (the backward then recomputes every tile). The kept
activations live in one reusable buffer (a fresh one per call paid ~80 ms of page faults on
ResNet-56); it stays allocated between calls until ``torch.ops.nern_fast_C.release_saved_buffer()``
(or is never kept with ``NERN_FAST_CPU_REUSE_SAVED=0``).
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Optional

import torch

from ..reference import matmul_precision
from ..layout import LayerRange
from .dispatch import DecodeRequest, call_layer_range, record_load_error, register_backend
from .layout_cache import LayoutCache

NAME = "csrc"
PRIORITY = 20
ENCODING_IDS = {"basic": 0, "ffn": 1}
MAX_KERNEL_SIZE = 7
DEFAULT_SAVE_MB = 1024
# Dispatch below the Autograd keys (what register_autograd's wrapper itself does under no_grad);
# private torch API, present in torch 2.11-2.14: without it every call takes the wrapper.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
REBUILD = "rebuild with `pip install --no-build-isolation -e .` (needs torch and a C++ compiler)"


def _load_extension():
    """(module, None) or (None, why it is unavailable)."""
    try:  # loading the library registers torch.ops.nern_fast_C
        ext = importlib.import_module("nern_fast._C")
    except ModuleNotFoundError as exc:
        if exc.name == "nern_fast._C":
            return None, f"the C++ extension nern_fast._C is not built; {REBUILD}"
        return None, f"the C++ extension nern_fast._C failed to load ({exc}); {REBUILD}"
    except ImportError as exc:
        return None, f"the C++ extension nern_fast._C failed to load ({exc}); {REBUILD}"
    except Exception as exc:  # a broken binary must not break `import nern_fast`
        return None, f"the C++ extension nern_fast._C failed to load ({type(exc).__name__}: {exc})"
    return ext, None


_EXT, _LOAD_ERROR = _load_extension()


def build_info() -> dict:
    """How the extension was built (``cuda_requested``, ``cuda_built``, ``cuda_note``, ...)."""
    if _EXT is None:
        return {"built": False, "reason": _LOAD_ERROR}
    return {"built": True, "with_cuda": bool(_EXT.WITH_CUDA), **json.loads(_EXT.BUILD_INFO)}


# ---------------------------------------------------------------------------- op registration
def _op_args(inputs):
    (weights, biases, meta, pos_layer, pos_filter, pos_channel, coord_rows, rows, table, encoding,
     kernel_size, num_kernels, num_weights, precision) = inputs[:14]  # (then workspace_bytes or save_rows)
    return dict(weights=weights, biases=biases, meta=meta, pos_layer=pos_layer, pos_filter=pos_filter,
                pos_channel=pos_channel, coord_rows=coord_rows, rows=rows, table=table,
                encoding=encoding, kernel_size=kernel_size, num_kernels=num_kernels,
                num_weights=num_weights, precision=precision)


def _decode_forward_fake(weights, biases, meta, pos_layer, pos_filter, pos_channel, coord_rows, rows,
                         table, encoding, kernel_size, num_kernels, num_weights, precision,
                         workspace_bytes=0):
    w = weights[0]
    if rows is None:
        return w.new_empty((num_weights,))
    return w.new_empty((rows.shape[0], kernel_size * kernel_size))


def _decode_backward_fake(grad, weights, biases, *rest):
    return [torch.empty_like(w) for w in weights], [torch.empty_like(b) for b in biases]


def _decode_forward_saving_fake(*args):
    out = _decode_forward_fake(*args[:-1])
    weights, precision, save_rows = args[0], args[13], args[14]
    w = weights[0]
    dtype = torch.bfloat16 if precision.startswith("bf16") else w.dtype
    return out, w.new_empty((len(weights) - 2, save_rows, w.shape[0]), dtype=dtype)


def _setup_context(ctx, inputs, output, activations=None):
    a = _op_args(inputs)
    ctx.num_blocks = len(a["weights"])
    ctx.has_coord_rows = a["coord_rows"] is not None
    ctx.has_rows = a["rows"] is not None
    ctx.static = (a["encoding"], a["kernel_size"], a["num_kernels"], a["num_weights"], a["precision"])
    optional = [t for t in (a["coord_rows"], a["rows"], activations) if t is not None]
    ctx.save_for_backward(*a["weights"], *a["biases"], a["meta"], a["pos_layer"], a["pos_filter"],
                          a["pos_channel"], a["table"], *optional)


def _setup_context_saving(ctx, inputs, output):
    activations = output[1]
    _setup_context(ctx, inputs[:-1], output[0], activations)
    ctx.mark_non_differentiable(activations)
    ctx.set_materialize_grads(False)  # no zero gradient of the kept activations


def _run_backward(ctx, grad):
    saved = list(ctx.saved_tensors)
    nb = ctx.num_blocks
    weights, biases = saved[:nb], saved[nb:2 * nb]
    meta, pos_layer, pos_filter, pos_channel, table = saved[2 * nb:2 * nb + 5]
    optional = saved[2 * nb + 5:]
    coord_rows = optional.pop(0) if ctx.has_coord_rows else None
    rows = optional.pop(0) if ctx.has_rows else None
    activations = optional.pop(0) if optional else None
    encoding, kernel_size, num_kernels, num_weights, precision = ctx.static
    with matmul_precision(precision, grad.device):
        grad_w, grad_b = torch.ops.nern_fast_C.decode_backward(
            grad.contiguous(), weights, biases, meta, pos_layer, pos_filter, pos_channel, coord_rows,
            rows, table, encoding, kernel_size, num_kernels, num_weights, precision, activations)
    return list(grad_w), list(grad_b)


def _backward(ctx, grad):
    # Nothing for the other inputs, as many as autograd counts: torch 2.11 leaves an argument given
    # at its schema default (workspace_bytes=0) out of them, 2.14 keeps it.
    return _run_backward(ctx, grad) + (None,) * (len(ctx.needs_input_grad) - 2)


def _backward_saving(ctx, grad, _grad_activations):
    if grad is None:  # the decoded weights were not used: no gradient
        return ([None] * ctx.num_blocks, [None] * ctx.num_blocks) + (None,) * 13
    return _run_backward(ctx, grad) + (None,) * 13


def _register_op_wrappers() -> None:
    torch.library.register_fake("nern_fast_C::decode_forward")(_decode_forward_fake)
    torch.library.register_fake("nern_fast_C::decode_backward")(_decode_backward_fake)
    torch.library.register_fake("nern_fast_C::decode_forward_saving")(_decode_forward_saving_fake)
    torch.library.register_autograd("nern_fast_C::decode_forward", _backward,
                                    setup_context=_setup_context)
    torch.library.register_autograd("nern_fast_C::decode_forward_saving", _backward_saving,
                                    setup_context=_setup_context_saving)


if _EXT is not None:
    _register_op_wrappers()


# ---------------------------------------------------------------------------- the backend
def save_budget_bytes() -> int:
    """Bytes of hidden activations one differentiated CPU decode may keep (NERN_FAST_CPU_SAVE_MB)."""
    raw = os.environ.get("NERN_FAST_CPU_SAVE_MB", str(DEFAULT_SAVE_MB))
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"NERN_FAST_CPU_SAVE_MB must be a number of MiB (0 turns keeping "
                         f"activations off), got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"NERN_FAST_CPU_SAVE_MB must be >= 0, got {raw!r}")
    return int(mb * 2**20)


ENV_CPU_BF16_GEMM = "NERN_FAST_CPU_BF16_GEMM"
_BF16_MATRIX_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")  # torch.cpu.get_capabilities()


def _cpu_has_bf16_matrix_instructions() -> bool:
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is None:  # (torch 2.11-2.14 have it)
        return True
    try:
        capabilities = get()
    except Exception:  # an unreadable CPU: ATen's bf16 GEMMs, as before this choice existed
        return True
    return any(bool(capabilities.get(name, False)) for name in _BF16_MATRIX_FEATURES)


# Read once at import: torch.compile(fullgraph=True) cannot trace the capability query.
_NATIVE_BF16: Optional[bool] = _cpu_has_bf16_matrix_instructions()


def cpu_bf16_gemm() -> str:
    """How the CPU decoder's bf16 mode multiplies: ``"native"`` (ATen's bf16 GEMMs) on CPUs with bf16
    matrix instructions, ``"fp32"`` (fp32 GEMMs on the bf16 values: the same operands and fp32
    accumulation) elsewhere; ``NERN_FAST_CPU_BF16_GEMM=native|fp32`` overrides."""
    global _NATIVE_BF16
    value = os.environ.get(ENV_CPU_BF16_GEMM, "").strip().lower()
    if value in ("native", "fp32"):
        return value
    if value not in ("", "auto"):
        raise ValueError(f"{ENV_CPU_BF16_GEMM} must be 'native', 'fp32' or 'auto', got {value!r}")
    if _NATIVE_BF16 is None:
        _NATIVE_BF16 = _cpu_has_bf16_matrix_instructions()
    return "native" if _NATIVE_BF16 else "fp32"


def op_precision(precision: str, device: torch.device) -> str:
    """The precision argument of the op: the CPU bf16 mode through fp32 GEMMs where chosen."""
    if precision == "bf16" and device.type == "cpu" and cpu_bf16_gemm() == "fp32":
        return "bf16_fp32_gemm"
    return precision


def rows_to_keep(weights, precision: str, num_rows: int) -> int:
    """How many rows' hidden activations (layers 1..nb-2) fit the budget."""
    per_row = (len(weights) - 2) * weights[0].shape[0] * (2 if precision == "bf16" else weights[0].element_size())
    return min(num_rows, save_budget_bytes() // per_row) if per_row > 0 else 0


class CsrcBackend:
    """Fused decode in C++ (CPU: tiles over threads, ATen GEMMs) or CUDA (cuBLAS + own kernels)."""

    name = NAME

    def unavailable_reason(self, request: DecodeRequest) -> Optional[str]:
        if _EXT is None:
            return _LOAD_ERROR
        device = request.device_type
        if device == "cuda":
            if not _EXT.WITH_CUDA:
                note = json.loads(_EXT.BUILD_INFO).get("cuda_note") or "not requested"
                return (f"nern_fast._C was built without its CUDA ops ({note}); rebuild with nvcc "
                        f"available (CUDA_HOME) to decode CUDA tensors here")
            if request.dtype != torch.float32:
                return (f"the CUDA ops take float32 parameters, got {request.dtype}; use "
                        f"precision='bf16' or 'tf32' for reduced precision")
        elif device == "cpu":
            if request.dtype not in (torch.float32, torch.float64):
                return f"the CPU ops take float32 or float64 parameters, got {request.dtype}"
        else:
            return f"the compiled ops run on CPU and CUDA tensors, not {device}"
        if request.precision == "bf16" and request.dtype != torch.float32:
            return f"precision 'bf16' needs float32 parameters, got {request.dtype}"
        if not 1 <= request.kernel_size <= MAX_KERNEL_SIZE:
            return (f"kernel size {request.kernel_size} is outside the 1..{MAX_KERNEL_SIZE} the "
                    f"compiled ops support")
        if request.encoding not in ENCODING_IDS:
            return f"encoding '{request.encoding}' is not supported"
        return None

    bounded_workspace = True  # decode(workspace_bytes=...): the CUDA decoder's tile buffers
    takes_layer_range = True  # decode(layers=range(a, b)): every row lies in layers a..b-1

    def __init__(self):
        self._range_args = LayoutCache()  # layout arguments of decode groups' layer ranges

    def decode(self, weights, biases, layout, encoding, rows, precision,
               workspace_bytes: Optional[int] = None, layers: Optional[range] = None) -> torch.Tensor:
        device = weights[0].device
        if rows is not None:
            rows = rows.to(torch.long).contiguous()
        span = None if layers is None else call_layer_range(layout, layers, rows)
        if span is None or span.is_whole:
            tensors = layout.tensors(device)
            layout_args = (layout.tensors("cpu").meta, tensors.pos_layer, tensors.pos_filter,
                           tensors.pos_channel, tensors.coord_rows)
            sizes = (layout.num_kernels, layout.num_weights)
        else:
            layout_args, sizes = self._range_arguments(layout, device, span)
            rows = self._rows_in_range(rows, span)
        args = ([w.contiguous() for w in weights], [b.contiguous() for b in biases], *layout_args, rows,
                encoding.kernel_table(device), ENCODING_IDS[encoding.kind], layout.kernel_size, *sizes,
                op_precision(precision, device))
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*weights, *biases))
        keep = 0
        if needs_grad and device.type == "cpu" and len(weights) >= 3:
            keep = rows_to_keep(weights, precision, sizes[0] if rows is None else rows.shape[0])
        with matmul_precision(precision, device):
            if keep > 0:
                return torch.ops.nern_fast_C.decode_forward_saving(*args, keep)[0]
            if not needs_grad and _BELOW_AUTOGRAD is not None and not torch.compiler.is_compiling():
                # Nothing to differentiate: straight to the CPU/CUDA kernel, past the Python
                # autograd wrapper of register_autograd (~20 µs of host time per call; the output
                # is the same ordinary tensor without history).
                with _BELOW_AUTOGRAD():
                    return torch.ops.nern_fast_C.decode_forward(*args, int(workspace_bytes or 0))
            return torch.ops.nern_fast_C.decode_forward(*args, int(workspace_bytes or 0))

    def _range_arguments(self, layout, device: torch.device, span: LayerRange) -> tuple:
        """The layout arguments of the layers of ``span`` as a layout of their own (meta rows with
        every offset rebased to the first of them, their positions and coordinate rows): the
        decoders then size what depends on the network (the CUDA decoder's first-layer tables,
        ΣC_out + ΣC_in rows; the CPU decoder's search over layers) by those layers. Kept per range."""
        key = (id(layout), str(device), span.layers.start, span.layers.stop)
        return self._range_args.get(layout, key, lambda: self._build_range_arguments(layout, device, span))

    @staticmethod
    def _build_range_arguments(layout, device: torch.device, span: LayerRange) -> tuple:
        tensors = layout.tensors(device)
        (k0, k1), (w0, w1), (f0, f1), (c0, c1) = span.kernels, span.weights, span.filters, span.channels
        meta = layout.tensors("cpu").meta[span.layers.start:span.layers.stop].clone()
        meta -= torch.tensor([k0, w0, 0, 0, 0, 0, f0, c0], dtype=meta.dtype)  # (columns: see LayoutTensors)
        layers = slice(span.layers.start, span.layers.stop)
        coord = None if tensors.coord_rows is None else tensors.coord_rows[k0:k1]
        return ((meta, tensors.pos_layer[layers], tensors.pos_filter[f0:f1], tensors.pos_channel[c0:c1],
                 coord), (k1 - k0, w1 - w0))

    @staticmethod
    def _rows_in_range(rows: torch.Tensor, span: LayerRange) -> torch.Tensor:
        """Global kernel indices as indices of the range's own layout (call_layer_range checked CPU
        rows; on CUDA a row outside the range is decoded as zeros, never read out of bounds)."""
        k0 = span.kernels[0]
        return rows - k0 if k0 else rows


def register() -> None:
    if _EXT is None:
        record_load_error(NAME, _LOAD_ERROR)
        return
    register_backend(CsrcBackend(), PRIORITY)
