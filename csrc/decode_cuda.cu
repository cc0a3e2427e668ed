// CUDA decode: cuBLAS GEMMs through ATen (tensor cores for tf32/bf16) on large row tiles, and
// small kernels of our own for what cuBLAS cannot fuse: coordinates, the encoding and first layer,
// crop + scatter into the output, the crop's backward and the first layer's gradient scatter.
// See csrc/README.md for why this split. Every kernel bounds-checks its indices; rows whose flat
// kernel index is out of range are skipped (the Python side asserts on them asynchronously).
#include "decode.h"
#include "decode_tables.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

namespace nern_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxK2 = 49;  // kernel_size <= 7, checked at the boundary

struct RowInfo {
  int64_t out;      // first output element of this row
  int32_t filter;   // global filter index
  int32_t channel;  // global channel index
  int32_t layer;
  int32_t size;
  int32_t crop;
  int32_t valid;    // 0: the row's kernel index (or its coordinate) is out of range
};

inline int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

__device__ inline float to_float(float v) { return v; }
__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ inline T from_float(float v);
template <>
__device__ inline float from_float<float>(float v) { return v; }
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

template <typename T>
T* device_ptr(const at::Tensor& t);
template <>
float* device_ptr<float>(const at::Tensor& t) { return t.data_ptr<float>(); }
template <>
__nv_bfloat16* device_ptr<__nv_bfloat16>(const at::Tensor& t) {
  return reinterpret_cast<__nv_bfloat16*>(t.data_ptr<at::BFloat16>());
}

// ---- coordinates -----------------------------------------------------------------------------------
__global__ void row_info_kernel(const int32_t* __restrict__ meta, int num_layers, int64_t num_kernels,
                                const int64_t* __restrict__ rows, const int64_t* __restrict__ coord_rows,
                                int64_t begin, int64_t n, int64_t k2, RowInfo* __restrict__ info) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  RowInfo r;
  r.out = rows ? (begin + i) * k2 : 0;
  r.filter = r.channel = r.layer = r.size = r.crop = 0;
  r.valid = 0;
  const int64_t slot = rows ? rows[begin + i] : begin + i;
  if (slot >= 0 && slot < num_kernels) {
    int lo = 0, hi = num_layers - 1;  // last layer whose first kernel is <= slot
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (meta[mid * kMetaColumns + kKernelOffset] <= slot) lo = mid;
      else hi = mid - 1;
    }
    const int32_t* m = meta + lo * kMetaColumns;
    const int64_t q = slot - m[kKernelOffset];
    const int64_t kernels = int64_t(m[kCOut]) * m[kCIn];
    const int64_t coord = coord_rows ? coord_rows[slot] : q;
    if (q >= 0 && q < kernels && coord >= 0 && coord < kernels) {
      r.filter = static_cast<int32_t>(m[kFilterOffset] + coord / m[kCIn]);
      r.channel = static_cast<int32_t>(m[kChannelOffset] + coord % m[kCIn]);
      r.layer = lo;
      r.size = m[kSize];
      r.crop = m[kCrop];
      if (!rows) r.out = m[kWeightOffset] + q * m[kSize] * m[kSize];
      r.valid = 1;
    }
  }
  info[i] = r;
}

// ---- first layer ------------------------------------------------------------------------------------
// basic: z1 = filter_table[f] + channel_table[c] (layer term and bias folded in), h1 = relu(z1)
template <typename out_t>
__global__ void first_layer_kernel(const RowInfo* __restrict__ info, const float* __restrict__ filter_table,
                                   const float* __restrict__ channel_table, int64_t n, int64_t hidden,
                                   out_t* __restrict__ out) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= n * hidden) return;
  const int64_t r = idx / hidden, j = idx % hidden;
  const RowInfo ri = info[r];
  float v = 0.f;
  if (ri.valid) {
    v = filter_table[int64_t(ri.filter) * hidden + j] + channel_table[int64_t(ri.channel) * hidden + j];
    v = v > 0.f ? v : 0.f;
  }
  out[idx] = from_float<out_t>(v);
}

