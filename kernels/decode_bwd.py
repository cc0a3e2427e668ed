"""Backward decode: gradients of every MLP weight and bias from the gradient of the decoded weights.

One persistent launch recomputes each tile's activations (nothing per kernel is stored between
forward and backward), back-propagates through the crop and every layer, and adds the tile's
weight/bias gradients into its program's *partial slot*. Deterministic mode: every program owns a
slot (its first tile writes, later tiles add) and ``reduce_partials_kernel`` sums the slots in a
fixed order. Atomic mode (opt-in): all programs ``atomic_add`` into one zeroed slot.

Slot layout = the parameters in order with padded rows (so that accesses vectorise): W1 (H, E_S),
W_hidden (NH, H, H_S), W_last (k², H_S), b1 (H_S), b_hidden (NH, H_S), b_last (K2P); the launcher
cuts the padding off.

K_MAJOR (tf32): Hopper's tf32 wgmma reads shared-memory operands only K-major, and the weight
gradient dzᵀ @ x reduces over the tile's rows while the input gradient dz @ W reduces over W's
rows; as stored, triton stages those operands 4 bytes at a time. With K_MAJOR the program also keeps
transposed copies of its scratch (encodings, activations, the current gradient: (width, BM) each)
and the launcher passes transposed hidden and last weights (``wht_ptr``: (NH, H_S, H_S),
``wlt_ptr``: (H_S, K2P), zero padding), so every operand is K-major.
"""
import triton
import triton.language as tl

from .common import (dense_out, dense_relu, kernel_coords, layer_of, mma, separable_relu,
                     store_encoding, tf32_operand, tile_rows, to_scratch)


@triton.jit
def _accumulate(ptr, val, mask, not_first, ATOMIC: tl.constexpr):
    if ATOMIC:
        tl.atomic_add(ptr, val, mask=mask)
    else:
        prev = tl.load(ptr, mask=mask & not_first, other=0.0)
        tl.store(ptr, prev + val, mask=mask)


@triton.jit
def _transpose_tile(src, N_S, dst_t, BM: tl.constexpr, BN: tl.constexpr):
    """dst_t (N_S, BM) = src (BM, N_S)ᵀ: a scratch buffer's K-major copy for the weight gradient.
    Called with 16 columns at a time: 64-column passes raised the tf32 max-crop backward's spills
    from 208 to 608 B per thread (sm_90, BM = 64, 4 warps)."""
    offs_m = tl.arange(0, BM)
    for n0 in range(0, N_S, BN):
        cols = n0 + tl.arange(0, BN)
        ok = (cols < N_S)[None, :]
        v = tl.load(src + offs_m[:, None] * N_S + cols[None, :], mask=ok, other=0.0)
        tl.store(dst_t + cols[None, :] * BM + offs_m[:, None], v, mask=ok)


