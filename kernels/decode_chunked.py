"""Chunked decode for large hidden sizes: per chunk of rows, one launch per MLP layer.

The fused kernels keep a tile's activations in a per-program scratch and stream every layer's
weights through each tile: at large H that is an L2-bandwidth-bound GEMM with BM×BN tiles. Here a
chunk of C rows (C set by a memory budget, not by the number of kernels) is decoded layer by layer
with ordinary tensor-core GEMM launches over the whole chunk (grouped tile order for L2 reuse),
activations in a chunk-sized ping-pong buffer in HBM:

  first layer   ``chunk_first_layer_kernel`` (separable gather) or ``chunk_encoding_kernel`` + GEMM
  hidden layers ``chunk_matmul_kernel`` (bias + ReLU in the epilogue)
  last layer    ``chunk_out_kernel``: k² outputs, crop and scatter into the flat buffer / rows

Backward per chunk: recompute and keep the chunk's activations, ``chunk_out_grad_kernel`` (gradient
of the k×k outputs through the crop), then per layer ``chunk_matmul_kernel`` for the input gradient
(ReLU mask of the recomputed activations in the epilogue) and ``chunk_weight_grad_kernel`` for
dW and db, added into S fixed row segments' partial slots (each program owns its tile of one
segment's slot: deterministic by construction; the launcher reduces the S slots in fixed order).

K-major operands (tf32 backward): Hopper's tf32 tensor-core instructions (wgmma) read both operands
from shared memory only in K-major order. The input gradient's weights (dz @ W: W's rows are the
reduction) and both operands of dW = dzᵀ @ x (the chunk's rows are the reduction) are not, and
triton then stages them element by element (4-byte cp.async into transposed shared memory, where
K-major tiles take 16-byte copies). With ``k_major`` the launcher passes transposed weight copies,
``chunk_transpose_kernel`` writes dzᵀ and xᵀ, and the weight-gradient GEMM reads both transposed
(``TRANSPOSED``). bf16 wgmma reads either order. (dzᵀ was first stored by the input-gradient GEMM's
epilogue as well: on the H200 the weight gradients read from it were 4× tf32's error, 9.5e-2 against
2.5e-2, while the bias sums over the same values were right.)

Chunk buffers are row-major with padded widths (E_S, H_S multiples of 16); row r of a chunk is
position ``r0 + r`` of the call's row list. Buffers hold ``C`` rows, C a multiple of every row
tile, so GEMMs run over whole tiles without row masks: rows past the call's end hold stale values
that never reach an output (the output kernels mask them, the weight-gradient kernel masks rows
>= M).
"""
import triton
import triton.language as tl

from .common import (dense_out, kernel_coords, layer_of, mma, relu, separable_relu, store_encoding,
                     tf32_operand, tile_rows, to_scratch, write_kernels)
from .decode_bwd import output_gradients


@triton.jit
def chunk_first_layer_kernel(
        act_ptr, tile0, R, rows_ptr, koff_ptr, meta_ptr, coord_ptr, num_layers, search_steps,
        tab_ptr, tab_f_base, tab_c_base, H_S,
        SUBSET: tl.constexpr, PERMUTED: tl.constexpr, PRECISION: tl.constexpr,
        INTERPRET: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr):
    """Separable first layer of BM rows per program: act = relu(T[layer] + T[filter] + T[channel])."""
    pid = tl.program_id(0)
    _, row, valid = tile_rows(tile0 + pid, R, rows_ptr, SUBSET, BM)
    layer = layer_of(row, valid, koff_ptr, num_layers, search_steps)
    _, f_row, c_row, _, _ = kernel_coords(row, valid, layer, koff_ptr, meta_ptr, coord_ptr, PERMUTED)
    separable_relu(tab_ptr, layer, f_row + tab_f_base, c_row + tab_c_base, H_S,
                   act_ptr + pid.to(tl.int64) * (BM * H_S), R - (tile0 + pid) * BM, PRECISION, INTERPRET, BM, BS,
                   False)