// ffn: x = (2π·p) @ Bᵀ, e[2m] = sin(x_m), e[2m+1] = cos(x_m)
template <typename out_t>
__global__ void encode_ffn_kernel(const RowInfo* __restrict__ info, const float* __restrict__ pos_layer,
                                  const float* __restrict__ pos_filter, const float* __restrict__ pos_channel,
                                  const float* __restrict__ B, int64_t n, int64_t features,
                                  out_t* __restrict__ out) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= n * features) return;
  const int64_t r = idx / features, m = idx % features;
  const RowInfo ri = info[r];
  float s = 0.f, c = 1.f;
  if (ri.valid) {
    const float pi = 3.14159265358979323846f;  // (p * 2) * π in fp32, as the reference computes it
    const float q0 = pos_layer[ri.layer] * 2.f * pi;
    const float q1 = pos_filter[ri.filter] * 2.f * pi;
    const float q2 = pos_channel[ri.channel] * 2.f * pi;
    const float x = q0 * B[m * 3] + q1 * B[m * 3 + 1] + q2 * B[m * 3 + 2];
    sincosf(x, &s, &c);
  }
  out[r * 2 * features + 2 * m] = from_float<out_t>(s);
  out[r * 2 * features + 2 * m + 1] = from_float<out_t>(c);
}

// ---- crop (NERN_SPEC §2, torch's avg_pool2d / max_pool2d semantics) -------------------------------------
__device__ inline int argmax_window(const float* y, int k, int a, int b, int w) {
  float best = -INFINITY;
  int arg = a * k + b;
  for (int i = 0; i < w; ++i)
    for (int j = 0; j < w; ++j) {
      const float v = y[(a + i) * k + b + j];
      if (v > best || isnan(v)) {
        best = v;
        arg = (a + i) * k + b + j;
      }
    }
  return arg;
}

template <typename in_t>
__global__ void crop_scatter_kernel(const RowInfo* __restrict__ info, const in_t* __restrict__ y, int64_t n,
                                    int k, bool subset, float* __restrict__ out) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= n) return;
  const RowInfo ri = info[r];
  const int k2 = k * k;
  float* o = out + ri.out;
  if (!ri.valid) {
    if (subset)
      for (int j = 0; j < k2; ++j) o[j] = 0.f;
    return;
  }
  float v[kMaxK2];
  for (int j = 0; j < k2; ++j) v[j] = to_float(y[r * k2 + j]);
  const int s = ri.size;
  if (s == k) {
    for (int j = 0; j < k2; ++j) o[j] = v[j];
  } else if (ri.crop == kCropCenter) {
    const int lo = (k - s) / 2;
    for (int a = 0; a < s; ++a)
      for (int b = 0; b < s; ++b) o[a * s + b] = v[(lo + a) * k + lo + b];
  } else {
    const int w = k - s + 1;
    for (int a = 0; a < s; ++a)
      for (int b = 0; b < s; ++b) {
        if (ri.crop == kCropAverage) {
          float sum = 0.f;
          for (int i = 0; i < w; ++i)
            for (int j = 0; j < w; ++j) sum += v[(a + i) * k + b + j];
          o[a * s + b] = sum / float(w * w);
        } else {
          o[a * s + b] = v[argmax_window(v, k, a, b, w)];
        }
      }
  }
  if (subset)
    for (int j = s * s; j < k2; ++j) o[j] = 0.f;
}

// dL/dy (n, k²) from dL/d(output) through the crop
template <typename in_t>
__global__ void crop_backward_kernel(const RowInfo* __restrict__ info, const in_t* __restrict__ y,
                                     const float* __restrict__ grad, int64_t n, int k,
                                     float* __restrict__ gy) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= n) return;
  const RowInfo ri = info[r];
  const int k2 = k * k;
  float g[kMaxK2];
  for (int j = 0; j < k2; ++j) g[j] = 0.f;
  if (ri.valid) {
    const float* go = grad + ri.out;
    const int s = ri.size;
    if (s == k) {
      for (int j = 0; j < k2; ++j) g[j] = go[j];
    } else if (ri.crop == kCropCenter) {
      const int lo = (k - s) / 2;
      for (int a = 0; a < s; ++a)
        for (int b = 0; b < s; ++b) g[(lo + a) * k + lo + b] = go[a * s + b];
    } else {
      const int w = k - s + 1;
      float v[kMaxK2];
      for (int j = 0; j < k2; ++j) v[j] = to_float(y[r * k2 + j]);
      for (int a = 0; a < s; ++a)
        for (int b = 0; b < s; ++b) {
          if (ri.crop == kCropAverage) {
            const float delta = go[a * s + b] / float(w * w);
            for (int i = 0; i < w; ++i)
              for (int j = 0; j < w; ++j) g[(a + i) * k + b + j] += delta;
          } else {
            g[argmax_window(v, k, a, b, w)] += go[a * s + b];
          }
        }
    }
  }
  for (int j = 0; j < k2; ++j) gy[r * k2 + j] = g[j];
}

