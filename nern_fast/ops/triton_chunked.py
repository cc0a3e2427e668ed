"""Launchers of the chunked schedule (large hidden sizes; ``nern_fast.kernels.decode_chunked``).

Rows are decoded C at a time, C from a memory budget (never from the number of kernels): per chunk
one launch per MLP layer — a tensor-core GEMM over the whole chunk with bias + ReLU in its
epilogue — between a first-layer launch (separable gather, or encoding + GEMM) and an output launch
(last layer, crop, scatter). The backward recomputes each chunk's activations, keeps them for the
chunk, and runs per layer one GEMM for the input gradient and one for dW/db, whose S row segments
add into S partial slots reduced in fixed order at the end (deterministic). A ``k_major``
configuration (tf32) gives those GEMMs transposed operands (kernels/decode_chunked.py says why).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from nern_fast.kernels import decode_chunked as kc

from .triton_fused import first_layer_tables, reduce_partials, transposed_weights
from .triton_inputs import INTERPRETED, DecodeShape, LaunchInputs, cdiv, next_power_of_2, slot_layout
from .triton_tuner import LaunchConfig, TensorDescriptor, num_sms

MAX_CHUNK_ROWS = 1 << 16
MAX_SEGMENTS = 8


def row_tile() -> int:
    """Rows per program of the row kernels (first layer, encoding, output, output gradient)."""
    return 32 if INTERPRETED else 64


def weight_grad_tiles(config: LaunchConfig) -> tuple[int, int, int]:
    """(BN, BK, BR) of the weight-gradient GEMM: dW tile rows and columns, rows reduced per step."""
    return min(config.bm, 128), min(config.bn, 128), config.bk


def chunk_quantum(config: LaunchConfig) -> int:
    """Chunk sizes are multiples of every row tile: GEMMs then cover whole tiles of a chunk."""
    return max(config.bm, row_tile(), weight_grad_tiles(config)[2], 32 if INTERPRETED else 256)


def _forced_rows() -> Optional[int]:
    value = os.environ.get("NERN_FAST_TRITON_CHUNK_ROWS", "").strip()
    if not value:
        return None
    rows = int(value)
    if rows < 1:
        raise ValueError(f"NERN_FAST_TRITON_CHUNK_ROWS={value} must be a positive number of rows")
    return rows


def _chunk_rows(shape: DecodeShape, config: LaunchConfig, row_bytes: int, budget: int) -> int:
    """Rows per chunk: what ``budget`` bytes hold (or NERN_FAST_TRITON_CHUNK_ROWS), rounded to the
    quantum, at least one quantum, at most MAX_CHUNK_ROWS and not more than the call needs."""
    q = chunk_quantum(config)
    forced = _forced_rows()
    rows = forced if forced is not None else min(MAX_CHUNK_ROWS, budget // max(1, row_bytes))
    rows = max(q, rows // q * q if forced is None else cdiv(rows, q) * q)
    return min(rows, cdiv(max(shape.rows, 1), q) * q)


def forward_row_bytes(shape: DecodeShape, config: LaunchConfig) -> int:
    act = shape.scratch_dtype.itemsize
    enc = 0 if config.separable else shape.enc_stride * act
    raw = shape.k2_pad * shape.acc_dtype.itemsize if shape.crop else 0
    return 2 * shape.hidden_stride * act + enc + raw


def backward_row_bytes(shape: DecodeShape, k_major: bool = False) -> int:
    act = shape.scratch_dtype.itemsize
    acc = shape.acc_dtype.itemsize
    row = ((shape.num_hidden + 3) * shape.hidden_stride + shape.enc_stride) * act + shape.k2_pad * acc * (
        3 if shape.has_max else 1)
    if k_major:  # dzᵀ, xᵀ (the widest layer input) and gᵀ
        row += (shape.hidden_stride + max(shape.hidden_stride, shape.enc_stride)) * act + shape.k2_pad * acc
    return row


@dataclass(frozen=True)
class BackwardPlan:
    rows: int  # C
    segments: int  # S partial slots
    segment_rows: int


def backward_plan(shape: DecodeShape, config: LaunchConfig, device: torch.device,
                  memory_budget: int) -> BackwardPlan:
    """Chunk rows and row segments of the backward: S partial slots (enough weight-gradient tiles to
    fill the device twice, at most a quarter of the budget), the rest of the budget for the chunk."""
    bn, bk, br = weight_grad_tiles(config)
    tiles = cdiv(shape.hidden, bn) * cdiv(shape.hidden_stride, bk)
    slot_bytes = shape.slot_size * shape.acc_dtype.itemsize
    segments = max(1, min(MAX_SEGMENTS, cdiv(2 * num_sms(device), tiles),
                          memory_budget // 4 // max(1, slot_bytes)))
    rest = memory_budget - (segments + 1) * slot_bytes
    rows = _chunk_rows(shape, config, backward_row_bytes(shape, config.k_major), max(0, rest))
    segments = min(segments, cdiv(rows, br))
    return BackwardPlan(rows, segments, cdiv(cdiv(rows, segments), br) * br)


class _Launcher:
    """The launches of one call, with its constant arguments bound."""

    def __init__(self, inputs: LaunchInputs, config: LaunchConfig, tables: Optional[torch.Tensor]):
        self.inputs, self.config, self.shape = inputs, config, inputs.shape
        self.tables = tables
        self.bm_rows = row_tile()
        dummy = inputs.kernel_offsets
        self.rows_ptr = inputs.rows if inputs.rows is not None else dummy
        self.coord_ptr = inputs.coord_rows if inputs.coord_rows is not None else dummy
        s = self.shape
        self.common = dict(SUBSET=s.subset, PERMUTED=s.permuted, PRECISION=s.precision_code,
                           INTERPRET=INTERPRETED)

    def _row_grid(self, m: int) -> tuple:
        return (cdiv(m, self.bm_rows),)

    def first_layer(self, act: torch.Tensor, r0: int, m: int) -> None:
        s, i = self.shape, self.inputs
        kc.chunk_first_layer_kernel[self._row_grid(m)](
            act, r0 // self.bm_rows, s.rows, self.rows_ptr, i.kernel_offsets, i.meta, self.coord_ptr,
            s.num_layers, s.search_steps, self.tables, s.num_layers, s.num_layers + s.num_filters,
            s.hidden_stride, BM=self.bm_rows, BS=64, num_warps=4, **self.common)

    def encoding(self, enc: torch.Tensor, r0: int, m: int) -> None:
        s, i = self.shape, self.inputs
        kc.chunk_encoding_kernel[self._row_grid(m)](
            enc, r0 // self.bm_rows, s.rows, self.rows_ptr, i.kernel_offsets, i.meta, self.coord_ptr,
            i.pos_layer, i.pos_filter, i.pos_channel, i.enc_table, s.num_layers, s.search_steps,
            s.levels, s.enc_size, s.enc_stride, FFN=s.ffn, F64=s.f64, BM=self.bm_rows, BK=32,
            num_warps=4, **self.common)

    def matmul(self, a: torch.Tensor, m: int, k: int, w: torch.Tensor, stride_wk: int, stride_wn: int,
               k_w: int, n_w: int, y: torch.Tensor, n_s: int, bias: Optional[torch.Tensor] = None,
               h: Optional[torch.Tensor] = None, round_a: bool = False, bk: Optional[int] = None) -> None:
        """y = relu(a @ B + bias) (bias given) or (a @ B)·(h > 0) (h given); see the kernel."""
        c, s = self.config, self.shape
        bk = min(bk or c.bk, next_power_of_2(k))  # k is a multiple of 16: tl.dot needs K >= 16
        grid = (cdiv(m, c.bm) * cdiv(n_s, c.bn),)
        if c.tma and h is None and stride_wk == 1:  # a forward layer: W's rows are N
            kc.chunk_matmul_tma_kernel[grid](
                _descriptor(a, k, c.bm, bk), _descriptor(w, k, c.bn, bk, rows=n_w, row_stride=stride_wn),
                bias, _descriptor(y, n_s, c.bm, c.bn), m, k, n_w, n_s, PRECISION=s.precision_code,
                INTERPRET=INTERPRETED, BM=c.bm, BN=c.bn, BK=bk, GROUP_M=8, num_warps=c.num_warps,
                num_stages=c.num_stages)
            return
        dummy = self.inputs.pos_layer
        kc.chunk_matmul_kernel[grid](
            a, m, k, w, stride_wk, stride_wn, k_w, n_w, bias if bias is not None else dummy,
            h if h is not None else dummy, y, n_s, EPILOGUE=0 if h is None else 1, ROUND_A=round_a,
            PRECISION=s.precision_code, INTERPRET=INTERPRETED, F64=s.f64,
            BM=c.bm, BN=c.bn, BK=bk, GROUP_M=8, num_warps=c.num_warps, num_stages=c.num_stages)

    def transpose(self, src: torch.Tensor, m: int, n_s: int, dst: torch.Tensor) -> None:
        """dst[:n_s, :m] = src[:m, :n_s]ᵀ (dst rows of the chunk's row count)."""
        kc.chunk_transpose_kernel[(cdiv(m, 64), cdiv(n_s, 64))](src, m, n_s, dst, dst.shape[-1], BM=64, BN=64,
                                                                  num_warps=4)

    def output(self, out: torch.Tensor, x: torch.Tensor, raw: torch.Tensor, r0: int, m: int,
               wl: torch.Tensor, bl: torch.Tensor) -> None:
        s, i = self.shape, self.inputs
        kc.chunk_out_kernel[self._row_grid(m)](
            out, x, raw, r0 // self.bm_rows, s.rows, self.rows_ptr, i.kernel_offsets, i.weight_offsets,
            i.meta, self.coord_ptr, s.num_layers, s.search_steps, wl, bl, s.hidden_stride,
            K=s.kernel_size, K2P=s.k2_pad, CROP=s.crop, F64=s.f64, BM=self.bm_rows, BK=64,
            num_warps=4, **self.common)

    def output_grad(self, grad: torch.Tensor, x: torch.Tensor, g: torch.Tensor, raw: torch.Tensor,
                    r0: int, m: int, wl: torch.Tensor, bl: torch.Tensor) -> None:
        s, i = self.shape, self.inputs
        kc.chunk_out_grad_kernel[self._row_grid(m)](
            grad, x, g, raw, r0 // self.bm_rows, s.rows, self.rows_ptr, i.kernel_offsets,
            i.weight_offsets, i.meta, self.coord_ptr, s.num_layers, s.search_steps, wl, bl,
            s.hidden_stride, K=s.kernel_size, K2P=s.k2_pad, CROP=s.crop, HAS_MAX=s.has_max, F64=s.f64,
            BM=self.bm_rows, BK=64, num_warps=4, **self.common)

    def weight_grad(self, d: torch.Tensor, n_s: int, x: torch.Tensor, k_x: int, m: int, n_w: int,
                    plan: BackwardPlan, partials: torch.Tensor, w_off: int, b_off: int,
                    round_d: bool = False, transposed: bool = False) -> None:
        """dW += dᵀ x, db += Σ d over the chunk's m rows; ``transposed``: d and x given as dᵀ (n_s rows)
        and xᵀ (k_x rows) of the chunk's row count."""
        c, s = self.config, self.shape
        bn, bk, br = weight_grad_tiles(c)
        bn = min(bn, next_power_of_2(n_s))  # tl.arange needs powers of two (n_s: 16·j)
        grid = (cdiv(n_w, bn) * cdiv(k_x, bk), plan.segments)
        kc.chunk_weight_grad_kernel[grid](
            d, n_s, x, k_x, m, plan.segment_rows, n_w, partials, s.slot_size, w_off, b_off,
            d.shape[-1] if transposed else 0, ROUND_D=round_d, TRANSPOSED=transposed,
            PRECISION=s.precision_code, INTERPRET=INTERPRETED, F64=s.f64,
            BN=bn, BK=bk, BR=br, num_warps=c.num_warps, num_stages=c.num_stages)


def _descriptor(t: torch.Tensor, width: int, block_rows: int, block_cols: int, rows: Optional[int] = None,
                row_stride: Optional[int] = None):
    """TMA descriptor of the first ``width`` columns of a row-major 2-D buffer (``rows`` of it; all by
    default), moved in ``block_rows × block_cols`` tiles."""
    rows = t.shape[0] if rows is None else rows
    row_stride = t.stride(0) if row_stride is None else row_stride
    return TensorDescriptor(t, [rows, width], [row_stride, 1], [block_rows, block_cols])


def _first_layer_forward(launch: _Launcher, params: list, act0: torch.Tensor,
                         enc: Optional[torch.Tensor], r0: int, m: int, have_enc: bool = False) -> None:
    s = launch.shape
    if launch.config.separable:
        launch.first_layer(act0, r0, m)
        return
    if not have_enc:
        launch.encoding(enc, r0, m)
    launch.matmul(enc, m, s.enc_stride, params[0], 1, s.enc_stride, s.enc_stride, s.hidden, act0,
                  s.hidden_stride, bias=params[1])


def _hidden_forward(launch: _Launcher, params: list, i: int, src: torch.Tensor, dst: torch.Tensor,
                    m: int) -> None:
    s = launch.shape
    h_s = s.hidden_stride
    launch.matmul(src, m, h_s, params[2][i], 1, h_s, h_s, s.hidden, dst, h_s, bias=params[3][i])


def run_forward(inputs: LaunchInputs, config: LaunchConfig, out: torch.Tensor, memory_budget: int) -> None:
    """Chunked forward decode into ``out`` (flat buffer, or (R, k²) rows for a subset)."""
    shape = inputs.shape
    if shape.rows == 0:
        return
    packed = inputs.packed()
    params = packed.params
    launch = _Launcher(inputs, config, first_layer_tables(inputs, packed) if config.separable else None)
    rows = _chunk_rows(shape, config, forward_row_bytes(shape, config), memory_budget)
    dev, act_dtype = inputs.device, shape.scratch_dtype
    act = torch.empty((2, rows, shape.hidden_stride), device=dev, dtype=act_dtype)
    enc = None if config.separable else torch.empty((rows, shape.enc_stride), device=dev, dtype=act_dtype)
    raw = torch.empty((rows, shape.k2_pad) if shape.crop else (1,), device=dev, dtype=shape.acc_dtype)
    for r0 in range(0, shape.rows, rows):
        m = min(rows, shape.rows - r0)
        _first_layer_forward(launch, params, act[0], enc, r0, m)
        for i in range(shape.num_hidden):
            _hidden_forward(launch, params, i, act[i % 2], act[(i + 1) % 2], m)
        launch.output(out, act[shape.num_hidden % 2], raw, r0, m, params[4], params[5])


def run_backward(inputs: LaunchInputs, grad: torch.Tensor, config: LaunchConfig,
                 memory_budget: int) -> torch.Tensor:
    """Chunked backward: gradients of every MLP weight and bias as one slot (``slot_layout``)."""
    shape = inputs.shape
    slot_size = shape.slot_size
    dev, act_dtype, acc_dtype = inputs.device, shape.scratch_dtype, shape.acc_dtype
    if shape.rows == 0:
        return torch.zeros(slot_size, device=dev, dtype=acc_dtype)
    packed = inputs.packed()
    params = packed.params
    w1, b1, wh, bh, wl, bl = params
    launch = _Launcher(inputs, config, first_layer_tables(inputs, packed) if config.separable else None)
    plan = backward_plan(shape, config, dev, memory_budget)
    rows, nh, h, h_s, e_s, k2p = (plan.rows, shape.num_hidden, shape.hidden, shape.hidden_stride,
                                  shape.enc_stride, shape.k2_pad)
    _, o_wh, o_wl, o_b1, o_bh, o_bl, _ = slot_layout(h, shape.enc_size, nh, shape.k2)
    acts = torch.empty((nh + 1, rows, h_s), device=dev, dtype=act_dtype)
    dz = torch.empty((2, rows, h_s), device=dev, dtype=act_dtype)
    enc = torch.empty((rows, e_s), device=dev, dtype=act_dtype)
    g = torch.empty((rows, k2p), device=dev, dtype=acc_dtype)
    raw = torch.empty((rows, 2 * k2p) if shape.has_max else (1,), device=dev, dtype=acc_dtype)
    partials = torch.zeros((plan.segments, slot_size), device=dev, dtype=acc_dtype)
    transposed = _KMajorOperands(shape, wh, wl, rows) if config.k_major else None
    for r0 in range(0, shape.rows, rows):
        m = min(rows, shape.rows - r0)
        # ---- recompute and keep the chunk's activations (and its encodings, for dW1)
        launch.encoding(enc, r0, m)
        _first_layer_forward(launch, params, acts[0], enc, r0, m, have_enc=True)
        for i in range(nh):
            _hidden_forward(launch, params, i, acts[i], acts[i + 1], m)
        # ---- last layer: gradient of its k² outputs, dW_last / db_last, gradient before its input ReLU
        launch.output_grad(grad, acts[nh], g, raw, r0, m, wl, bl)
        if transposed is None:
            launch.weight_grad(g, k2p, acts[nh], h_s, m, shape.k2, plan, partials, o_wl, o_bl, round_d=True)
            launch.matmul(g, m, k2p, wl, h_s, 1, shape.k2, h_s, dz[0], h_s, h=acts[nh], round_a=True, bk=16)
        else:
            launch.transpose(g, m, k2p, transposed.g)
            launch.weight_grad(transposed.g, k2p, transposed.x_of(launch, acts[nh], m, h_s), h_s, m, shape.k2,
                               plan, partials, o_wl, o_bl, round_d=True, transposed=True)
            # K_W padded: the transposed copies' padding is zero, and a reduction mask at a multiple
            # of 16 keeps the loads 16 bytes wide (at H = 1256 or k² = 9 triton copies 4 bytes at a time)
            launch.matmul(g, m, k2p, transposed.wl, 1, k2p, k2p, h_s, dz[0], h_s, h=acts[nh],
                          round_a=True, bk=16)
        # ---- hidden layers, last to first: layer i maps acts[i] -> acts[i+1]
        for j in range(nh):
            i = nh - 1 - j
            cur, nxt = dz[j % 2], dz[(j + 1) % 2]
            if transposed is None:
                launch.weight_grad(cur, h_s, acts[i], h_s, m, h, plan, partials, o_wh + i * h * h_s,
                                   o_bh + i * h_s)
                launch.matmul(cur, m, h_s, wh[i], h_s, 1, h, h_s, nxt, h_s, h=acts[i])
            else:
                d_t, x_t = transposed.dz_of(launch, cur, m), transposed.x_of(launch, acts[i], m, h_s)
                launch.weight_grad(d_t, h_s, x_t, h_s, m, h, plan, partials, o_wh + i * h * h_s, o_bh + i * h_s,
                                   transposed=True)
                launch.matmul(cur, m, h_s, transposed.wh[i], 1, h_s, h_s, h_s, nxt, h_s, h=acts[i])
        # ---- first layer: W1 against the encodings
        if transposed is None:
            launch.weight_grad(dz[nh % 2], h_s, enc, e_s, m, h, plan, partials, 0, o_b1)
        else:
            d_t, x_t = transposed.dz_of(launch, dz[nh % 2], m), transposed.x_of(launch, enc, m, e_s)
            launch.weight_grad(d_t, h_s, x_t, e_s, m, h, plan, partials, 0, o_b1, transposed=True)
    return reduce_partials(partials.view(-1), plan.segments, slot_size)


class _KMajorOperands:
    """The transposed operands of a ``k_major`` backward: the hidden and last weights transposed
    (rows padded to multiples of 16, zero padding), and chunk buffers for dzᵀ, xᵀ and gᵀ."""

    def __init__(self, shape: DecodeShape, wh: torch.Tensor, wl: torch.Tensor, rows: int):
        h_s, k2p = shape.hidden_stride, shape.k2_pad
        act_dtype, dev = shape.scratch_dtype, wl.device
        self.wh, self.wl = transposed_weights(shape, wh, wl)
        self.dz = torch.empty((h_s, rows), device=dev, dtype=act_dtype)
        self.x = torch.empty((max(h_s, shape.enc_stride), rows), device=dev, dtype=act_dtype)
        self.g = torch.empty((k2p, rows), device=dev, dtype=shape.acc_dtype)

    def x_of(self, launch: _Launcher, x: torch.Tensor, m: int, width: int) -> torch.Tensor:
        """xᵀ of a layer's input (the chunk's first m rows, ``width`` columns)."""
        launch.transpose(x, m, width, self.x)
        return self.x

    def dz_of(self, launch: _Launcher, dz: torch.Tensor, m: int) -> torch.Tensor:
        """dzᵀ of a layer's output gradient (the chunk's first m rows)."""
        launch.transpose(dz, m, self.dz.shape[0], self.dz)
        return self.dz
