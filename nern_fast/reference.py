"""The eager decoder: plain torch, the semantics of record.

Every fast backend is tested against this and benchmarked against it. It stays simple on
purpose: coordinates -> encodings -> MLP -> crop, layer by layer, optionally in chunks of rows
(like NeRN's ``weights_batch_size``), differentiable through ordinary autograd.

Two output formats, shared by every backend:

* full decode (``rows=None``): one flat buffer of ``layout.num_weights`` values, the conv weights
  of every represented layer one after the other (``layout.split`` gives per-layer views);
* subset decode (``rows`` = flat kernel indices): ``(len(rows), k·k)``; a row of a layer with
  s < k holds its cropped s×s kernel in the first s·s entries and zeros after.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .encoding import EncodingSpec
from .layout import CROP_MODES, WeightLayout, crop_window

PRECISIONS = ("fp32", "tf32", "bf16")
# torch >= 2.9 has the per-backend precision switch; older ones only the legacy allow_tf32 flag.
_NEW_TF32_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}' is not one of {PRECISIONS}")
    return precision


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device):
    """fp32 matmuls in IEEE fp32 (``fp32``/``bf16``) or TF32 (``tf32``) on CUDA; no-op elsewhere.

    Inside ``torch.compile`` global switches cannot be flipped per call: the graph uses the
    process-wide setting (set ``torch.backends.cuda.matmul.fp32_precision`` yourself there).
    """
    if device.type != "cuda" or torch.compiler.is_compiling():
        yield
        return
    matmul = torch.backends.cuda.matmul
    wanted = "tf32" if precision == "tf32" else "ieee"
    if _NEW_TF32_API:
        previous = matmul.fp32_precision
        matmul.fp32_precision = wanted
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:  # older torch: legacy switch
        previous = matmul.allow_tf32
        matmul.allow_tf32 = wanted == "tf32"
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


def kernel_positions(layout: WeightLayout, rows: torch.Tensor, dtype=torch.float32):
    """Normalised (layer, filter, channel) positions ``(N, 3)`` and layer ids of flat kernel indices.

    The permutation is applied here: slot ``rows[i]`` decodes coordinate row ``coord_rows[rows[i]]``.
    """
    t = layout.tensors(rows.device)
    layer = t.layer_of(rows)
    local = rows - t.kernel_offsets[layer]
    if t.coord_rows is not None:
        local = t.coord_rows[rows]
    c_in = t.c_in[layer]
    f, c = local // c_in, local % c_in
    positions = torch.stack([t.pos_layer[layer], t.pos_filter[t.filter_offsets[layer] + f],
                             t.pos_channel[t.channel_offsets[layer] + c]], dim=1)
    return positions.to(dtype), layer


class _CudaLinearAtPrecision(torch.autograd.Function):
    """F.linear whose backward matmuls run at the same fp32/tf32 setting as its forward.

    Autograd runs the backward after ``matmul_precision`` has exited, under whatever global TF32
    switch is set; precision ``tf32`` means TF32 in both directions, ``fp32`` IEEE in both.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, precision):
        ctx.save_for_backward(x, weight)
        ctx.precision = precision
        with matmul_precision(precision, x.device):
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        with matmul_precision(ctx.precision, grad.device):
            grad_x = grad @ weight if ctx.needs_input_grad[0] else None
            grad_w = grad.t() @ x if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, precision: str) -> torch.Tensor:
    """One linear layer at ``precision``; bf16 casts the operands and accumulates in fp32."""
    if precision == "bf16" and x.dtype == torch.float32:
        return torch.matmul(x.bfloat16(), weight.bfloat16().t()).to(x.dtype) + bias
    if (x.device.type == "cuda" and x.dtype == torch.float32 and x.dim() == 2
            and torch.is_grad_enabled() and not torch.compiler.is_compiling()):
        return _CudaLinearAtPrecision.apply(x, weight, bias, precision)
    return F.linear(x, weight, bias)


def mlp_forward(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                precision: str = "fp32") -> torch.Tensor:
    """ReLU MLP (NERN_SPEC §5): ReLU after every layer but the last."""
    last = len(weights) - 1
    with matmul_precision(precision, x.device):
        for i, (w, b) in enumerate(zip(weights, biases)):
            x = linear(x, w, b, precision)
            if i < last:
                x = torch.relu(x)
    return x


