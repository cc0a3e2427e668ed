"""Forward decode: one persistent launch over tiles of kernels (plus, for the separable first
layer, one small launch that builds the per-layer tables first)."""
import triton
import triton.language as tl

from .common import (dense_out, dense_relu, encoding_chunk, kernel_coords, layer_of, mma,
                     separable_relu, store_encoding, tf32_operand, tile_rows, write_kernels)


@triton.jit
def first_layer_tables_kernel(
        tab_ptr, T, num_layers, num_filters,
        pos_l_ptr, pos_f_ptr, pos_c_ptr, enc_ptr, levels, E, E_S,
        w1_ptr, b1_ptr, H, H_S,
        PRECISION: tl.constexpr, INTERPRET: tl.constexpr, F64: tl.constexpr,
        BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Separable first layer (basic encoding): T[t] = W1_i · e_i(p_t) (+ b1 for layer rows).

    Rows t: [0, L) the layer positions (index i = 0), [L, L+F) the concatenated filter positions of
    every layer (i = 1), then the channel positions (i = 2). T is (rows, H_S), zero beyond H; W1 is
    (H, E_S) zero-padded. Grid: (row tiles, column tiles of H_S).
    """
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = pid_t * BT + tl.arange(0, BT)
    t_ok = t < T
    is_l = t < num_layers
    is_f = (t >= num_layers) & (t < num_layers + num_filters)
    index = tl.where(is_l, 0, tl.where(is_f, 1, 2))
    p_l = tl.load(pos_l_ptr + t, mask=t_ok & is_l, other=0.0)
    p_f = tl.load(pos_f_ptr + (t - num_layers), mask=t_ok & is_f, other=0.0)
    p_c = tl.load(pos_c_ptr + (t - num_layers - num_filters), mask=t_ok & (index == 2), other=0.0)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < H
    acc = tl.zeros((BT, BN), tl.float64 if F64 else tl.float32)
    for e0 in range(0, E_S, BK):
        cols = e0 + tl.arange(0, BK)
        e = encoding_chunk(p_l, p_f, p_c, e0, enc_ptr, levels, E, False, BK, F64)
        own_block = (cols // (2 * levels))[None, :] == index[:, None]  # only this row's index block
        e = tf32_operand(tl.where(own_block, e, 0.0), PRECISION, INTERPRET)
        w = tl.load(w1_ptr + offs_n[None, :] * E_S + cols[:, None],
                    mask=n_ok[None, :] & (cols < E_S)[:, None], other=0.0)
        acc = mma(e, w, acc, PRECISION, INTERPRET)
    bias = tl.load(b1_ptr + offs_n, mask=n_ok, other=0.0)
    acc += tl.where(is_l[:, None], bias[None, :], 0.0)
    tl.store(tab_ptr + t[:, None].to(tl.int64) * H_S + offs_n[None, :], acc,
             mask=t_ok[:, None] & (offs_n < H_S)[None, :])


@triton.jit
def decode_fwd_kernel(
        out_ptr, rows_ptr, R,
        koff_ptr, woff_ptr, meta_ptr, coord_ptr, pos_l_ptr, pos_f_ptr, pos_c_ptr, enc_ptr,
        num_layers, search_steps, levels, E,
        w1_ptr, b1_ptr, wh_ptr, bh_ptr, wl_ptr, bl_ptr, H, num_hidden,
        tab_ptr, tab_f_base, tab_c_base,
        scr_ptr, scr32_ptr, E_S, H_S,
        K: tl.constexpr, K2P: tl.constexpr, SUBSET: tl.constexpr, PERMUTED: tl.constexpr,
        FFN: tl.constexpr, SEPARABLE: tl.constexpr, CROP: tl.constexpr,
        PRECISION: tl.constexpr, INTERPRET: tl.constexpr, F64: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr):
    """Decode R rows: coordinates, encoding, every MLP layer, crop, write.

    Full decode (SUBSET=False): row i is flat kernel i, written into the flat weight buffer at
    weight_off[layer] + slot·s² (its cropped s×s kernel). Subset: row i is rows[i], written to
    out[i, :k²] (s×s values first, zeros after). Each program walks tiles pid, pid+P, ... and keeps
    a tile's activations in its own scratch: the encoding (BM × E_S, unless SEPARABLE) and two
    BM × H_S buffers that alternate between layers. Weights are zero-padded to row lengths E_S (W1)
    and H_S (hidden, last), multiples of 16; the hidden layers are one (NH, H, H_S) buffer.
    BM rows per tile; BN output and BK reduction columns per GEMM chunk; BS columns per chunk of
    the separable gathers (narrower than BN: three row-gathered pointer tiles are register-hungry).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    enc_width = 0 if SEPARABLE else E_S
    enc_s = scr_ptr + pid.to(tl.int64) * (BM * (enc_width + 2 * H_S))
    act0 = enc_s + BM * enc_width
    raw = scr32_ptr + pid.to(tl.int64) * (BM * K2P)
    num_tiles = tl.cdiv(R, BM)
    for tile in range(pid, num_tiles, nprog):
        idx, row, valid = tile_rows(tile, R, rows_ptr, SUBSET, BM)
        layer = layer_of(row, valid, koff_ptr, num_layers, search_steps)
        _, f_row, c_row, _, _ = kernel_coords(row, valid, layer, koff_ptr, meta_ptr, coord_ptr, PERMUTED)
        tl.debug_barrier()  # the previous tile is done with this program's scratch
        if SEPARABLE:
            separable_relu(tab_ptr, layer, f_row + tab_f_base, c_row + tab_c_base, H_S, act0, R - tile * BM,
                           PRECISION, INTERPRET, BM, BS, False)
        else:
            p_l = tl.load(pos_l_ptr + layer, mask=valid, other=0.0)
            p_f = tl.load(pos_f_ptr + f_row, mask=valid, other=0.0)
            p_c = tl.load(pos_c_ptr + c_row, mask=valid, other=0.0)
            store_encoding(enc_s, E_S, p_l, p_f, p_c, enc_ptr, levels, E, FFN, PRECISION, INTERPRET,
                           F64, BM, BK)
            tl.debug_barrier()
            dense_relu(enc_s, E_S, w1_ptr, b1_ptr, H, H_S, act0, R - tile * BM, PRECISION, INTERPRET, F64,
                       BM, BN, BK, False)
        tl.debug_barrier()
        for i in range(num_hidden):
            src = act0 + (i % 2) * (BM * H_S)
            dst = act0 + ((i + 1) % 2) * (BM * H_S)
            dense_relu(src, H_S, wh_ptr + i * H * H_S, bh_ptr + i * H, H, H_S, dst, R - tile * BM,
                       PRECISION, INTERPRET, F64, BM, BN, BK, False)
            tl.debug_barrier()
        last = act0 + (num_hidden % 2) * (BM * H_S)
        y = dense_out(last, H_S, wl_ptr, bl_ptr, K * K, PRECISION, INTERPRET, F64, BM, BK, K2P)
        write_kernels(y, tile, R, rows_ptr, koff_ptr, woff_ptr, meta_ptr, coord_ptr, num_layers,
                      search_steps, out_ptr, raw, K, K2P, SUBSET, PERMUTED, CROP, F64, BM)
