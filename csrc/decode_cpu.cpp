// CPU decode: tile by tile over the rows (flat kernel indices), each thread owning whole tiles.
//
// Per tile: first layer (separable tables for basic, encode + GEMM for ffn), every further MLP
// layer as an ATen GEMM into per-thread buffers that stay cache-resident, bias/ReLU in one pass,
// crop and scatter straight into the output. A forward that will be differentiated may keep the
// hidden activations of layers 1..nb-2 for a prefix of the rows (`saved`, sized by the caller's
// memory budget); backward reads those and recomputes the rest (the first layer is elementwise
// with the separable tables, so it is always recomputed). Weight gradients accumulate per thread
// group; groups are reduced in a fixed order, so results are deterministic for a fixed thread
// count.
#include "cpu_kernels.h"
#include "decode.h"
#include "decode_tables.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <limits>
#include <mutex>

namespace nern_fast {
namespace {

using BF16 = c10::BFloat16;

struct LayerInfo {
  int64_t kernel_off, weight_off, c_out, c_in, size, crop, filter_off, channel_off;
};

struct RowInfo {
  int64_t filter;   // global filter index: row of the filter table / pos_filter
  int64_t channel;  // global channel index
  int64_t out;      // first output element written by this row
  int32_t layer, size, crop;
};

// Typed data pointer (dtype-checked) of a tensor whose type depends on a template parameter.
template <typename T>
T* ptr(const at::Tensor& t) {
  return t.data_ptr<T>();
}

std::vector<LayerInfo> read_layers(const DecodeProblem& p) {
  std::vector<LayerInfo> layers(p.num_layers);
  const int32_t* m = ptr<int32_t>(p.meta);
  for (int64_t l = 0; l < p.num_layers; ++l) {
    const int32_t* r = m + l * kMetaColumns;
    layers[l] = {r[kKernelOffset], r[kWeightOffset], r[kCOut],   r[kCIn],
                 r[kSize],         r[kCrop],         r[kFilterOffset], r[kChannelOffset]};
  }
  return layers;
}

// Rows per tile: one activation buffer of about 1 MiB. Smaller tiles make the per-tile GEMMs
// inefficient (measured on ResNet-56, H=280: 128 rows 1.4x slower than 512-1024), larger ones stop
// fitting the L2 cache. NERN_FAST_CPU_TILE overrides it (benchmarks, tests).
int64_t tile_rows(int64_t hidden, size_t elem) {
  if (const char* env = std::getenv("NERN_FAST_CPU_TILE")) {
    const long v = std::strtol(env, nullptr, 10);
    if (v >= 1 && v <= 65536) return v;
  }
  const int64_t rows = (int64_t(1) << 20) / (hidden * int64_t(elem));
  return std::max<int64_t>(128, std::min<int64_t>(1024, rows / 16 * 16));
}

// ---- crops (NERN_SPEC §2), with torch's avg_pool2d / max_pool2d semantics -----------------------
// Index into y (k×k) of the max of the w×w window at (a, b): the first maximum; a NaN wins.
template <typename scalar_t>
inline int window_argmax(const scalar_t* y, int k, int a, int b, int w) {
  scalar_t best = -std::numeric_limits<scalar_t>::infinity();
  int arg = a * k + b;
  for (int i = 0; i < w; ++i)
    for (int j = 0; j < w; ++j) {
      const scalar_t v = y[(a + i) * k + b + j];
      if (v > best || std::isnan(v)) {
        best = v;
        arg = (a + i) * k + b + j;
      }
    }
  return arg;
}

template <typename scalar_t>
inline void crop_forward(const scalar_t* y, int k, int s, int mode, scalar_t* out) {
  if (s == k) {
    for (int j = 0; j < k * k; ++j) out[j] = y[j];
    return;
  }
  if (mode == kCropCenter) {
    const int lo = center_lo(k, s);
    for (int a = 0; a < s; ++a)
      for (int b = 0; b < s; ++b) out[a * s + b] = y[(lo + a) * k + lo + b];
    return;
  }
  const int w = pool_window(k, s);
  for (int a = 0; a < s; ++a) {
    for (int b = 0; b < s; ++b) {
      if (mode == kCropAverage) {
        scalar_t sum = 0;
        for (int i = 0; i < w; ++i)
          for (int j = 0; j < w; ++j) sum += y[(a + i) * k + b + j];
        out[a * s + b] = sum / scalar_t(w * w);
      } else {
        const int arg = window_argmax(y, k, a, b, w);
        out[a * s + b] = y[arg];
      }
    }
  }
}

// gy (k·k, zeroed by the caller) += d(crop)/dy · go (s·s)
template <typename scalar_t>
inline void crop_backward(const scalar_t* go, const scalar_t* y, int k, int s, int mode,
                          scalar_t* gy) {
  if (s == k) {
    for (int j = 0; j < k * k; ++j) gy[j] = go[j];
    return;
  }
  if (mode == kCropCenter) {
    const int lo = center_lo(k, s);
    for (int a = 0; a < s; ++a)
      for (int b = 0; b < s; ++b) gy[(lo + a) * k + lo + b] = go[a * s + b];
    return;
  }
  const int w = pool_window(k, s);
  for (int a = 0; a < s; ++a) {
    for (int b = 0; b < s; ++b) {
      if (mode == kCropAverage) {
        const scalar_t delta = go[a * s + b] / scalar_t(w * w);
        for (int i = 0; i < w; ++i)
          for (int j = 0; j < w; ++j) gy[(a + i) * k + b + j] += delta;
      } else {
        const int arg = window_argmax(y, k, a, b, w);
        gy[arg] += go[a * s + b];
      }
    }
  }
}

template <typename scalar_t>
class CpuDecoder {
 public:
  explicit CpuDecoder(const DecodeProblem& p)
      : p_(p),
        layers_(read_layers(p)),
        bf16_(p.precision == Precision::kBf16),
        fp32_gemm_(bf16_ && p.bf16_fp32_gemm),
        k_(static_cast<int>(p.kernel_size)),
        k2_(p.k2()),
        hidden_(p.hidden),
        enc_size_(6 * p.levels),
        last_(p.num_blocks - 1),
        tile_(tile_rows(p.hidden, sizeof(scalar_t))),
        needs_y_(needs_last_output(layers_, p.kernel_size)) {
    kernel_offsets_.reserve(layers_.size() + 1);
    for (const auto& l : layers_) kernel_offsets_.push_back(l.kernel_off);
    kernel_offsets_.push_back(p.num_kernels);
    for (int64_t i = 0; i < p.num_blocks; ++i) {
      wt_.push_back(p.weights[i].t());
      if (bf16_) {  // (fp32 GEMMs: fp32 copies of the bf16 values, converted once per call)
        w_lp_.push_back(p.weights[i].to(at::kBFloat16).contiguous());
        if (fp32_gemm_) w_lp_.back() = w_lp_.back().to(at::kFloat);
        wt_lp_.push_back(w_lp_.back().t());
      }
    }
    if (p.subset()) rows_ = ptr<int64_t>(p.rows);
    if (p.encoding == kBasic) {
      tables_ = build_tables(p, [](const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b); },
                             rows_ ? c10::optional<TableRange>(subset_table_range()) : c10::optional<TableRange>());
    } else {
      ffn_ = p.encoding_table.to(p.weights[0].scalar_type()).contiguous();
    }
    if (p.coord_rows.defined()) coord_ = ptr<int64_t>(p.coord_rows);
  }