def crop_kernels(kernels: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """NeRN's sampling of an s×s kernel from k×k outputs ``(n, k, k)`` -> ``(n, s, s)``."""
    k = kernels.shape[-1]
    if size == k:
        return kernels
    if mode == "center":
        lo, hi = crop_window(k, size)
        return kernels[:, lo:hi, lo:hi]
    window = k - size + 1
    pool = F.avg_pool2d if mode == "average" else F.max_pool2d
    return pool(kernels.unsqueeze(1), window, 1).squeeze(1)


def _decode_rows(weights, biases, layout, encoding, rows, precision, chunk_size):
    """Raw k·k MLP outputs of flat kernel indices, in chunks."""
    dtype = weights[0].dtype
    pieces = []
    step = chunk_size or max(int(rows.numel()), 1)
    # No rows: one empty chunk, so that the (empty) output still depends on every parameter and
    # their gradients are zeros, as the fused backends give (not "does not require grad").
    for start in range(0, max(rows.numel(), 1), step):
        positions, _ = kernel_positions(layout, rows[start:start + step], dtype)
        pieces.append(mlp_forward(encoding.encode(positions), weights, biases, precision))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def reference_decode(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                     layout: WeightLayout, encoding: EncodingSpec, rows: Optional[torch.Tensor] = None,
                     precision: str = "fp32", chunk_size: Optional[int] = None) -> torch.Tensor:
    """Decode all kernels (flat weight buffer) or the flat kernel indices ``rows`` (padded rows)."""
    check_precision(precision)
    k = layout.kernel_size
    device = weights[0].device
    if rows is None:
        # One chain over every kernel (the best eager decoder), then per-layer crops as views.
        out = _decode_rows(weights, biases, layout, encoding,
                           torch.arange(layout.num_kernels, device=device), precision, chunk_size)
        if all(layer.size == k for layer in layout.layers):
            return out.reshape(-1)
        return torch.cat([crop_kernels(out[l.kernel_offset:l.kernel_offset + l.num_kernels].view(-1, k, k),
                                       l.size, l.crop).reshape(-1) for l in layout.layers])

    rows = rows.to(device=device, dtype=torch.long).reshape(-1)
    out = _decode_rows(weights, biases, layout, encoding, rows, precision, chunk_size)
    combos = sorted({(l.size, l.crop) for l in layout.layers if l.size < k})
    if not combos:
        return out
    # Which crop applies to a row is known only on the device; select with masks instead of
    # gathering rows (no host synchronisation, so the subset decode can run inside CUDA graphs).
    t = layout.tensors(device)
    layer = t.layer_of(rows)
    size, crop = t.size[layer], t.crop[layer]
    result = out.masked_fill((size < k)[:, None], 0.0)
    for s, mode in combos:
        mask = ((size == s) & (crop == CROP_MODES.index(mode)))[:, None]
        cropped = crop_kernels(out.view(-1, k, k), s, mode).reshape(-1, s * s)
        result = torch.where(mask, F.pad(cropped, (0, k * k - s * s)), result)
    return result


@torch.no_grad()
def well_conditioned_rows(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                          layout: WeightLayout, encoding: EncodingSpec, rows: Optional[torch.Tensor] = None,
                          margin: float = 2e-5) -> torch.Tensor:
    """The kernel rows (of ``rows``, default all) whose fp32 gradients are well defined: no ReLU
    pre-activation within ``margin`` (relative to its layer's largest) of the kink and no max-crop
    window with its top two within ``margin`` (relative to the row's largest output), in float64.

    What accuracy comparisons of decoders decode. A pre-activation within fp32 rounding of 0 flips
    its ReLU mask between two decoders, and the flip moves that row's whole contribution: on
    ResNet-20 (H = 180, seed 0, all rows) eager's fp32 gradients of the first layers were 7e-4 off
    float64 and csrc's 1.1e-3 (2-core CPU), both from such rows; on the other rows 5e-7 and 3e-7.
    """
    device = weights[0].device
    rows = torch.arange(layout.num_kernels, device=device) if rows is None else rows.to(device).reshape(-1)
    positions, layer = kernel_positions(layout, rows, torch.float64)
    x = encoding.encode(positions)
    keep = torch.ones(rows.numel(), dtype=torch.bool, device=device)
    for w, b in zip(weights[:-1], biases[:-1]):
        z = x @ w.double().t() + b.double()
        keep &= (z.abs() > margin * z.abs().max()).all(dim=1)
        x = z.clamp_min(0)
    out = x @ weights[-1].double().t() + biases[-1].double()
    k = layout.kernel_size
    for index, spec in enumerate(layout.layers):
        if spec.size == k or spec.crop != "max":
            continue
        on = layer == index
        window = k - spec.size + 1
        kernels = out[on].view(-1, k, k)
        windows = kernels.unfold(1, window, 1).unfold(2, window, 1).reshape(-1, spec.size ** 2, window * window)
        top2 = windows.topk(2, dim=-1).values
        scale = kernels.abs().flatten(1).amax(1).clamp_min(1e-300)
        keep[on] &= ((top2[..., 0] - top2[..., 1]) > margin * scale[:, None]).all(dim=1)
    return rows[keep]