// Per-filter and per-channel sums of dL/dz1 (basic encoding), for the gradient of W1.
template <typename in_t>
__global__ void first_layer_grad_kernel(const RowInfo* __restrict__ info, const in_t* __restrict__ g1,
                                        int64_t n, int64_t hidden, float* __restrict__ g_filter,
                                        float* __restrict__ g_channel) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= n * hidden) return;
  const int64_t r = idx / hidden, j = idx % hidden;
  const RowInfo ri = info[r];
  if (!ri.valid) return;
  const float v = to_float(g1[idx]);
  atomicAdd(g_filter + int64_t(ri.filter) * hidden + j, v);
  atomicAdd(g_channel + int64_t(ri.channel) * hidden + j, v);
}

// ---- host side -----------------------------------------------------------------------------------------
template <typename T>
void launch_first_layer(const at::Tensor& info, const at::Tensor& tf, const at::Tensor& tc, int64_t n,
                        int64_t hidden, const at::Tensor& out, cudaStream_t stream) {
  first_layer_kernel<T><<<blocks_for(n * hidden), kThreads, 0, stream>>>(
      reinterpret_cast<const RowInfo*>(info.data_ptr()), tf.data_ptr<float>(), tc.data_ptr<float>(), n,
      hidden, device_ptr<T>(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

class CudaDecoder {
 public:
  explicit CudaDecoder(const DecodeProblem& p)
      : p_(p),
        bf16_(p.precision == Precision::kBf16),
        cdt_(bf16_ ? at::kBFloat16 : at::kFloat),
        last_(p.num_blocks - 1),
        stream_(c10::cuda::getCurrentCUDAStream()) {
    meta_ = p.meta.to(p.weights[0].device());
    for (int64_t i = 0; i < p.num_blocks; ++i) {
      w_.push_back(p.weights[i].to(cdt_).contiguous());
      b_.push_back(p.biases[i].to(cdt_).contiguous());
    }
    if (p.encoding == kBasic) {
      tables_ = build_tables(p, [](const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b); });
    }
    // Rows per tile: the activations kept for backward stay within ~256 MiB.
    const int64_t per_row = p.hidden * std::max<int64_t>(1, last_) * (bf16_ ? 2 : 4);
    tile_ = std::max<int64_t>(1024, (int64_t(256) << 20) / per_row);
  }

  at::Tensor forward() {
    at::Tensor out = p_.output_like();
    const int64_t rows = p_.num_rows();
    for (int64_t begin = 0; begin < rows; begin += tile_) {
      const int64_t n = std::min(tile_, rows - begin);
      at::Tensor info = row_info(begin, n);
      std::vector<at::Tensor> acts;
      at::Tensor y = forward_tile(info, n, acts, /*keep=*/false);
      launch_scatter(info, y, n, out);
    }
    return out;
  }

  std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> backward(const at::Tensor& grad) {
    const auto f32 = p_.weights[0].options();
    std::vector<at::Tensor> gw, gb;
    for (int64_t i = 0; i < p_.num_blocks; ++i) {
      gw.push_back(at::zeros_like(p_.weights[i]));
      gb.push_back(at::zeros_like(p_.biases[i]));
    }
    at::Tensor g_filter, g_channel;
    if (p_.encoding == kBasic) {
      g_filter = at::zeros({p_.num_filters, p_.hidden}, f32);
      g_channel = at::zeros({p_.num_channels, p_.hidden}, f32);
    }
    const int64_t rows = p_.num_rows();
    for (int64_t begin = 0; begin < rows; begin += tile_) {
      const int64_t n = std::min(tile_, rows - begin);
      at::Tensor info = row_info(begin, n);
      std::vector<at::Tensor> acts;  // [0] = encoding (ffn) or unused; [1..] hidden activations
      at::Tensor y = forward_tile(info, n, acts, /*keep=*/true);
      at::Tensor g = crop_backward(info, y, grad, n).to(cdt_);
      for (int64_t i = last_; i >= 1; --i) {
        const at::Tensor& a = acts[i];  // input of layer i
        gb[i].add_(g.sum({0}, false, at::kFloat));
        add_weight_grad(gw[i], g, a);
        g = at::threshold_backward(at::mm(g, w_[i]), a, 0);
      }
      if (p_.encoding == kBasic) {
        launch_first_layer_grad(info, g, n, g_filter, g_channel);
      } else {
        gb[0].add_(g.sum({0}, false, at::kFloat));
        add_weight_grad(gw[0], g, acts[0]);
      }
    }
    if (p_.encoding == kBasic) {
      first_layer_grads(p_, tables_, g_filter, g_channel,
                        [](const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b); }, gw[0], gb[0]);
    }
    return {gw, gb};
  }

 private:
  at::Tensor row_info(int64_t begin, int64_t n) {
    at::Tensor info = at::empty({n * int64_t(sizeof(RowInfo))},
                                p_.weights[0].options().dtype(at::kByte));
    row_info_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(
        meta_.data_ptr<int32_t>(), static_cast<int>(p_.num_layers), p_.num_kernels,
        p_.subset() ? p_.rows.data_ptr<int64_t>() : nullptr,
        p_.coord_rows.defined() ? p_.coord_rows.data_ptr<int64_t>() : nullptr, begin, n, p_.k2(),
        reinterpret_cast<RowInfo*>(info.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return info;
  }

  // acts[i] = the input of MLP layer i (acts[0]: the ffn encoding, unused for basic); returns the
  // last layer's output y (n, k²) in fp32, bias included.
  at::Tensor forward_tile(const at::Tensor& info, int64_t n, std::vector<at::Tensor>& acts, bool keep) {
    const auto opts = p_.weights[0].options().dtype(cdt_);
    const RowInfo* ri = reinterpret_cast<const RowInfo*>(info.data_ptr());
    at::Tensor h = at::empty({n, p_.hidden}, opts);
    acts.assign(p_.num_blocks, at::Tensor());
    if (p_.encoding == kBasic) {
      if (bf16_) launch_first_layer<__nv_bfloat16>(info, tables_.filter, tables_.channel, n, p_.hidden, h, stream_);
      else launch_first_layer<float>(info, tables_.filter, tables_.channel, n, p_.hidden, h, stream_);
    } else {
      const int64_t features = 3 * p_.levels;
      at::Tensor e = at::empty({n, 2 * features}, opts);
      const float* B = p_.encoding_table.data_ptr<float>();
      if (bf16_) {
        encode_ffn_kernel<__nv_bfloat16><<<blocks_for(n * features), kThreads, 0, stream_>>>(
            ri, p_.pos_layer.data_ptr<float>(), p_.pos_filter.data_ptr<float>(),
            p_.pos_channel.data_ptr<float>(), B, n, features, device_ptr<__nv_bfloat16>(e));
      } else {
        encode_ffn_kernel<float><<<blocks_for(n * features), kThreads, 0, stream_>>>(
            ri, p_.pos_layer.data_ptr<float>(), p_.pos_filter.data_ptr<float>(),
            p_.pos_channel.data_ptr<float>(), B, n, features, device_ptr<float>(e));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::addmm_out(h, b_[0], e, w_[0].t());
      h.relu_();
      if (keep) acts[0] = e;
    }
    for (int64_t i = 1; i < last_; ++i) {
      if (keep) acts[i] = h;
      at::Tensor next = at::addmm(b_[i], h, w_[i].t());
      next.relu_();
      h = next;
    }
    if (keep) acts[last_] = h;
    // y in fp32 with the fp32 bias, as the reference's bf16 mode computes it (the bf16 GEMM result
    // is rounded once, the bias is not); the max crop and its backward compare these values.
    if (bf16_) return at::mm(h, w_[last_].t()).to(at::kFloat).add_(p_.biases[last_]).contiguous();
    return at::addmm(p_.biases[last_], h, p_.weights[last_].t()).contiguous();
  }

  void launch_scatter(const at::Tensor& info, const at::Tensor& y, int64_t n, const at::Tensor& out) {
    const RowInfo* ri = reinterpret_cast<const RowInfo*>(info.data_ptr());
    const int k = static_cast<int>(p_.kernel_size);
    crop_scatter_kernel<float><<<blocks_for(n), kThreads, 0, stream_>>>(ri, y.data_ptr<float>(), n, k,
                                                                       p_.subset(), out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  at::Tensor crop_backward(const at::Tensor& info, const at::Tensor& y, const at::Tensor& grad, int64_t n) {
    at::Tensor gy = at::empty({n, p_.k2()}, p_.weights[0].options());
    const RowInfo* ri = reinterpret_cast<const RowInfo*>(info.data_ptr());
    const int k = static_cast<int>(p_.kernel_size);
    crop_backward_kernel<float><<<blocks_for(n), kThreads, 0, stream_>>>(ri, y.data_ptr<float>(),
                                                                        grad.data_ptr<float>(), n, k,
                                                                        gy.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return gy;
  }

  // acc (out, in) fp32 += g (n, out)ᵀ @ a (n, in), the product in the compute dtype
  void add_weight_grad(at::Tensor& acc, const at::Tensor& g, const at::Tensor& a) {
    if (bf16_) acc.add_(at::mm(g.t(), a));
    else acc.addmm_(g.t(), a);
  }

  void launch_first_layer_grad(const at::Tensor& info, const at::Tensor& g1, int64_t n,
                               const at::Tensor& g_filter, const at::Tensor& g_channel) {
    const RowInfo* ri = reinterpret_cast<const RowInfo*>(info.data_ptr());
    at::Tensor g = g1.contiguous();
    if (bf16_) {
      first_layer_grad_kernel<__nv_bfloat16><<<blocks_for(n * p_.hidden), kThreads, 0, stream_>>>(
          ri, device_ptr<__nv_bfloat16>(g), n, p_.hidden, g_filter.data_ptr<float>(),
          g_channel.data_ptr<float>());
    } else {
      first_layer_grad_kernel<float><<<blocks_for(n * p_.hidden), kThreads, 0, stream_>>>(
          ri, device_ptr<float>(g), n, p_.hidden, g_filter.data_ptr<float>(), g_channel.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  const DecodeProblem& p_;
  const bool bf16_;
  const at::ScalarType cdt_;
  const int64_t last_;
  cudaStream_t stream_;
  int64_t tile_ = 0;
  at::Tensor meta_;
  std::vector<at::Tensor> w_, b_;
  SeparableTables tables_;
};

DecodeProblem cuda_problem(at::TensorList weights, at::TensorList biases, const at::Tensor& meta,
                           const at::Tensor& pos_layer, const at::Tensor& pos_filter,
                           const at::Tensor& pos_channel, const c10::optional<at::Tensor>& coord_rows,
                           const c10::optional<at::Tensor>& rows, const at::Tensor& encoding_table,
                           int64_t encoding, int64_t kernel_size, int64_t num_kernels, int64_t num_weights,
                           c10::string_view precision) {
  DecodeProblem p = make_problem(weights, biases, meta, pos_layer, pos_filter, pos_channel, coord_rows,
                                 rows, encoding_table, encoding, kernel_size, num_kernels, num_weights,
                                 std::string(precision.data(), precision.size()));
  TORCH_CHECK(p.weights[0].is_cuda(), "nern_fast: internal error: CUDA kernel called with ",
              p.weights[0].device(), " tensors");
  TORCH_CHECK(p.num_filters < (int64_t(1) << 31) && p.num_channels < (int64_t(1) << 31),
              "nern_fast: too many filters/channels for the CUDA decoder");
  return p;
}

at::Tensor decode_forward_cuda(at::TensorList weights, at::TensorList biases, const at::Tensor& meta,
                               const at::Tensor& pos_layer, const at::Tensor& pos_filter,
                               const at::Tensor& pos_channel, const c10::optional<at::Tensor>& coord_rows,
                               const c10::optional<at::Tensor>& rows, const at::Tensor& encoding_table,
                               int64_t encoding, int64_t kernel_size, int64_t num_kernels,
                               int64_t num_weights, c10::string_view precision) {
  DecodeProblem p = cuda_problem(weights, biases, meta, pos_layer, pos_filter, pos_channel, coord_rows,
                                 rows, encoding_table, encoding, kernel_size, num_kernels, num_weights,
                                 precision);
  const c10::cuda::CUDAGuard device_guard(p.weights[0].device());
  std::optional<at::NoTF32Guard> ieee;  // fp32 means IEEE fp32 whatever the global TF32 switch says
  if (p.precision == Precision::kFp32) ieee.emplace();
  return CudaDecoder(p).forward();
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> decode_backward_cuda(
    const at::Tensor& grad, at::TensorList weights, at::TensorList biases, const at::Tensor& meta,
    const at::Tensor& pos_layer, const at::Tensor& pos_filter, const at::Tensor& pos_channel,
    const c10::optional<at::Tensor>& coord_rows, const c10::optional<at::Tensor>& rows,
    const at::Tensor& encoding_table, int64_t encoding, int64_t kernel_size, int64_t num_kernels,
    int64_t num_weights, c10::string_view precision) {
  DecodeProblem p = cuda_problem(weights, biases, meta, pos_layer, pos_filter, pos_channel, coord_rows,
                                 rows, encoding_table, encoding, kernel_size, num_kernels, num_weights,
                                 precision);
  check_grad_output(p, grad);
  const c10::cuda::CUDAGuard device_guard(p.weights[0].device());
  std::optional<at::NoTF32Guard> ieee;
  if (p.precision == Precision::kFp32) ieee.emplace();
  return CudaDecoder(p).backward(grad);
}

}  // namespace
}  // namespace nern_fast

TORCH_LIBRARY_IMPL(nern_fast_C, CUDA, m) {
  m.impl("decode_forward", &nern_fast::decode_forward_cuda);
  m.impl("decode_backward", &nern_fast::decode_backward_cuda);
}