  // `saved`: (nb-2, R, H) activations of hidden layers 1..nb-2 for rows [0, R) (R may be 0), in
  // the compute dtype (bf16 in bf16 mode); written by the forward, read by the backward.
  void use_saved(const at::Tensor& saved) {
    saved_ = saved;
    save_rows_ = saved.size(1);
  }

  at::Tensor forward() {
    at::Tensor out = p_.output_like();
    scalar_t* o = ptr<scalar_t>(out);
    for_each_group(/*backward=*/false, [&](Scratch& s, int64_t, int64_t begin, int64_t n) {
      forward_tile(s, begin, n, Pass::kOutput);
      scatter(s, n, o);
    });
    return out;
  }

  std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> backward(const at::Tensor& grad) {
    const int64_t groups = num_groups();
    std::vector<Grads> partial(groups);
    for (auto& g : partial) g = make_grads();
    const scalar_t* go = ptr<scalar_t>(grad);
    for_each_group(/*backward=*/true, [&](Scratch& s, int64_t group, int64_t begin, int64_t n) {
      backward_tile(s, partial[group], go, begin, n);
    });
    // Fixed-order reduction over groups: deterministic for a fixed thread count.
    Grads& total = partial[0];
    for (int64_t g = 1; g < groups; ++g) {
      for (int64_t i = 0; i < p_.num_blocks; ++i) {
        total.w[i].add_(partial[g].w[i]);
        total.b[i].add_(partial[g].b[i]);
      }
      if (p_.encoding == kBasic) {
        total.g_filter.add_(partial[g].g_filter);
        total.g_channel.add_(partial[g].g_channel);
      }
    }
    if (p_.encoding == kBasic) {
      first_layer_grads(p_, tables_, total.g_filter, total.g_channel,
                        [](const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b); },
                        total.w[0], total.b[0]);
    }
    return {total.w, total.b};
  }

 private:
  struct Scratch {
    std::vector<at::Tensor> act, act_lp;  // (T, H) per hidden layer (2 alternating in forward);
                                          // fp32/fp64, or bf16 in bf16 mode
    at::Tensor acc_lp;                    // bf16 GEMM results, flat
    at::Tensor y, enc, enc_lp;            // (T, k²), (T, 6·levels)
    at::Tensor g, g2, gy, gy_lp;          // backward: (T, H) x2 (bf16 in bf16 mode), (T, k²) x2
    at::Tensor prod_lp;                   // bf16 per-tile weight-gradient product, flat
    at::Tensor colsum;                    // bf16 mode: 2·max(H, k²) fp32, add_column_sums_bf16's scratch
    at::Tensor wide_a, wide_b, wide_out;  // fp32 GEMMs of bf16 values: widened operands, result
    std::vector<RowInfo> info;
  };
  struct Grads {
    std::vector<at::Tensor> w, b;
    at::Tensor g_filter, g_channel;  // basic: per-filter / per-channel sums of dL/dz1
  };

