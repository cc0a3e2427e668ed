// The separable first layer of the basic encoding (NERN_SPEC §4) for the CPU decoder (CUDA builds
// the same tables with its own kernel, decode_cuda.cu):
// W1·e(l,f,c) + b1 = [W1_l·e_l(l) + W1_f·e_f(f) + b1] + W1_c·e_c(c): a per-filter table (the layer
// term and the bias folded in) plus a per-channel table, computed once per call.
#pragma once

#include "decode.h"

#include <functional>

namespace nern_fast {

// a (n, k) @ b (k, m) -> (n, m) at the device's chosen precision (IEEE fp32 on CUDA, whatever
// the global TF32 switches say).
using MatmulFn = std::function<at::Tensor(const at::Tensor&, const at::Tensor&)>;

// Filters [filter_begin, filter_begin + F) and channels [channel_begin, channel_begin + C) of the
// layout: all of them, or the range a subset's rows touch (one layer's decode builds that layer's
// rows of the tables, not the whole network's).
struct SeparableTables {
  int64_t filter_begin = 0, channel_begin = 0;
  at::Tensor filter;        // (F, H): W1_f·e_f(f) + W1_l·e_l(layer of f) + b1
  at::Tensor channel;       // (C, H): W1_c·e_c(c)
  at::Tensor enc_layer;     // (L', 2·levels) encodings of the range's L' layers, kept for the gradient of W1
  at::Tensor enc_filter;    // (F, 2·levels)
  at::Tensor enc_channel;   // (C, 2·levels)
  at::Tensor filter_layer;  // (F,) int64: layer of every filter (its row of enc_layer), on the device
};

struct TableRange {
  int64_t filter_begin, filter_end, channel_begin, channel_end;
};

// The tables over `range` (every filter and channel of the layout when omitted).
SeparableTables build_tables(const DecodeProblem& p, const MatmulFn& mm,
                             const c10::optional<TableRange>& range = c10::nullopt);

// Gradients of W1 and b1 from the per-filter and per-channel sums of the first layer's
// pre-activation gradient ((F, H) and (C, H)).
void first_layer_grads(const DecodeProblem& p, const SeparableTables& t, const at::Tensor& g_filter,
                       const at::Tensor& g_channel, const MatmulFn& mm, at::Tensor& grad_w0,
                       at::Tensor& grad_b0);

}  // namespace nern_fast
