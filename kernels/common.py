"""Building blocks shared by the decode kernels (all ``@triton.jit`` device functions).

Conventions (see README.md):
* a *tile* is BM consecutive entries of the row list: flat kernel indices 0..N-1 for a full decode,
  or the positions of a subset's ``rows`` tensor;
* every program owns a private *scratch* region in global memory (size ∝ number of programs, never
  ∝ number of kernels) that holds one tile's activations between layers; a ``tl.debug_barrier()``
  separates the writes of one phase from the reads of the next (all threads of the program);
* ``PRECISION``: 0 = fp32 (IEEE), 1 = tf32, 2 = bf16 operands with fp32 accumulation, 3 = fp32
  operands multiplied as three tf32 products ("tf32x3", opt-in for the fp32 mode);
* tf32: every operand is rounded to the nearest tf32 value where it is produced (scratch stores,
  weights by the launcher), so the tensor cores' truncation of fp32 inputs changes nothing;
* ``INTERPRET``: running under ``TRITON_INTERPRET=1`` (numpy), where a bf16 ``tl.dot`` is not
  supported: bf16 operands are then emulated by rounding fp32 values to bf16 (round to nearest
  even, as torch does) and multiplying in fp32 — products of bf16 values are exact in fp32, so the
  result is what a bf16 tensor-core product with fp32 accumulation computes;
* ``F64``: float64 parameters (interpreter only, for gradcheck): accumulators and scratch in fp64.
"""
import triton
import triton.language as tl

PI = tl.constexpr(3.141592653589793)