  // How the rows are cut: one group of tiles per thread (at least kMinGroupRows rows each), tiles of
  // at most tile_ rows, equal to within 16 rows, their number a multiple of the groups. With tiles of
  // tile_ rows and a short last one, a subset of ~1,000 rows (one layer of an on-demand decode) ran
  // on one thread, or two threads waited for the one with the long tile.
  struct TilePlan {
    int64_t groups, tiles, tile;
  };
  static constexpr int64_t kMinGroupRows = 128;

  TilePlan tile_plan() const {
    const int64_t rows = p_.num_rows();
    const int64_t groups =
        std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / kMinGroupRows));
    int64_t tiles = std::max<int64_t>(1, (rows + tile_ - 1) / tile_);
    tiles = (tiles + groups - 1) / groups * groups;
    const int64_t tile = std::min<int64_t>(tile_, ((rows + tiles - 1) / tiles + 15) / 16 * 16);
    return {groups, tiles, tile};
  }

  int64_t num_groups() const { return tile_plan().groups; }

  template <typename Fn>
  void for_each_group(bool backward, const Fn& fn) {
    const int64_t rows = p_.num_rows();
    if (rows == 0) return;
    const TilePlan plan = tile_plan();
    at::parallel_for(0, plan.groups, 1, [&](int64_t g0, int64_t g1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t g = g0; g < g1; ++g) {
        Scratch s = make_scratch(backward);
        for (int64_t t = g * plan.tiles / plan.groups; t < (g + 1) * plan.tiles / plan.groups; ++t) {
          const int64_t begin = t * plan.tile;
          if (begin >= rows) break;
          fn(s, g, begin, std::min(plan.tile, rows - begin));
        }
      }
    });
  }

  Scratch make_scratch(bool backward) const {
    const auto opts = p_.weights[0].options();
    const auto lp = opts.dtype(at::kBFloat16);
    const int64_t wide = std::max(hidden_, k2_);
    Scratch s;
    const int64_t buffers = backward ? last_ : std::min<int64_t>(2, last_);
    for (int64_t i = 0; i < buffers; ++i) {  // bf16 mode keeps activations in bf16 only
      if (bf16_) s.act_lp.push_back(at::empty({tile_, hidden_}, lp));
      else s.act.push_back(at::empty({tile_, hidden_}, opts));
    }
    if (bf16_) s.acc_lp = at::empty({tile_ * wide}, lp);
    s.y = at::empty({tile_, k2_}, opts);
    if (p_.encoding == kFfn) {
      s.enc = at::empty({tile_, enc_size_}, opts);
      if (bf16_) s.enc_lp = at::empty({tile_, enc_size_}, lp);
    }
    if (fp32_gemm_) {  // an operand: at most (tile, max(H, E, k²)); a result: acc_lp's or prod_lp's size
      const int64_t in = std::max({hidden_, enc_size_, k2_});
      s.wide_a = at::empty({tile_ * in}, opts);
      if (backward) s.wide_b = at::empty({tile_ * in}, opts);
      s.wide_out = at::empty({std::max(tile_ * wide, backward ? wide * in : 0)}, opts);
    }
    if (backward) {
      s.g = at::empty({tile_, hidden_}, bf16_ ? lp : opts);  // hidden gradients: the compute dtype
      s.g2 = at::empty({tile_, hidden_}, bf16_ ? lp : opts);
      s.gy = at::empty({tile_, k2_}, opts);
      if (bf16_) {
        s.gy_lp = at::empty({tile_, k2_}, lp);
        s.prod_lp = at::empty({wide * std::max(hidden_, enc_size_)}, lp);
        s.colsum = at::empty({2 * wide}, opts);
      }
    }
    s.info.resize(tile_);
    return s;
  }

  Grads make_grads() const {
    Grads g;
    for (int64_t i = 0; i < p_.num_blocks; ++i) {
      g.w.push_back(at::zeros_like(p_.weights[i]));
      g.b.push_back(at::zeros_like(p_.biases[i]));
    }
    if (p_.encoding == kBasic) {
      g.g_filter = at::zeros_like(tables_.filter);  // the tables' filter/channel ranges
      g.g_channel = at::zeros_like(tables_.channel);
    }
    return g;
  }

  // ---- per-row coordinates ----------------------------------------------------------------------
  // The filters and channels of the layers a subset's rows lie in (a layer's own decode: its
  // C_out + C_in table rows instead of the whole network's).
  TableRange subset_table_range() const {
    int64_t first = p_.num_layers, last = -1;
    for (int64_t i = 0; i < p_.num_rows(); ++i) {
      const int64_t layer = std::upper_bound(kernel_offsets_.begin(), kernel_offsets_.end(), rows_[i]) -
                            kernel_offsets_.begin() - 1;
      first = std::min(first, layer);
      last = std::max(last, layer);
    }
    if (last < 0) first = last = 0;  // no rows: any non-empty range (encodings of 0 rows fail)
    TableRange r{p_.num_filters, 0, p_.num_channels, 0};
    for (int64_t l = first; l <= last; ++l) {
      const LayerInfo& m = layers_[l];
      r.filter_begin = std::min(r.filter_begin, m.filter_off);
      r.filter_end = std::max(r.filter_end, m.filter_off + m.c_out);
      r.channel_begin = std::min(r.channel_begin, m.channel_off);
      r.channel_end = std::max(r.channel_end, m.channel_off + m.c_in);
    }
    return r;
  }

  void fill_rows(int64_t begin, int64_t n, RowInfo* info) const {
    int64_t layer = -1;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t slot = rows_ ? rows_[begin + i] : begin + i;
      if (layer < 0 || slot < kernel_offsets_[layer] || slot >= kernel_offsets_[layer + 1]) {
        layer = std::upper_bound(kernel_offsets_.begin(), kernel_offsets_.end(), slot) -
                kernel_offsets_.begin() - 1;
      }
      const LayerInfo& m = layers_[layer];
      const int64_t q = slot - m.kernel_off;
      const int64_t coord = coord_ ? coord_[slot] : q;
      TORCH_CHECK(coord >= 0 && coord < m.c_out * m.c_in, "nern_fast: coordinate row ", coord,
                  " of kernel ", slot, " is outside its layer (", m.c_out * m.c_in,
                  " kernels); the layout's permutation is corrupt");
      // rows of the tables (basic: they may start after the layout's first filter/channel), or of
      // pos_filter / pos_channel (ffn: begin = 0)
      info[i].filter = m.filter_off + coord / m.c_in - tables_.filter_begin;
      info[i].channel = m.channel_off + coord % m.c_in - tables_.channel_begin;
      info[i].out = rows_ ? (begin + i) * k2_ : m.weight_off + q * m.size * m.size;
      info[i].layer = static_cast<int32_t>(layer);
      info[i].size = static_cast<int32_t>(m.size);
      info[i].crop = static_cast<int32_t>(m.crop);
    }
  }

  // ---- forward ------------------------------------------------------------------------------------
  // kOutput: the decode itself (hidden activations into the saved rows where there are any);
  // kRecompute: backward's activations: hidden layers only where not saved, the last layer only
  // when the crop's backward reads it (max pooling).
  enum class Pass { kOutput, kRecompute };

  static bool needs_last_output(const std::vector<LayerInfo>& layers, int64_t k) {
    for (const auto& l : layers)
      if (l.size < k && l.crop == kCropMax) return true;
    return false;
  }

  bool tile_saved(int64_t begin, int64_t n) const { return begin + n <= save_rows_; }

  at::Tensor rows_of(const at::Tensor& t, int64_t n) const { return t.narrow(0, 0, n); }
  at::Tensor lp_result(Scratch& s, int64_t n, int64_t cols) const {
    return s.acc_lp.narrow(0, 0, n * cols).view({n, cols});
  }

  // out (bf16) <- op(a) @ b with op(a) = a or aᵀ (a: a bf16 tile buffer), b a bf16 tile buffer or
  // a weight; fp32 accumulation, the result rounded to bf16. Natively ATen's bf16 GEMM (oneDNN:
  // AVX512-BF16 / AMX). Where the CPU has no bf16 matrix instructions that GEMM ran 20x slower than
  // fp32 (AVX2 Zen 3: 41 vs 2 ms for 512x280x280), so with fp32_gemm_ the bf16 values are widened
  // to fp32 (exact; the weights once per call), multiplied by an fp32 GEMM (bf16 products are
  // exact in fp32) and the result rounded to bf16 (nearest even): the native result up to the
  // order of the fp32 sums.
  void mm_bf16(Scratch& s, at::Tensor out, const at::Tensor& a, bool transpose_a, const at::Tensor& b) {
    if (!fp32_gemm_) {
      at::mm_out(out, transpose_a ? a.t() : a, b);
      return;
    }
    const at::Tensor wa = widened(s.wide_a, a);
    const at::Tensor wb = b.scalar_type() == at::kFloat ? b : widened(s.wide_b, b);
    at::Tensor result = s.wide_out.narrow(0, 0, out.numel()).view(out.sizes());
    at::mm_out(result, transpose_a ? wa.t() : wa, wb);
    out.copy_(result);
  }

  // x (a contiguous bf16 tile buffer) as fp32 in `buffer`
  static at::Tensor widened(const at::Tensor& buffer, const at::Tensor& x) {
    at::Tensor w = buffer.narrow(0, 0, x.numel()).view(x.sizes());
    w.copy_(x);
    return w;
  }

  // dst (n, out) <- relu?(src @ W_i^T + b_i); in bf16 mode from the bf16 copy of src, and the
  // bf16 copy of dst is written alongside for the next layer.
  template <bool Relu>
  void linear(Scratch& s, int64_t i, const at::Tensor& src, const at::Tensor& src_lp,
              const at::Tensor& dst, const at::Tensor& dst_lp, int64_t n) {
    const int64_t cols = p_.weights[i].size(0);
    if (bf16_) {
      at::Tensor acc = lp_result(s, n, cols);
      mm_bf16(s, acc, src_lp, false, wt_lp_[i]);
      const float* bias = ptr<float>(p_.biases[i]);
      if (Relu) cpu::bias_relu_to_bf16(ptr<BF16>(acc), bias, ptr<BF16>(dst_lp), n, cols);
      else cpu::bias_to_float(ptr<BF16>(acc), bias, ptr<float>(dst), n, cols);
      return;
    }
    at::Tensor out = rows_of(dst, n);
    at::mm_out(out, src, wt_[i]);
    cpu::bias_act<Relu>(ptr<scalar_t>(dst), ptr<scalar_t>(p_.biases[i]), n, cols);  // NaN stays NaN
  }

  // Hidden activation i of the tile (n rows from `begin`), in the compute dtype: the saved rows
  // when the whole tile is saved, else the scratch (two alternating buffers in the output pass).
  at::Tensor hidden_buffer(Scratch& s, int64_t i, int64_t begin, int64_t n, Pass pass) const {
    if (i >= 1 && tile_saved(begin, n)) return saved_[i - 1].narrow(0, begin, n);
    const auto& buffers = bf16_ ? s.act_lp : s.act;
    return rows_of(buffers[pass == Pass::kRecompute ? i : i % 2], n);
  }

  void forward_tile(Scratch& s, int64_t begin, int64_t n, Pass pass) {
    fill_rows(begin, n, s.info.data());
    auto act = [&](int64_t i) { return bf16_ ? at::Tensor() : hidden_buffer(s, i, begin, n, pass); };
    auto act_lp = [&](int64_t i) { return bf16_ ? hidden_buffer(s, i, begin, n, pass) : at::Tensor(); };

    if (p_.encoding == kBasic) {
      first_layer_separable(s, n, act(0), act_lp(0));
    } else {
      encode_ffn(s, n);
      linear<true>(s, 0, rows_of(s.enc, n), bf16_ ? rows_of(s.enc_lp, n) : at::Tensor(), act(0),
                   act_lp(0), n);
    }
    // A tile that straddles the end of the saved rows keeps its first rows too, so that every saved
    // row is written whatever tiling the backward uses. Each layer's rows are copied as soon as they
    // are computed: the output pass alternates two buffers, so act(i) is overwritten by act(i + 2).
    const int64_t keep = pass == Pass::kOutput && begin < save_rows_ && !tile_saved(begin, n)
                             ? save_rows_ - begin : 0;
    const bool hidden_known = pass == Pass::kRecompute && tile_saved(begin, n);
    if (!hidden_known) {
      for (int64_t i = 1; i < last_; ++i) {
        linear<true>(s, i, act(i - 1), act_lp(i - 1), act(i), act_lp(i), n);
        if (keep > 0) saved_[i - 1].narrow(0, begin, keep).copy_((bf16_ ? act_lp(i) : act(i)).narrow(0, 0, keep));
      }
    }
    if (pass == Pass::kOutput || needs_y_)
      linear<false>(s, last_, act(last_ - 1), act_lp(last_ - 1), rows_of(s.y, n), at::Tensor(), n);
  }

  void first_layer_separable(Scratch& s, int64_t n, const at::Tensor& dst, const at::Tensor& dst_lp) {
    const scalar_t* tf = ptr<scalar_t>(tables_.filter);
    const scalar_t* tc = ptr<scalar_t>(tables_.channel);
    const int64_t H = hidden_;
    if (bf16_) {
      BF16* dl = ptr<BF16>(dst_lp);
      for (int64_t r = 0; r < n; ++r)
        cpu::add_relu_to_bf16(reinterpret_cast<const float*>(tf + s.info[r].filter * H),
                              reinterpret_cast<const float*>(tc + s.info[r].channel * H), dl + r * H, H);
      return;
    }
    scalar_t* d = ptr<scalar_t>(dst);
    for (int64_t r = 0; r < n; ++r)
      cpu::add_relu(tf + s.info[r].filter * H, tc + s.info[r].channel * H, d + r * H, H);
  }

  // ffn: x = (2π·p) @ Bᵀ, e[2m] = sin(x_m), e[2m+1] = cos(x_m) (nern_fast.encoding)
  void encode_ffn(Scratch& s, int64_t n) {
    const float* pl = ptr<float>(p_.pos_layer);
    const float* pf = ptr<float>(p_.pos_filter);
    const float* pc = ptr<float>(p_.pos_channel);
    const scalar_t* B = ptr<scalar_t>(ffn_);
    const int64_t m3 = 3 * p_.levels;
    scalar_t* e = ptr<scalar_t>(s.enc);
    const scalar_t pi = static_cast<scalar_t>(M_PI);
    for (int64_t r = 0; r < n; ++r) {
      const RowInfo& info = s.info[r];
      const scalar_t q0 = static_cast<scalar_t>(pl[info.layer]) * scalar_t(2) * pi;
      const scalar_t q1 = static_cast<scalar_t>(pf[info.filter]) * scalar_t(2) * pi;
      const scalar_t q2 = static_cast<scalar_t>(pc[info.channel]) * scalar_t(2) * pi;
      scalar_t* row = e + r * enc_size_;
      for (int64_t m = 0; m < m3; ++m) {
        const scalar_t x = q0 * B[m * 3] + q1 * B[m * 3 + 1] + q2 * B[m * 3 + 2];
        row[2 * m] = std::sin(x);
        row[2 * m + 1] = std::cos(x);
      }
    }
    if (bf16_) cpu::to_bf16(ptr<float>(s.enc), ptr<BF16>(s.enc_lp), n * enc_size_);
  }

  void scatter(const Scratch& s, int64_t n, scalar_t* out) const {
    const scalar_t* y = ptr<scalar_t>(s.y);
    for (int64_t r = 0; r < n; ++r) {
      const RowInfo& info = s.info[r];
      scalar_t* o = out + info.out;
      crop_forward(y + r * k2_, k_, info.size, info.crop, o);
      if (rows_)  // subset rows are k² wide: zeros after the s·s kernel
        for (int64_t j = int64_t(info.size) * info.size; j < k2_; ++j) o[j] = scalar_t(0);
    }
  }

  // ---- backward -----------------------------------------------------------------------------------
  // acc += the column sums of g's n rows: ATen's sum (cascaded) per tile, then one add; bf16 rows
  // (the hidden gradients in bf16 mode) through cpu::add_column_sums_bf16. A running sum row by row
  // lost ~n·ε over a tile of thousands of rows (bias gradients of a 300 K-row decode were 40x
  // further from float64 than eager's).
  static void add_column_sums(Scratch& s, const at::Tensor& acc, const at::Tensor& g, int64_t n) {
    if (g.scalar_type() == at::kBFloat16) {
      cpu::add_column_sums_bf16(ptr<BF16>(g), n, g.size(1), ptr<float>(acc), ptr<float>(s.colsum));
      return;
    }
    at::Tensor out = acc;
    out.add_(g.narrow(0, 0, n).sum(0));
  }

  // acc (out, in) += g (n, out)ᵀ @ a (n, in)
  void add_weight_grad(Scratch& s, const at::Tensor& acc, const at::Tensor& g, const at::Tensor& g_lp,
                       const at::Tensor& a, const at::Tensor& a_lp) {
    if (!bf16_) {
      at::Tensor out = acc;
      out.addmm_(g.t(), a);
      return;
    }
    const int64_t rows = acc.size(0), cols = acc.size(1);
    at::Tensor prod = s.prod_lp.narrow(0, 0, rows * cols).view({rows, cols});
    mm_bf16(s, prod, g_lp, true, a_lp);
    cpu::accumulate_bf16(ptr<float>(acc), ptr<BF16>(prod), rows * cols);
  }

  // g (n, out) @ W_i, unmasked: into dst (fp32/fp64), or in bf16 mode (g bf16) into the bf16
  // result buffer. Returns the product.
  at::Tensor backprop_product(Scratch& s, int64_t i, const at::Tensor& g, const at::Tensor& g_lp,
                              const at::Tensor& dst, int64_t n) {
    const int64_t cols = p_.weights[i].size(1);
    if (bf16_) {
      at::Tensor acc = lp_result(s, n, cols);
      mm_bf16(s, acc, g_lp, false, w_lp_[i]);
      return acc;
    }
    at::Tensor out = dst;
    at::mm_out(out, g, p_.weights[i]);
    return out;
  }

  // dst (n, in) <- (g (n, out) @ W_i) * (a > 0); in bf16 mode g, a and dst are bf16 (the product
  // is rounded to bf16 anyway, so an fp32 copy of dst would hold the same values).
  void backprop(Scratch& s, int64_t i, const at::Tensor& g, const at::Tensor& g_lp, const at::Tensor& a,
                const at::Tensor& dst, int64_t n) {
    const at::Tensor prod = backprop_product(s, i, g, g_lp, dst, n);
    if (bf16_) {
      cpu::masked_bf16(ptr<BF16>(prod), ptr<BF16>(a), ptr<BF16>(dst), prod.numel());
      return;
    }
    // threshold_backward: NaN passes (a select: as a branch, mispredicted about half the time, it
    // cost ~10% of a fp32 forward+backward)
    cpu::relu_mask(ptr<scalar_t>(a), ptr<scalar_t>(dst), prod.numel());
  }

  void backward_tile(Scratch& s, Grads& gr, const scalar_t* grad, int64_t begin, int64_t n) {
    forward_tile(s, begin, n, Pass::kRecompute);
    auto buffer = [&](int64_t i) { return hidden_buffer(s, i, begin, n, Pass::kRecompute); };
    auto act = [&](int64_t i) { return bf16_ ? at::Tensor() : buffer(i); };
    auto act_lp = [&](int64_t i) { return bf16_ ? buffer(i) : at::Tensor(); };
    auto lp = [&](const at::Tensor& t) { return bf16_ ? rows_of(t, n) : at::Tensor(); };

    // dL/dy through the crop
    const scalar_t* y = ptr<scalar_t>(s.y);
    scalar_t* gy = ptr<scalar_t>(s.gy);
    for (int64_t r = 0; r < n; ++r) {
      const RowInfo& info = s.info[r];
      scalar_t* row = gy + r * k2_;
      std::fill(row, row + k2_, scalar_t(0));
      crop_backward(grad + info.out, y + r * k2_, k_, info.size, info.crop, row);
    }
    if (bf16_) cpu::to_bf16(ptr<float>(s.gy), ptr<BF16>(s.gy_lp), n * k2_);

    // The output layer's gradient gy is exact (fp32) and, in bf16 mode, rounded for its GEMMs; the
    // hidden layers' gradients exist in the compute dtype only (g, g2: bf16 in bf16 mode).
    at::Tensor g_out = rows_of(s.gy, n), g_out_lp = lp(s.gy_lp);
    at::Tensor cur = rows_of(s.g, n), other = rows_of(s.g2, n);
    // basic encoding: layer 1's masked gradient (dL/dz1) goes straight into the per-filter and
    // per-channel sums, masked as it is summed (one pass over the tile instead of two)
    const bool fused_first = p_.encoding == kBasic;
    for (int64_t i = last_; i >= 1; --i) {
      add_column_sums(s, gr.b[i], g_out, n);
      add_weight_grad(s, gr.w[i], g_out, g_out_lp, act(i - 1), act_lp(i - 1));
      if (i == 1 && fused_first) {
        first_layer_sums(s, gr, backprop_product(s, 1, g_out, g_out_lp, cur, n), buffer(0), n);
        return;
      }
      backprop(s, i, g_out, g_out_lp, buffer(i - 1), cur, n);
      g_out = cur;
      g_out_lp = bf16_ ? cur : at::Tensor();
      std::swap(cur, other);
    }
    // g_out = dL/dz1 (first layer pre-activation); ffn: its weight is an ordinary GEMM's
    add_column_sums(s, gr.b[0], g_out, n);
    add_weight_grad(s, gr.w[0], g_out, g_out_lp, rows_of(s.enc, n), lp(s.enc_lp));
  }

  // basic: row r of relu_mask(act0, prod) (layer 1's input gradient, dL/dz1) into its filter's and
  // its channel's sums (prod: g @ W_1, unmasked; act0: the first layer's activations; both in the
  // compute dtype)
  void first_layer_sums(Scratch& s, Grads& gr, const at::Tensor& prod, const at::Tensor& act0, int64_t n) {
    const int64_t H = hidden_;
    scalar_t* gf = ptr<scalar_t>(gr.g_filter);
    scalar_t* gc = ptr<scalar_t>(gr.g_channel);
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (bf16_) {
        const BF16* x = ptr<BF16>(prod);
        const BF16* m = ptr<BF16>(act0);
        for (int64_t r = 0; r < n; ++r)
          cpu::masked_accumulate2_bf16(gf + s.info[r].filter * H, gc + s.info[r].channel * H, x + r * H,
                                       m + r * H, H);
        return;
      }
    }
    const scalar_t* x = ptr<scalar_t>(prod);
    const scalar_t* m = ptr<scalar_t>(act0);
    for (int64_t r = 0; r < n; ++r)
      cpu::masked_accumulate2(gf + s.info[r].filter * H, gc + s.info[r].channel * H, x + r * H, m + r * H, H);
  }

  const DecodeProblem& p_;
  std::vector<LayerInfo> layers_;
  std::vector<int64_t> kernel_offsets_;
  const bool bf16_;
  const bool fp32_gemm_;  // bf16 mode through fp32 GEMMs (DecodeProblem::bf16_fp32_gemm)
  const int k_;
  const int64_t k2_, hidden_, enc_size_, last_, tile_;
  const bool needs_y_;  // some layer's crop is a max pool: its backward reads the last output
  at::Tensor saved_;
  int64_t save_rows_ = 0;
  std::vector<at::Tensor> wt_, w_lp_, wt_lp_;
  SeparableTables tables_;
  at::Tensor ffn_;
  const int64_t* coord_ = nullptr;
  const int64_t* rows_ = nullptr;
};