@triton.jit
def chunk_encoding_kernel(
        enc_out_ptr, tile0, R, rows_ptr, koff_ptr, meta_ptr, coord_ptr, pos_l_ptr, pos_f_ptr,
        pos_c_ptr, enc_ptr, num_layers, search_steps, levels, E, E_S,
        SUBSET: tl.constexpr, PERMUTED: tl.constexpr, FFN: tl.constexpr, PRECISION: tl.constexpr,
        INTERPRET: tl.constexpr, F64: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Positional encodings of BM rows per program into the chunk's (C, E_S) buffer."""
    pid = tl.program_id(0)
    _, row, valid = tile_rows(tile0 + pid, R, rows_ptr, SUBSET, BM)
    layer = layer_of(row, valid, koff_ptr, num_layers, search_steps)
    _, f_row, c_row, _, _ = kernel_coords(row, valid, layer, koff_ptr, meta_ptr, coord_ptr, PERMUTED)
    p_l = tl.load(pos_l_ptr + layer, mask=valid, other=0.0)
    p_f = tl.load(pos_f_ptr + f_row, mask=valid, other=0.0)
    p_c = tl.load(pos_c_ptr + c_row, mask=valid, other=0.0)
    store_encoding(enc_out_ptr + pid.to(tl.int64) * (BM * E_S), E_S, p_l, p_f, p_c, enc_ptr, levels, E,
                   FFN, PRECISION, INTERPRET, F64, BM, BK)


@triton.jit
def grouped_tile(pid, M, N_S, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` of a GEMM over M × N_S, in groups of GROUP_M row
    tiles: the programs of a group share the column tiles of B while those are in L2."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N_S, BN)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def chunk_matmul_kernel(
        a_ptr, M, K, w_ptr, stride_wk, stride_wn, K_W, N_W, b_ptr, h_ptr, y_ptr, N_S,
        EPILOGUE: tl.constexpr, ROUND_A: tl.constexpr, PRECISION: tl.constexpr,
        INTERPRET: tl.constexpr, F64: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """y[m, n] = epilogue(Σ_k a[m, k] · B[k, n]) over the chunk's first M rows (whole BM tiles).

    a: (·, K) row-major, K the padded reduction length (multiple of 16, zeros in its padding);
    B[k, n] = w[k·stride_wk + n·stride_wn], zero for k >= K_W or n >= N_W (forward: the layer's
    padded weight rows, stride_wk = 1; input gradient: the same weights untransposed,
    stride_wn = 1); y and h: (·, N_S).
    EPILOGUE 0: relu(acc + b[n]) (b[n] = 0 for n >= N_W, so padding columns come out 0);
    EPILOGUE 1: acc unless h[m, n] <= 0 (backward through the ReLU that produced h; a NaN h passes,
    as in torch).
    ROUND_A: round fp32 A operands to tf32 in registers (the output gradient, stored unrounded).
    Grid: cdiv(M, BM) · cdiv(N_S, BN) programs in groups of GROUP_M row tiles (L2 reuse of B).
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N_S, BM, BN, GROUP_M)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    n_ok = offs_n < N_W
    a_rows = a_ptr + rows[:, None] * K
    acc = tl.zeros((BM, BN), tl.float64 if F64 else tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + offs_k
        a = tl.load(a_rows + k[None, :], mask=(k < K)[None, :], other=0.0)
        if ROUND_A:
            a = tf32_operand(a, PRECISION, INTERPRET)
        w = tl.load(w_ptr + k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=(k < K_W)[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, w, acc, PRECISION, INTERPRET)
    out_ok = (offs_n < N_S)[None, :]
    if EPILOGUE == 0:
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)
        y = relu(acc + bias[None, :])
    else:
        h = tl.load(h_ptr + rows[:, None] * N_S + offs_n[None, :], mask=out_ok, other=0.0)
        y = tl.where(h <= 0, 0.0, acc)
    y = to_scratch(y, PRECISION, INTERPRET)
    tl.store(y_ptr + rows[:, None] * N_S + offs_n[None, :], y, mask=out_ok)


@triton.jit
def chunk_matmul_tma_kernel(
        a_desc, w_desc, b_ptr, y_desc, M, K, N_W, N_S,
        PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """The forward layer of ``chunk_matmul_kernel`` (EPILOGUE 0: y = relu(a @ Wᵀ + b)) with its tiles
    moved by the tensor memory accelerator: descriptors of a (·, K), W (N_W, K) and y (·, N_S) whose
    loads past their shapes read zeros and whose stores past them write nothing (the masks of the
    pointer version). A tuner candidate on Hopper; same grid and tile order."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N_S, BM, BN, GROUP_M)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        a = a_desc.load([pid_m * BM, k0])
        w = w_desc.load([pid_n * BN, k0])
        acc = mma(a, tl.trans(w), acc, PRECISION, INTERPRET)
    offs_n = pid_n * BN + tl.arange(0, BN)
    bias = tl.load(b_ptr + offs_n, mask=offs_n < N_W, other=0.0)
    y = relu(acc + bias[None, :])
    y_desc.store([pid_m * BM, pid_n * BN], to_scratch(y, PRECISION, INTERPRET).to(y_desc.dtype))


@triton.jit
def chunk_weight_grad_kernel(
        d_ptr, N_S, x_ptr, K_X, M, seg_rows, N_W, part_ptr, slot_size, w_off, b_off, LD,
        ROUND_D: tl.constexpr, TRANSPOSED: tl.constexpr, PRECISION: tl.constexpr,
        INTERPRET: tl.constexpr, F64: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """One segment's share of a layer's weight and bias gradients, added into its partial slot.

    slot[s].W[n, k] += Σ_r d[r, n] · x[r, k] and slot[s].b[n] += Σ_r d[r, n] (column tile 0 only)
    over rows r in [s·seg_rows, min((s+1)·seg_rows, M)); d: (·, N_S) gradient before the layer's
    ReLU, x: (·, K_X) the layer's input; W rows of K_X values at ``w_off`` in the slot, N_W of them.
    Grid: (cdiv(N_W, BN) · cdiv(K_X, BK), S). Each program owns its tile of one slot: no atomics.
    ROUND_D: the bias sum uses d as stored, the product its tf32 rounding (d is the unrounded
    output gradient there).
    TRANSPOSED: d and x are given as dᵀ (N_S rows) and xᵀ (K_X rows), each row LD values (the chunk's
    rows): both operands K-major.
    """
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    num_k = tl.cdiv(K_X, BK)
    pid_n = pid // num_k
    pid_k = pid % num_k
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_k * BK + tl.arange(0, BK)
    n_in = (offs_n < N_S)[None, :]
    k_in = (offs_k < K_X)[None, :]
    r_lo = seg * seg_rows
    r_hi = tl.minimum(r_lo + seg_rows, M)
    acc = tl.zeros((BN, BK), tl.float64 if F64 else tl.float32)
    bsum = tl.zeros((BN,), tl.float64 if F64 else tl.float32)
    n64 = offs_n.to(tl.int64)
    k64 = offs_k.to(tl.int64)
    for r0 in range(r_lo, r_hi, BR):
        r = (r0 + tl.arange(0, BR)).to(tl.int64)
        r_ok = (r < r_hi)[:, None]
        if TRANSPOSED:
            dT = tl.load(d_ptr + n64[:, None] * LD + r[None, :],
                         mask=(offs_n < N_S)[:, None] & (r < r_hi)[None, :], other=0.0)
            bsum += tl.sum(dT.to(bsum.dtype), axis=1)
            if ROUND_D:
                dT = tf32_operand(dT, PRECISION, INTERPRET)
            x = tl.load(x_ptr + k64[None, :] * LD + r[:, None], mask=r_ok & k_in, other=0.0)
        else:
            d = tl.load(d_ptr + r[:, None] * N_S + offs_n[None, :], mask=r_ok & n_in, other=0.0)
            bsum += tl.sum(d.to(bsum.dtype), axis=0)
            if ROUND_D:
                d = tf32_operand(d, PRECISION, INTERPRET)
            x = tl.load(x_ptr + r[:, None] * K_X + offs_k[None, :], mask=r_ok & k_in, other=0.0)
            dT = tl.trans(d)
        acc = mma(dT, x, acc, PRECISION, INTERPRET)
    slot = part_ptr + seg.to(tl.int64) * slot_size
    n_ok = offs_n < N_W
    w = slot + w_off + offs_n[:, None] * K_X + offs_k[None, :]
    w_ok = n_ok[:, None] & k_in
    tl.store(w, tl.load(w, mask=w_ok, other=0.0) + acc, mask=w_ok)
    if pid_k == 0:
        b = slot + b_off + offs_n
        tl.store(b, tl.load(b, mask=n_ok, other=0.0) + bsum, mask=n_ok)


@triton.jit
def chunk_transpose_kernel(src_ptr, M, N_S, dst_ptr, LD, BM: tl.constexpr, BN: tl.constexpr):
    """dst[n, m] = src[m, n] for the chunk's first M rows: src (·, N_S) row-major, dst (N_S, LD).
    Grid: (cdiv(M, BM), cdiv(N_S, BN)); triton stages the tile through shared memory so that both
    the loads and the stores are coalesced."""
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
    ok = (rows < M)[:, None] & (cols < N_S)[None, :]
    x = tl.load(src_ptr + rows[:, None] * N_S + cols[None, :], mask=ok)
    tl.store(dst_ptr + cols[None, :] * LD + rows[:, None], x, mask=ok)


@triton.jit
def chunk_out_kernel(
        out_ptr, x_ptr, raw_ptr, tile0, R, rows_ptr, koff_ptr, woff_ptr, meta_ptr, coord_ptr,
        num_layers, search_steps, wl_ptr, bl_ptr, H_S,
        K: tl.constexpr, K2P: tl.constexpr, SUBSET: tl.constexpr, PERMUTED: tl.constexpr,
        CROP: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr, F64: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr):
    """Last layer of BM rows per program (k² outputs from the chunk's last activations), crop and
    write into the flat buffer (full decode) or the subset's rows. ``raw``: (C, K2P) fp32 scratch."""
    pid = tl.program_id(0)
    y = dense_out(x_ptr + pid.to(tl.int64) * (BM * H_S), H_S, wl_ptr, bl_ptr, K * K, PRECISION,
                  INTERPRET, F64, BM, BK, K2P)
    write_kernels(y, tile0 + pid, R, rows_ptr, koff_ptr, woff_ptr, meta_ptr, coord_ptr, num_layers,
                  search_steps, out_ptr, raw_ptr + pid.to(tl.int64) * (BM * K2P), K, K2P, SUBSET,
                  PERMUTED, CROP, F64, BM)


@triton.jit
def chunk_out_grad_kernel(
        grad_ptr, x_ptr, g_ptr, raw_ptr, tile0, R, rows_ptr, koff_ptr, woff_ptr, meta_ptr, coord_ptr,
        num_layers, search_steps, wl_ptr, bl_ptr, H_S,
        K: tl.constexpr, K2P: tl.constexpr, SUBSET: tl.constexpr, PERMUTED: tl.constexpr,
        CROP: tl.constexpr, HAS_MAX: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
        F64: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Gradient of the k×k outputs of BM rows per program, from the gradient of the decoded kernels
    (flat buffer, or (R, k²) rows of a subset), into g (C, K2P): zero for rows past R and columns
    past k². The max crop recomputes the outputs (from the chunk's last activations) to find each
    window's first maximum; ``raw``: (C, 2·K2P) fp32 scratch for that."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BM)
    q = tl.arange(0, K2P)
    idx, row, valid = tile_rows(tile0 + pid, R, rows_ptr, SUBSET, BM)
    layer = layer_of(row, valid, koff_ptr, num_layers, search_steps)
    slot, _, _, size, crop = kernel_coords(row, valid, layer, koff_ptr, meta_ptr, coord_ptr, PERMUTED)
    raw = raw_ptr + pid.to(tl.int64) * (2 * BM * K2P)
    amax = raw + BM * K2P
    g = output_gradients(grad_ptr, woff_ptr, idx, valid, layer, slot, size, crop,
                         x_ptr + pid.to(tl.int64) * (BM * H_S), H_S, wl_ptr, bl_ptr, raw, amax, K, K2P,
                         SUBSET, CROP, HAS_MAX, PRECISION, INTERPRET, F64, BM, BK)
    local = (pid * BM + offs_m).to(tl.int64)
    tl.store(g_ptr + local[:, None] * K2P + q[None, :], g)