@triton.jit
def _weight_grad(dz, N, N_S, x, KD_S, w_slot, b_slot, not_first, dz_t, x_t,
                 ATOMIC: tl.constexpr, K_MAJOR: tl.constexpr, PRECISION: tl.constexpr,
                 INTERPRET: tl.constexpr, F64: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Slot of W (N rows of KD_S) += dzᵀ @ x; slot of b += Σ_rows dz.

    dz: (BM, N_S) scratch, x: (BM, KD_S) scratch (both zero in their padding columns); K_MAJOR:
    read from their transposed copies dz_t (N_S, BM) and x_t (KD_S, BM) instead.
    """
    offs_m = tl.arange(0, BM)
    for n0 in range(0, N_S, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_ok = offs_n < N
        if K_MAJOR:
            dT = tl.load(dz_t + offs_n[:, None] * BM + offs_m[None, :], mask=(offs_n < N_S)[:, None], other=0.0)
            bsum = tl.sum(dT.to(tl.float64 if F64 else tl.float32), axis=1)
        else:
            d = tl.load(dz + offs_m[:, None] * N_S + offs_n[None, :], mask=(offs_n < N_S)[None, :], other=0.0)
            dT = tl.trans(d)
            bsum = tl.sum(d.to(tl.float64 if F64 else tl.float32), axis=0)
        _accumulate(b_slot + offs_n, bsum, n_ok, not_first, ATOMIC)
        for k0 in range(0, KD_S, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < KD_S
            if K_MAJOR:
                xk = tl.load(x_t + offs_k[None, :] * BM + offs_m[:, None], mask=k_ok[None, :], other=0.0)
            else:
                xk = tl.load(x + offs_m[:, None] * KD_S + offs_k[None, :], mask=k_ok[None, :], other=0.0)
            part = mma(dT, xk, tl.zeros((BN, BK), tl.float64 if F64 else tl.float32), PRECISION, INTERPRET)
            _accumulate(w_slot + offs_n[:, None] * KD_S + offs_k[None, :], part,
                        n_ok[:, None] & k_ok[None, :], not_first, ATOMIC)


@triton.jit
def _backprop_relu(dz, N, N_S, w_ptr, KD_S, x, dst,
                   K_MAJOR: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                   F64: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """dst = (dz @ W) · (x > 0): the gradient before the ReLU that produced x (NaN x passes, as torch).

    dz: (BM, N_S); W: (N, KD_S) zero-padded rows, or with K_MAJOR Wᵀ (KD_S, N_S) zero-padded;
    x, dst: (BM, KD_S).
    """
    offs_m = tl.arange(0, BM)
    for n0 in range(0, KD_S, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_ok = offs_n < KD_S
        acc = tl.zeros((BM, BN), tl.float64 if F64 else tl.float32)
        for k0 in range(0, N_S, BK):
            offs_k = k0 + tl.arange(0, BK)
            a = tl.load(dz + offs_m[:, None] * N_S + offs_k[None, :], mask=(offs_k < N_S)[None, :], other=0.0)
            if K_MAJOR:
                w = tl.load(w_ptr + offs_n[None, :] * N_S + offs_k[:, None],
                            mask=(offs_k < N_S)[:, None] & n_ok[None, :], other=0.0)
            else:
                w = tl.load(w_ptr + offs_k[:, None] * KD_S + offs_n[None, :],
                            mask=(offs_k < N)[:, None] & n_ok[None, :], other=0.0)
            acc = mma(a, w, acc, PRECISION, INTERPRET)
        h = tl.load(x + offs_m[:, None] * KD_S + offs_n[None, :], mask=n_ok[None, :], other=0.0)
        tl.store(dst + offs_m[:, None] * KD_S + offs_n[None, :],
                 to_scratch(tl.where(h <= 0, 0.0, acc), PRECISION, INTERPRET), mask=n_ok[None, :])


@triton.jit
def _window_argmax(raw, amax, valid, size, K: tl.constexpr, BM: tl.constexpr, K2P: tl.constexpr):
    """For max-crop rows: window offset da·k + db of the first maximum of each s×s output (of the
    last NaN in the window, if any: torch's max_pool2d rule)."""
    offs_m = tl.arange(0, BM)
    q = tl.arange(0, K2P)[None, :]
    s = size[:, None]
    a = q // s
    b = q % s
    q_ok = (q < s * s) & valid[:, None]
    win = K - s + 1
    base = raw + offs_m[:, None] * K2P
    best = tl.full((BM, K2P), float("-inf"), raw.dtype.element_ty)
    arg = tl.zeros((BM, K2P), tl.int32)
    for da in tl.static_range(K):
        for db in tl.static_range(K):
            inside = q_ok & (da < win) & (db < win)
            v = tl.load(base + (a + da) * K + (b + db), mask=inside, other=0.0)
            better = inside & ((v > best) | (v != v))  # NaN wins (the last one), as in torch
            best = tl.where(better, v, best)
            arg = tl.where(better, da * K + db, arg)
    tl.store(amax + offs_m[:, None] * K2P + q, arg.to(raw.dtype.element_ty))


@triton.jit
def _grad_of_outputs(gbase, valid, size, crop, amax, CROP: tl.constexpr, HAS_MAX: tl.constexpr,
                     F64: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, K2P: tl.constexpr):
    """Gradient w.r.t. the k×k MLP outputs (BM × K2P) from the gradient of the s×s kernels at gbase.

    Gather form of the crop's backward: output p = (y, x) collects the s×s gradients of every window
    position (a, b) = (y - da, x - db) it belongs to: centre (da = db = (k-s)//2), average (1/w² each)
    or max (only where (da, db) was the window's first maximum).
    """
    offs_m = tl.arange(0, BM)
    p = tl.arange(0, K2P)[None, :]
    p_ok = (p < K * K) & valid[:, None]
    if CROP:
        s = size[:, None]
        # A k×k layer is not cropped whatever its mode: as centre (the identity). Its mode may be max
        # where HAS_MAX is off (only cropped layers set it), which would drop its gradients.
        mode = tl.where(s == K, 0, crop[:, None])
        y = p // K
        x = p % K
        win = K - s + 1
        lo = (K - s) // 2
        g = tl.zeros((BM, K2P), tl.float64 if F64 else tl.float32)
        for da in tl.static_range(K):
            for db in tl.static_range(K):
                a = y - da
                b = x - db
                inside = p_ok & (a >= 0) & (a < s) & (b >= 0) & (b < s)
                qq = a * s + b
                ds = tl.load(gbase + qq, mask=inside, other=0.0)
                in_window = (da < win) & (db < win)
                take_center = (mode == 0) & (da == lo) & (db == lo)
                g += tl.where(take_center, ds, 0.0)
                g += tl.where((mode == 1) & in_window, ds / (win * win).to(g.dtype), 0.0)
                if HAS_MAX:
                    am = tl.load(amax + offs_m[:, None] * K2P + qq, mask=inside & (mode == 2), other=-1.0)
                    g += tl.where((mode == 2) & in_window & (am == da * K + db), ds, 0.0)
    else:
        g = tl.load(gbase + p, mask=p_ok, other=0.0)
    return g


@triton.jit
def output_gradients(grad_ptr, woff_ptr, idx, valid, layer, slot_in_layer, size, crop, last, H_S, wl_ptr,
                     bl_ptr, raw, amax, K: tl.constexpr, K2P: tl.constexpr, SUBSET: tl.constexpr,
                     CROP: tl.constexpr, HAS_MAX: tl.constexpr, PRECISION: tl.constexpr,
                     INTERPRET: tl.constexpr, F64: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Gradient of a tile's k×k MLP outputs (BM × K2P) from the gradient of the decode's output (flat
    buffer, or (R, k²) rows of a subset). The max crop's backward needs the outputs themselves: they
    are recomputed from the last hidden activations ``last`` into the fp32 scratch ``raw``, and each
    window's first maximum goes to ``amax``."""
    if HAS_MAX:
        offs_m = tl.arange(0, BM)
        q = tl.arange(0, K2P)
        y = dense_out(last, H_S, wl_ptr, bl_ptr, K * K, PRECISION, INTERPRET, F64, BM, BK, K2P)
        tl.store(raw + offs_m[:, None] * K2P + q[None, :], y)
        tl.debug_barrier()
        _window_argmax(raw, amax, valid, size, K, BM, K2P)
        tl.debug_barrier()
    if SUBSET:
        gbase = grad_ptr + idx[:, None] * (K * K)
    else:
        gbase = grad_ptr + (tl.load(woff_ptr + layer, mask=valid, other=0)
                            + slot_in_layer * (size * size))[:, None]
    return _grad_of_outputs(gbase, valid, size, crop, amax, CROP, HAS_MAX, F64, K, BM, K2P)


@triton.jit
def decode_bwd_kernel(
        grad_ptr, rows_ptr, R,
        koff_ptr, woff_ptr, meta_ptr, coord_ptr, pos_l_ptr, pos_f_ptr, pos_c_ptr, enc_ptr,
        num_layers, search_steps, levels, E,
        w1_ptr, b1_ptr, wh_ptr, bh_ptr, wl_ptr, bl_ptr, H, num_hidden,
        tab_ptr, tab_f_base, tab_c_base,
        scr_ptr, scr32_ptr, E_S, H_S,
        part_ptr, slot_size, wht_ptr, wlt_ptr,
        K: tl.constexpr, K2P: tl.constexpr, SUBSET: tl.constexpr, PERMUTED: tl.constexpr,
        FFN: tl.constexpr, SEPARABLE: tl.constexpr, CROP: tl.constexpr, HAS_MAX: tl.constexpr,
        ATOMIC: tl.constexpr, K_MAJOR: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
        F64: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr):
    """Per tile: recompute encoding and activations into scratch, then walk the layers backwards.

    Scratch per program: encoding (BM × E_S), activations of the NH+1 hidden outputs
    ((NH+1) × BM × H_S), two gradient buffers (2 × BM × H_S); fp32 scratch: the k×k outputs and the
    max-crop argmax (2 × BM × K2P). ``grad_ptr`` holds the gradient of the decode's output (flat
    buffer, or (R, k²) rows for a subset). Weights are padded as in the forward kernel. K_MAJOR
    adds the transposed copies to the scratch: encoding, activations, one gradient buffer
    ((E_S + (NH+2)·H_S) × BM).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    per_program = E_S + (num_hidden + 3) * H_S
    if K_MAJOR:
        per_program += E_S + (num_hidden + 2) * H_S
    enc_s = scr_ptr + pid.to(tl.int64) * (BM * per_program)
    acts = enc_s + BM * E_S
    dz0 = acts + (num_hidden + 1) * (BM * H_S)
    enc_t = dz0 + 2 * (BM * H_S)  # K_MAJOR only: (E_S, BM), then (NH+1) × (H_S, BM), then (H_S, BM)
    acts_t = enc_t + BM * E_S
    dz_t = acts_t + (num_hidden + 1) * (BM * H_S)
    raw = scr32_ptr + pid.to(tl.int64) * (2 * BM * K2P)
    amax = raw + BM * K2P
    if ATOMIC:
        slot = part_ptr
    else:
        slot = part_ptr + pid.to(tl.int64) * slot_size
    o_wh = H * E_S
    o_wl = o_wh + num_hidden * H * H_S
    o_b1 = o_wl + K * K * H_S
    o_bh = o_b1 + H_S
    o_bl = o_bh + num_hidden * H_S
    offs_m = tl.arange(0, BM)
    q = tl.arange(0, K2P)
    q_ok = q < K * K
    num_tiles = tl.cdiv(R, BM)
    for tile in range(pid, num_tiles, nprog):
        not_first = tile != pid
        idx, row, valid = tile_rows(tile, R, rows_ptr, SUBSET, BM)
        layer = layer_of(row, valid, koff_ptr, num_layers, search_steps)
        _, f_row, c_row, _, _ = kernel_coords(row, valid, layer, koff_ptr, meta_ptr, coord_ptr, PERMUTED)
        p_l = tl.load(pos_l_ptr + layer, mask=valid, other=0.0)
        p_f = tl.load(pos_f_ptr + f_row, mask=valid, other=0.0)
        p_c = tl.load(pos_c_ptr + c_row, mask=valid, other=0.0)
        tl.debug_barrier()  # the previous tile is done with this program's scratch
        store_encoding(enc_s, E_S, p_l, p_f, p_c, enc_ptr, levels, E, FFN, PRECISION, INTERPRET, F64,
                       BM, BK)
        tl.debug_barrier()
        # ---- recompute the activations (0 in the rows past the end: common.zero_invalid)
        if SEPARABLE:
            separable_relu(tab_ptr, layer, f_row + tab_f_base, c_row + tab_c_base, H_S, acts, R - tile * BM,
                           PRECISION, INTERPRET, BM, BS, True)
        else:
            dense_relu(enc_s, E_S, w1_ptr, b1_ptr, H, H_S, acts, R - tile * BM, PRECISION, INTERPRET, F64,
                       BM, BN, BK, True)
        tl.debug_barrier()
        for i in range(num_hidden):
            dense_relu(acts + i * (BM * H_S), H_S, wh_ptr + i * H * H_S, bh_ptr + i * H, H, H_S,
                       acts + (i + 1) * (BM * H_S), R - tile * BM, PRECISION, INTERPRET, F64, BM, BN, BK, True)
            tl.debug_barrier()
        last = acts + num_hidden * (BM * H_S)
        last_t = acts_t + num_hidden * (BM * H_S)
        if K_MAJOR:
            _transpose_tile(enc_s, E_S, enc_t, BM, 16)
            for i in range(num_hidden + 1):
                _transpose_tile(acts + i * (BM * H_S), H_S, acts_t + i * (BM * H_S), BM, 16)
            tl.debug_barrier()
        # Row data again (cheap) rather than kept in registers through the layers above.
        idx, row, valid = tile_rows(tile, R, rows_ptr, SUBSET, BM)
        layer = layer_of(row, valid, koff_ptr, num_layers, search_steps)
        slot_in_layer, _, _, size, crop = kernel_coords(row, valid, layer, koff_ptr, meta_ptr, coord_ptr,
                                                        PERMUTED)
        # ---- gradient of the k×k outputs
        g = output_gradients(grad_ptr, woff_ptr, idx, valid, layer, slot_in_layer, size, crop, last, H_S,
                             wl_ptr, bl_ptr, raw, amax, K, K2P, SUBSET, CROP, HAS_MAX, PRECISION,
                             INTERPRET, F64, BM, BK)
        # ---- last layer: W_last (k², H), b_last
        _accumulate(slot + o_bl + q, tl.sum(g, axis=0), q_ok, not_first, ATOMIC)
        g = tf32_operand(g, PRECISION, INTERPRET)  # from here on a dot operand
        gT = tl.trans(g)
        for k0 in range(0, H_S, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < H_S
            if K_MAJOR:
                xk = tl.load(last_t + offs_k[None, :] * BM + offs_m[:, None], mask=k_ok[None, :], other=0.0)
            else:
                xk = tl.load(last + offs_m[:, None] * H_S + offs_k[None, :], mask=k_ok[None, :], other=0.0)
            part = mma(gT, xk, tl.zeros((K2P, BK), tl.float64 if F64 else tl.float32), PRECISION, INTERPRET)
            _accumulate(slot + o_wl + q[:, None] * H_S + offs_k[None, :], part,
                        q_ok[:, None] & k_ok[None, :], not_first, ATOMIC)
        for n0 in range(0, H_S, BN):
            offs_n = n0 + tl.arange(0, BN)
            n_ok = offs_n < H_S
            if K_MAJOR:  # Wlᵀ (H_S, K2P), zero padding
                w = tl.load(wlt_ptr + offs_n[None, :] * K2P + q[:, None], mask=n_ok[None, :], other=0.0)
            else:
                w = tl.load(wl_ptr + q[:, None] * H_S + offs_n[None, :], mask=q_ok[:, None] & n_ok[None, :],
                            other=0.0)
            dh = mma(g, w, tl.zeros((BM, BN), tl.float64 if F64 else tl.float32), PRECISION, INTERPRET)
            h = tl.load(last + offs_m[:, None] * H_S + offs_n[None, :], mask=n_ok[None, :], other=0.0)
            tl.store(dz0 + offs_m[:, None] * H_S + offs_n[None, :],
                     to_scratch(tl.where(h <= 0, 0.0, dh), PRECISION, INTERPRET), mask=n_ok[None, :])
        tl.debug_barrier()
        if K_MAJOR:  # one dzᵀ buffer: rewritten only after the barrier that ends its readers' layer
            _transpose_tile(dz0, H_S, dz_t, BM, 16)
            tl.debug_barrier()
        # ---- hidden layers, last to first: layer i maps acts[i] -> acts[i+1] with W_hidden[i]
        for j in range(num_hidden):
            i = num_hidden - 1 - j
            cur = dz0 + (j % 2) * (BM * H_S)
            nxt = dz0 + ((j + 1) % 2) * (BM * H_S)
            x = acts + i * (BM * H_S)
            _weight_grad(cur, H, H_S, x, H_S, slot + o_wh + i * H * H_S, slot + o_bh + i * H_S,
                         not_first, dz_t, acts_t + i * (BM * H_S), ATOMIC, K_MAJOR, PRECISION, INTERPRET,
                         F64, BM, BN, BK)
            if K_MAJOR:
                w_i = wht_ptr + i * H_S * H_S
            else:
                w_i = wh_ptr + i * H * H_S
            _backprop_relu(cur, H, H_S, w_i, H_S, x, nxt, K_MAJOR, PRECISION, INTERPRET, F64, BM, BN, BK)
            tl.debug_barrier()
            if K_MAJOR:
                _transpose_tile(nxt, H_S, dz_t, BM, 16)
                tl.debug_barrier()
        # ---- first layer: W1 (H, E) against the encoding
        _weight_grad(dz0 + (num_hidden % 2) * (BM * H_S), H, H_S, enc_s, E_S, slot, slot + o_b1,
                     not_first, dz_t, enc_t, ATOMIC, K_MAJOR, PRECISION, INTERPRET, F64, BM, BN, BK)


@triton.jit
def reduce_partials_kernel(part_ptr, out_ptr, num_parts, slot_size, BLOCK: tl.constexpr):
    """out = Σ_p partial[p] in the fixed order p = 0, 1, ... (deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < slot_size
    ptrs = part_ptr + offs
    acc = tl.load(ptrs, mask=ok, other=0.0)
    for _ in range(1, num_parts):
        ptrs += slot_size
        acc += tl.load(ptrs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc, mask=ok)
