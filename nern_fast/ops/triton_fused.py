"""Launchers of the fused schedule: one persistent launch per decode (forward) or gradient
(backward), each program walking tiles of rows through every layer (``nern_fast.kernels``
``decode_fwd`` / ``decode_bwd``), plus the separable first-layer tables both schedules use."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from nern_fast.kernels import decode_bwd, decode_fwd

from .triton_inputs import INTERPRETED, DecodeShape, LaunchInputs, PackedParameters, cdiv
from .triton_tuner import LaunchConfig, num_sms


def _table_tiles() -> tuple[int, int, int, int]:
    """(BT, BN, BK, warps) of the table kernel (small: a few thousand rows)."""
    return (32, 32, 32, 4) if INTERPRETED else (64, 64, 32, 4)


def first_layer_tables(inputs: LaunchInputs, packed: PackedParameters) -> torch.Tensor:
    """Separable first layer: rows [0, L) layer terms (+ b1), then filter, then channel terms.
    Built from the packed (padded) W1; kept with the packed parameters while they are unchanged."""
    return packed.first_layer_tables(inputs.layout_tensors(),
                                     lambda: _build_tables(inputs, packed.params[0]))


def _build_tables(inputs: LaunchInputs, w1: torch.Tensor) -> torch.Tensor:
    shape = inputs.shape
    h_s = shape.hidden_stride
    tables = torch.empty((shape.table_rows, h_s), device=inputs.device, dtype=shape.acc_dtype)
    bt, bn, bk, warps = _table_tiles()
    grid = (cdiv(shape.table_rows, bt), cdiv(h_s, bn))
    decode_fwd.first_layer_tables_kernel[grid](
        tables, shape.table_rows, shape.num_layers, shape.num_filters,
        inputs.pos_layer, inputs.pos_filter, inputs.pos_channel, inputs.enc_table, shape.levels,
        shape.enc_size, shape.enc_stride, w1, inputs.biases[0], shape.hidden, h_s,
        PRECISION=shape.precision_code, INTERPRET=INTERPRETED, F64=shape.f64,
        BT=bt, BN=bn, BK=bk, num_warps=warps)
    return tables


def common_args(inputs: LaunchInputs, params: list, tables: Optional[torch.Tensor]) -> list:
    """Arguments shared by the fused forward and backward kernels, in their order."""
    shape = inputs.shape
    dummy = inputs.kernel_offsets  # any valid pointer for arguments a specialisation never reads
    return [inputs.rows if inputs.rows is not None else dummy, shape.rows,
            inputs.kernel_offsets, inputs.weight_offsets, inputs.meta,
            inputs.coord_rows if inputs.coord_rows is not None else dummy,
            inputs.pos_layer, inputs.pos_filter, inputs.pos_channel, inputs.enc_table,
            shape.num_layers, shape.search_steps, shape.levels, shape.enc_size,
            *params, shape.hidden, shape.num_hidden,
            tables if tables is not None else inputs.pos_layer,
            shape.num_layers, shape.num_layers + shape.num_filters]


@lru_cache(maxsize=256)
def _constexprs(shape: DecodeShape, config: LaunchConfig) -> tuple:
    return tuple(dict(K=shape.kernel_size, K2P=shape.k2_pad, SUBSET=shape.subset, PERMUTED=shape.permuted,
                FFN=shape.ffn, SEPARABLE=config.separable, CROP=shape.crop,
                PRECISION=shape.precision_code, INTERPRET=INTERPRETED, F64=shape.f64,
                BM=config.bm, BN=config.bn, BK=config.bk, BS=min(config.bn, 64),
                num_warps=config.num_warps, num_stages=config.num_stages).items())


def constexprs(shape: DecodeShape, config: LaunchConfig) -> dict:
    """Compile-time arguments and launch options of the fused kernels (cached per shape/config)."""
    return dict(_constexprs(shape, config))


def programs(shape: DecodeShape, config: LaunchConfig, device: torch.device) -> int:
    return max(1, min(cdiv(shape.rows, config.bm), num_sms(device) * config.programs_per_sm))


def run_forward(inputs: LaunchInputs, config: LaunchConfig, out: torch.Tensor) -> None:
    """One fused forward decode into ``out`` (flat buffer, or (R, k²) rows for a subset)."""
    shape = inputs.shape
    if shape.rows == 0:
        return
    packed = inputs.packed()
    tables = first_layer_tables(inputs, packed) if config.separable else None
    grid = programs(shape, config, inputs.device)
    e_s, h_s = shape.enc_stride, shape.hidden_stride
    enc_width = 0 if config.separable else e_s
    scratch = torch.empty(grid * config.bm * (enc_width + 2 * h_s), device=inputs.device,
                          dtype=shape.scratch_dtype)
    scratch32 = torch.empty(grid * config.bm * shape.k2_pad if shape.crop else 1,
                            device=inputs.device, dtype=shape.acc_dtype)
    decode_fwd.decode_fwd_kernel[(grid,)](
        out, *common_args(inputs, packed.params, tables), scratch, scratch32, e_s, h_s,
        **constexprs(shape, config))


def transposed_weights(shape: DecodeShape, wh: torch.Tensor, wl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The K-major backward's weights: W_hidden (NH, H, H_S) as (NH, H_S, H_S) with [i, n, k] = W[i, k, n]
    and W_last (k², H_S) as (H_S, K2P), zero padding (a network without hidden layers passes ``wh``
    through: never read)."""
    h, h_s, nh = shape.hidden, shape.hidden_stride, shape.num_hidden
    wh_t = wh
    if nh:
        wh_t = wh.new_zeros((nh, h_s, h_s))
        wh_t[:, :, :h] = wh.transpose(1, 2)
    wl_t = wl.new_zeros((h_s, shape.k2_pad))
    wl_t[:, :shape.k2] = wl.t()
    return wh_t, wl_t