DecodeProblem problem_from_args(at::TensorList weights, at::TensorList biases, const at::Tensor& meta,
                                const at::Tensor& pos_layer, const at::Tensor& pos_filter,
                                const at::Tensor& pos_channel,
                                const c10::optional<at::Tensor>& coord_rows,
                                const c10::optional<at::Tensor>& rows,
                                const at::Tensor& encoding_table, int64_t encoding,
                                int64_t kernel_size, int64_t num_kernels, int64_t num_weights,
                                c10::string_view precision) {
  DecodeProblem p = make_problem(weights, biases, meta, pos_layer, pos_filter, pos_channel,
                                 coord_rows, rows, encoding_table, encoding, kernel_size,
                                 num_kernels, num_weights, std::string(precision.data(), precision.size()));
  TORCH_CHECK(p.weights[0].device().is_cpu(), "nern_fast: internal error: CPU kernel called with ",
              p.weights[0].device(), " tensors");
  return p;
}

at::Tensor decode_forward_cpu(at::TensorList weights, at::TensorList biases, const at::Tensor& meta,
                              const at::Tensor& pos_layer, const at::Tensor& pos_filter,
                              const at::Tensor& pos_channel,
                              const c10::optional<at::Tensor>& coord_rows,
                              const c10::optional<at::Tensor>& rows,
                              const at::Tensor& encoding_table, int64_t encoding,
                              int64_t kernel_size, int64_t num_kernels, int64_t num_weights,
                              c10::string_view precision, int64_t /*workspace_bytes*/) {
  // workspace_bytes bounds the CUDA decoder's tile buffers; the CPU decoder's scratch is a few
  // cache-sized tiles per thread whatever the call's size, so there is nothing to bound here.
  DecodeProblem p = problem_from_args(weights, biases, meta, pos_layer, pos_filter, pos_channel,
                                      coord_rows, rows, encoding_table, encoding, kernel_size,
                                      num_kernels, num_weights, precision);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(p.weights[0].scalar_type(), "nern_fast_decode_forward_cpu",
                             [&] { out = CpuDecoder<scalar_t>(p).forward(); });
  return out;
}