@triton.jit
def round_to_bf16(x):
    """fp32 -> nearest bf16 value (ties to even), kept as fp32. NaN stays NaN (the bit arithmetic
    alone would carry a full-mantissa NaN such as CUDA's 0x7FFFFFFF into the sign bit: -0.0)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = (bits >> 16) << 16
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def round_to_tf32(x):
    """fp32 -> nearest tf32 value (10-bit mantissa, ties away from zero: cvt.rna.tf32.f32, which
    also keeps NaN; see round_to_bf16)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x1000) >> 13) << 13
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def relu(x):
    """max(x, 0) keeping NaN, as torch.relu does (tl.maximum's default, like a GPU's max
    instruction, returns the other operand: a diverged predictor would decode to finite weights)."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def tf32_operand(x, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """tf32 tensor cores truncate fp32 operands; values already rounded to nearest make that exact.
    Applied where an operand is produced (scratch stores, register operands), not in the K loops.
    The interpreter computes tf32 dots in fp32, so there nothing is rounded."""
    if PRECISION == 1 and not INTERPRET:
        out = round_to_tf32(x)
    else:
        out = x
    return out


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b at the requested precision (acc is fp32, or fp64 for float64 parameters)."""
    if PRECISION == 2:
        if INTERPRET:
            out = tl.dot(round_to_bf16(a.to(tl.float32)), round_to_bf16(b.to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PRECISION == 1:
        out = tl.dot(a, b, acc, input_precision="tf32")
    elif PRECISION == 3:  # fp32 emulated with three tf32 products (opt-in, see the backend)
        out = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        # out_dtype = acc's: fp64 under F64 (triton 3.6 asserts acc's type == out_dtype, fp32 by default)
        out = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    return out


@triton.jit
def to_scratch(x, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """Value as stored in scratch, i.e. as the next layer's operand: bf16 in bf16 mode (the next
    layer casts anyway), rounded to tf32 in tf32 mode (see tf32_operand)."""
    if PRECISION == 2:
        if INTERPRET:
            out = round_to_bf16(x.to(tl.float32))  # the scratch is fp32 under the interpreter
        else:
            out = x.to(tl.bfloat16)
    else:
        out = tf32_operand(x, PRECISION, INTERPRET)
    return out


@triton.jit
def tile_rows(tile, R, rows_ptr, SUBSET: tl.constexpr, BM: tl.constexpr):
    """Positions ``idx`` (in the output), flat kernel indices ``row`` and validity of one tile."""
    idx = (tile * BM + tl.arange(0, BM)).to(tl.int64)
    valid = idx < R
    if SUBSET:
        row = tl.load(rows_ptr + idx, mask=valid, other=0)
    else:
        row = idx
    return idx, row, valid


@triton.jit
def layer_of(row, valid, koff_ptr, num_layers, search_steps):
    """Largest layer l with kernel_offsets[l] <= row (binary search, ceil(log2 L) steps)."""
    lo = tl.zeros_like(row)
    hi = lo + num_layers
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        start = tl.load(koff_ptr + mid, mask=valid, other=0)
        go = start <= row
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def kernel_coords(row, valid, layer, koff_ptr, meta_ptr, coord_ptr, PERMUTED: tl.constexpr):
    """Per row: slot in its layer (where it is written), coordinate filter f and channel c, and the
    layer's table offsets. The permutation changes only which coordinate a slot decodes."""
    slot = row - tl.load(koff_ptr + layer, mask=valid, other=0)
    if PERMUTED:
        local = tl.load(coord_ptr + row, mask=valid, other=0)
    else:
        local = slot
    meta = meta_ptr + layer * 8  # [kernel_off, weight_off, c_out, c_in, size, crop, f_off, c_off]
    c_in = tl.load(meta + 3, mask=valid, other=1).to(tl.int64)
    f = local // c_in
    c = local - f * c_in
    # Rows past the end of the call (the last tile's padding) get table row 0: their slot/local are
    # meaningless (row >= R), and the separable first layer reads T[f_row] / T[c_row] unmasked by
    # row — left as computed they pointed far past the tables, whose garbage (NaN, inf) then reached
    # the weight gradients through 0 × garbage in the backward's products. So do rows of a layer
    # outside a call's layer range (decode(layers=...) marks those layers' offsets -1): the range's
    # tables and positions hold only its own layers' rows.
    f_off = tl.load(meta + 6, mask=valid, other=0).to(tl.int64)
    c_off = tl.load(meta + 7, mask=valid, other=0).to(tl.int64)
    in_tables = valid & (f_off >= 0)
    f_row = tl.where(in_tables, f_off + f, 0)
    c_row = tl.where(in_tables, c_off + c, 0)
    size = tl.load(meta + 4, mask=valid, other=1)
    crop = tl.load(meta + 5, mask=valid, other=0)
    return slot, f_row, c_row, size, crop


@triton.jit
def encoding_chunk(p_l, p_f, p_c, e0, enc_ptr, levels, E, FFN: tl.constexpr, BE: tl.constexpr,
                   F64: tl.constexpr):
    """Columns [e0, e0+BE) of the positional encoding of BM positions, zero beyond E.

    basic: e[i·2L + 2j (+1)] = sin (cos) of p_i · freq_j · π (freq = enc_ptr[j], float32);
    ffn:   e[2m (+1)] = sin (cos) of Σ_i (p_i · 2 · π) · B[m, i] (B = enc_ptr, (3L, 3)).
    Operations in the reference's order so that fp32 results agree to the last bits.
    """
    cols = e0 + tl.arange(0, BE)
    col_ok = cols < E
    if F64:
        p_l = p_l.to(tl.float64)
        p_f = p_f.to(tl.float64)
        p_c = p_c.to(tl.float64)
    if FFN:
        m = cols // 2
        b0 = tl.load(enc_ptr + m * 3 + 0, mask=col_ok, other=0.0)
        b1 = tl.load(enc_ptr + m * 3 + 1, mask=col_ok, other=0.0)
        b2 = tl.load(enc_ptr + m * 3 + 2, mask=col_ok, other=0.0)
        if F64:
            b0 = b0.to(tl.float64)
            b1 = b1.to(tl.float64)
            b2 = b2.to(tl.float64)
        q_l = (p_l * 2) * PI
        q_f = (p_f * 2) * PI
        q_c = (p_c * 2) * PI
        x = q_l[:, None] * b0[None, :] + q_f[:, None] * b1[None, :] + q_c[:, None] * b2[None, :]
    else:
        block = cols // (2 * levels)
        j = (cols % (2 * levels)) // 2
        freq = tl.load(enc_ptr + j, mask=col_ok, other=0.0)
        if F64:
            freq = freq.to(tl.float64)
        p = tl.where(block[None, :] == 0, p_l[:, None],
                     tl.where(block[None, :] == 1, p_f[:, None], p_c[:, None]))
        x = (p * freq[None, :]) * PI
    is_cos = (cols % 2) == 1
    e = tl.where(is_cos[None, :], tl.cos(x), tl.sin(x))
    return tl.where(col_ok[None, :], e, 0.0)


@triton.jit
def store_encoding(dst, E_S, p_l, p_f, p_c, enc_ptr, levels, E, FFN: tl.constexpr,
                   PRECISION: tl.constexpr, INTERPRET: tl.constexpr, F64: tl.constexpr,
                   BM: tl.constexpr, BK: tl.constexpr):
    """Write one tile's encodings into scratch (BM × E_S, zeros in the padding columns)."""
    offs_m = tl.arange(0, BM)
    for e0 in range(0, E_S, BK):
        e = encoding_chunk(p_l, p_f, p_c, e0, enc_ptr, levels, E, FFN, BK, F64)
        cols = e0 + tl.arange(0, BK)
        tl.store(dst + offs_m[:, None] * E_S + cols[None, :], to_scratch(e, PRECISION, INTERPRET),
                 mask=(cols < E_S)[None, :])


@triton.jit
def zero_invalid(h, rows_left, ZERO_INVALID: tl.constexpr):
    """The backward's recomputed activations are 0 in the rows past the end of the last tile (recomputed
    from position 0, gradient 0): a ReLU mask of 0 then zeroes their gradients too, so no 0 · NaN of
    a NaN/inf parameter reaches the weight gradients (eager's stay finite). Done once per stored
    tile rather than as row masks on every weight-gradient load (those raised spills); the tile's
    valid rows are the first ``rows_left`` (a scalar: no row vector kept live through the layers)."""
    if ZERO_INVALID:
        h = tl.where((tl.arange(0, h.shape[0]) < rows_left)[:, None], h, 0.0)
    return h


@triton.jit
def dense_relu(src, K_S, w_ptr, b_ptr, N, N_S, dst, rows_left,
               PRECISION: tl.constexpr, INTERPRET: tl.constexpr, F64: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ZERO_INVALID: tl.constexpr):
    """dst = relu(src @ W.T + b) for one tile.

    src: (BM, K_S) scratch; W: (N, K_S) zero-padded rows; dst: (BM, N_S) scratch whose columns
    >= N come out 0. Padded sizes are multiples of 16, so the masks are uniform over vectors and the
    loads vectorise (and, for bf16, stage asynchronously); only weight *rows* use the true N.
    ZERO_INVALID: rows from ``rows_left`` on (past the end) are stored as 0 (see ``zero_invalid``).
    """
    offs_m = tl.arange(0, BM)
    for n0 in range(0, N_S, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_ok = offs_n < N
        acc = tl.zeros((BM, BN), tl.float64 if F64 else tl.float32)
        for k0 in range(0, K_S, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < K_S
            a = tl.load(src + offs_m[:, None] * K_S + offs_k[None, :], mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + offs_n[None, :] * K_S + offs_k[:, None], mask=n_ok[None, :] & k_ok[:, None],
                        other=0.0)
            acc = mma(a, w, acc, PRECISION, INTERPRET)
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)
        h = zero_invalid(relu(acc + bias[None, :]), rows_left, ZERO_INVALID)
        tl.store(dst + offs_m[:, None] * N_S + offs_n[None, :], to_scratch(h, PRECISION, INTERPRET),
                 mask=(offs_n < N_S)[None, :])


@triton.jit
def separable_relu(tab_ptr, layer, f_row, c_row, H_S, dst, rows_left,
                   PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, ZERO_INVALID: tl.constexpr):
    """First layer via the separable tables: relu(T[layer] + T[filter row] + T[channel row]).

    Table rows (stride H_S, zero padding columns): [0, L) layer terms (b1 included), then the filter
    block, then the channel block; ``f_row``/``c_row`` are already absolute table rows.
    """
    offs_m = tl.arange(0, BM)
    for n0 in range(0, H_S, BN):
        cols = (n0 + tl.arange(0, BN))[None, :]
        ok = cols < H_S
        t = tl.load(tab_ptr + layer[:, None] * H_S + cols, mask=ok, other=0.0)
        t += tl.load(tab_ptr + f_row[:, None] * H_S + cols, mask=ok, other=0.0)
        t += tl.load(tab_ptr + c_row[:, None] * H_S + cols, mask=ok, other=0.0)
        h = zero_invalid(relu(t), rows_left, ZERO_INVALID)
        tl.store(dst + offs_m[:, None] * H_S + cols, to_scratch(h, PRECISION, INTERPRET), mask=ok)


@triton.jit
def dense_out(src, K_S, w_ptr, b_ptr, K2,
              PRECISION: tl.constexpr, INTERPRET: tl.constexpr, F64: tl.constexpr,
              BM: tl.constexpr, BK: tl.constexpr, K2P: tl.constexpr):
    """Final layer into registers: (BM, K2P) = src @ Wl.T + bl; Wl (K2, K_S); columns >= K2 are 0."""
    offs_m = tl.arange(0, BM)
    offs_q = tl.arange(0, K2P)
    q_ok = offs_q < K2
    acc = tl.zeros((BM, K2P), tl.float64 if F64 else tl.float32)
    for k0 in range(0, K_S, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < K_S
        a = tl.load(src + offs_m[:, None] * K_S + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_q[None, :] * K_S + offs_k[:, None], mask=q_ok[None, :] & k_ok[:, None],
                    other=0.0)
        acc = mma(a, w, acc, PRECISION, INTERPRET)
    bias = tl.load(b_ptr + offs_q, mask=q_ok, other=0.0)
    return acc + bias[None, :]


@triton.jit
def exact_div(x, y, F64: tl.constexpr):
    """x / y correctly rounded, as torch divides (on a GPU `/` compiles to div.full.f32: 2 ulp). Used
    by the forward's average crop; the backward keeps `/` (inside its unrolled window loops div_rn
    raised the max-crop backward's spills from 128 to 528 B per thread for 1-2 ulp)."""
    if F64:
        return x / y
    else:
        return tl.math.div_rn(x, y)


@triton.jit
def crop_gather(raw, valid, size, crop, K: tl.constexpr, BM: tl.constexpr, K2P: tl.constexpr,
                F64: tl.constexpr):
    """NeRN's s×s sampling of the k×k outputs held in scratch ``raw`` (BM × K2P, row-major k×k).

    Column q < s² of the result is entry (q // s, q % s): centre crop (offset (k-s)//2), average or
    max pooling over the (k-s+1)² window (stride 1). Rows with s == k come out unchanged.
    """
    offs_m = tl.arange(0, BM)
    q = tl.arange(0, K2P)[None, :]
    s = size[:, None]
    mode = crop[:, None]
    a = q // s
    b = q % s
    q_ok = (q < s * s) & valid[:, None]
    win = K - s + 1
    lo = (K - s) // 2
    base = raw + offs_m[:, None] * K2P
    center = tl.load(base + (a + lo) * K + (b + lo), mask=q_ok, other=0.0)
    total = tl.zeros((BM, K2P), tl.float64 if F64 else tl.float32)
    best = tl.full((BM, K2P), float("-inf"), tl.float64 if F64 else tl.float32)
    for da in tl.static_range(K):
        for db in tl.static_range(K):
            inside = q_ok & (da < win) & (db < win)
            v = tl.load(base + (a + da) * K + (b + db), mask=inside, other=0.0)
            total += v
            best = tl.where(inside & ((v > best) | (v != v)), v, best)  # NaN wins, as in torch
    mean = exact_div(total, (win * win).to(total.dtype), F64)
    out = tl.where(mode == 0, center, tl.where(mode == 1, mean, best))
    return tl.where(q_ok, out, 0.0)


@triton.jit
def write_kernels(y, tile, R, rows_ptr, koff_ptr, woff_ptr, meta_ptr, coord_ptr, num_layers,
                  search_steps, out_ptr, raw, K: tl.constexpr, K2P: tl.constexpr,
                  SUBSET: tl.constexpr, PERMUTED: tl.constexpr, CROP: tl.constexpr, F64: tl.constexpr,
                  BM: tl.constexpr):
    """Crop the k×k outputs ``y`` (BM × K2P) of one tile and write them where they belong.

    Full decode: the s×s kernel of row i goes to weight_off[layer] + slot·s² of the flat buffer;
    subset: to out[i, :k²] (s×s values first, zeros after). ``raw`` is a BM × K2P fp32 scratch
    for the crop's gathers. The row data is recomputed here (cheap) rather than kept in registers
    through the GEMM loops (it cost hundreds of bytes of spills per thread at 128-row tiles).
    """
    offs_m = tl.arange(0, BM)
    q = tl.arange(0, K2P)
    idx, row, valid = tile_rows(tile, R, rows_ptr, SUBSET, BM)
    layer = layer_of(row, valid, koff_ptr, num_layers, search_steps)
    slot, _, _, size, crop = kernel_coords(row, valid, layer, koff_ptr, meta_ptr, coord_ptr, PERMUTED)
    if CROP:
        tl.store(raw + offs_m[:, None] * K2P + q[None, :], y)
        tl.debug_barrier()
        y = crop_gather(raw, valid, size, crop, K, BM, K2P, F64)
        s2 = (size * size)[:, None]
    else:
        s2 = K * K
    keep = valid[:, None] & (q[None, :] < s2)
    if SUBSET:
        tl.store(out_ptr + idx[:, None] * (K * K) + q[None, :], tl.where(keep, y, 0.0),
                 mask=valid[:, None] & (q[None, :] < K * K))
    else:
        start = tl.load(woff_ptr + layer, mask=valid, other=0) + slot * (size * size)
        tl.store(out_ptr + start[:, None] + q[None, :], y, mask=keep)