def backward_scratch_per_row(shape: DecodeShape, k_major: bool) -> int:
    """Scratch values per tile row of a backward program (K-major: plus the transposed copies)."""
    e_s, h_s = shape.enc_stride, shape.hidden_stride
    values = e_s + (shape.num_hidden + 3) * h_s
    return values + (e_s + (shape.num_hidden + 2) * h_s if k_major else 0)


def backward_programs(shape: DecodeShape, config: LaunchConfig, device: torch.device, atomic: bool,
                      memory_budget: int) -> int:
    """As many programs as the device runs at once, fewer if their partials + scratch would exceed
    ``memory_budget`` bytes (partials: one slot per program in deterministic mode)."""
    grid = programs(shape, config, device)
    scratch = config.bm * backward_scratch_per_row(shape, config.k_major) * shape.scratch_dtype.itemsize
    slot = 0 if atomic else shape.slot_size * shape.acc_dtype.itemsize
    fits = max(1, memory_budget // max(1, scratch + slot))
    return max(1, min(grid, fits))


def reduce_partials(partials: torch.Tensor, count: int, slot_size: int) -> torch.Tensor:
    """Σ of ``count`` consecutive slots in fixed order (deterministic)."""
    if count == 1:
        return partials[:slot_size]
    out = torch.empty(slot_size, device=partials.device, dtype=partials.dtype)
    block = 1024
    decode_bwd.reduce_partials_kernel[(cdiv(slot_size, block),)](
        partials, out, count, slot_size, BLOCK=block, num_warps=4)
    return out


def run_backward(inputs: LaunchInputs, grad: torch.Tensor, config: LaunchConfig, atomic: bool,
                 memory_budget: int) -> torch.Tensor:
    """Gradients of every MLP weight and bias as one slot (see ``slot_layout``)."""
    shape = inputs.shape
    slot_size = shape.slot_size
    if shape.rows == 0:
        return torch.zeros(slot_size, device=inputs.device, dtype=shape.acc_dtype)
    packed = inputs.packed()
    tables = first_layer_tables(inputs, packed) if config.separable else None
    grid = backward_programs(shape, config, inputs.device, atomic, memory_budget)
    e_s, h_s = shape.enc_stride, shape.hidden_stride
    scratch = torch.empty(grid * config.bm * backward_scratch_per_row(shape, config.k_major),
                          device=inputs.device, dtype=shape.scratch_dtype)
    params = packed.params
    wh_t, wl_t = transposed_weights(shape, params[2], params[4]) if config.k_major else (params[2], params[4])
    scratch32 = torch.empty(grid * 2 * config.bm * shape.k2_pad if shape.has_max else 1,
                            device=inputs.device, dtype=shape.acc_dtype)
    if atomic:
        partials = torch.zeros(slot_size, device=inputs.device, dtype=shape.acc_dtype)
    else:
        partials = torch.empty(grid * slot_size, device=inputs.device, dtype=shape.acc_dtype)
    decode_bwd.decode_bwd_kernel[(grid,)](
        grad, *common_args(inputs, params, tables), scratch, scratch32, e_s, h_s, partials,
        slot_size, wh_t, wl_t, HAS_MAX=shape.has_max, ATOMIC=atomic, K_MAJOR=config.k_major,
        **constexprs(shape, config))
    return partials if atomic else reduce_partials(partials, grid, slot_size)