// The dtype activations are kept in: bf16 in bf16 mode, else the parameters'.
at::ScalarType compute_dtype(const DecodeProblem& p) {
  return p.precision == Precision::kBf16 ? at::kBFloat16 : p.weights[0].scalar_type();
}

// The kept activations of a differentiated forward come from one reusable buffer: a fresh tensor
// of a few hundred MB costs its page faults on every call (ResNet-56, H=280: 302 MB, ~80 ms of a
// 245 ms forward on the 2-core test machine). The buffer is handed out again only once nobody else
// holds it (autograd has freed the graph that kept it); a second forward while it is in use gets a
// fresh tensor. It stays allocated between calls (at most NERN_FAST_CPU_SAVE_MB, the caller's
// budget) until release_saved_buffer() or NERN_FAST_CPU_REUSE_SAVED=0.
std::mutex saved_pool_mutex;
at::Tensor& saved_pool() {
  static auto* pool = new at::Tensor();  // never destroyed: no allocator calls at process exit
  return *pool;
}

bool reuse_saved_buffer() {
  const char* env = std::getenv("NERN_FAST_CPU_REUSE_SAVED");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

at::Tensor saved_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(sizes);
  if (!reuse_saved_buffer()) return at::empty(sizes, options);
  std::lock_guard<std::mutex> lock(saved_pool_mutex);
  at::Tensor& pool = saved_pool();
  const bool free = pool.defined() && pool.use_count() == 1 && pool.storage().use_count() == 1;
  if (free && pool.scalar_type() == options.dtype().toScalarType() && pool.numel() >= numel)
    return pool.narrow(0, 0, numel).view(sizes);
  if (pool.defined() && !free) return at::empty(sizes, options);  // in use: keep it for later
  pool = at::Tensor();  // free but too small or of another dtype: replace it
  pool = at::empty({numel}, options);
  return pool.view(sizes);
}

void release_saved_buffer() {
  std::lock_guard<std::mutex> lock(saved_pool_mutex);
  saved_pool() = at::Tensor();
}

std::tuple<at::Tensor, at::Tensor> decode_forward_saving_cpu(
    at::TensorList weights, at::TensorList biases, const at::Tensor& meta,
    const at::Tensor& pos_layer, const at::Tensor& pos_filter, const at::Tensor& pos_channel,
    const c10::optional<at::Tensor>& coord_rows, const c10::optional<at::Tensor>& rows,
    const at::Tensor& encoding_table, int64_t encoding, int64_t kernel_size, int64_t num_kernels,
    int64_t num_weights, c10::string_view precision, int64_t save_rows) {
  DecodeProblem p = problem_from_args(weights, biases, meta, pos_layer, pos_filter, pos_channel,
                                      coord_rows, rows, encoding_table, encoding, kernel_size,
                                      num_kernels, num_weights, precision);
  check_save_rows(p, save_rows);
  at::Tensor saved = saved_buffer({p.num_blocks - 2, save_rows, p.hidden},
                                 p.weights[0].options().dtype(compute_dtype(p)));
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(p.weights[0].scalar_type(), "nern_fast_decode_forward_saving_cpu", [&] {
    CpuDecoder<scalar_t> decoder(p);
    decoder.use_saved(saved);
    out = decoder.forward();
  });
  return {out, saved};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> decode_backward_cpu(
    const at::Tensor& grad, at::TensorList weights, at::TensorList biases, const at::Tensor& meta,
    const at::Tensor& pos_layer, const at::Tensor& pos_filter, const at::Tensor& pos_channel,
    const c10::optional<at::Tensor>& coord_rows, const c10::optional<at::Tensor>& rows,
    const at::Tensor& encoding_table, int64_t encoding, int64_t kernel_size, int64_t num_kernels,
    int64_t num_weights, c10::string_view precision, const c10::optional<at::Tensor>& saved) {
  DecodeProblem p = problem_from_args(weights, biases, meta, pos_layer, pos_filter, pos_channel,
                                      coord_rows, rows, encoding_table, encoding, kernel_size,
                                      num_kernels, num_weights, precision);
  check_grad_output(p, grad);
  const bool has_saved = saved.has_value() && saved->defined();
  if (has_saved) check_saved(p, *saved, compute_dtype(p));
  std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> result;
  AT_DISPATCH_FLOATING_TYPES(p.weights[0].scalar_type(), "nern_fast_decode_backward_cpu", [&] {
    CpuDecoder<scalar_t> decoder(p);
    if (has_saved) decoder.use_saved(*saved);
    result = decoder.backward(grad);
  });
  return result;
}

}  // namespace
}  // namespace nern_fast

TORCH_LIBRARY_IMPL(nern_fast_C, CPU, m) {
  m.impl("decode_forward", &nern_fast::decode_forward_cpu);
  m.impl("decode_backward", &nern_fast::decode_backward_cpu);
  m.impl("decode_forward_saving", &nern_fast::decode_forward_saving_cpu);
}

TORCH_LIBRARY_FRAGMENT(nern_fast_C, m) {
  // Frees the reusable buffer of kept activations (see saved_buffer); it is allocated again by the
  // next differentiated CPU forward that keeps activations.
  m.def("release_saved_buffer() -> ()", &nern_fast::release_saved_buffer);
}
