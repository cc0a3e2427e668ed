// CUDA decode: cuBLAS GEMMs through ATen (tensor cores for tf32/bf16) on large row tiles, and a few
// kernels of our own for what cuBLAS cannot fuse: the first layer's tables, the separable first
// layer (or the encoding), crop + bias + scatter into the output, the crop's backward. See
// csrc/README.md for the design and its measurements.
//
// Launches per row tile, forward: `num_blocks + 1` (first layer, one GEMM per hidden layer with bias
// and ReLU in cuBLASLt's epilogue, the last GEMM, crop/scatter). Per call: one table kernel (+ one
// weight-packing kernel in bf16). Every kernel decodes its rows' coordinates itself and
// bounds-checks them.
//
// bf16 keeps the fp32 bias: the epilogue's bias would be rounded to bf16, an error repeated on every
// row (it doubled the decode error in the first GPU run). Instead every GEMM input carries two
// constant-one columns and the packed bf16 weight two extra columns with the bias split into
// hi = bf16(b) and lo = bf16(b - hi) (0 if hi is not finite: an infinite bias stays infinite, not
// NaN), so the fp32 accumulator receives b to ~2^-17 relative; the epilogue adds a zero bias and
// applies the ReLU. Widths are padded to multiples of 8 (16-byte rows).
#include "decode.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace nern_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxK2 = 49;            // kernel_size <= 7, checked at the boundary
constexpr int kTableRows = 16;        // rows of a table per block (register accumulators)
constexpr int kTableThreads = 128;    // hidden units per table block
constexpr float kPi = 3.14159265358979323846f;  // torch multiplies by float(math.pi)
// cuBLASLt's fused bias epilogue is used by ATen below 65535·32 rows: stay under it.
constexpr int64_t kMaxTileRows = 2000000;
constexpr int64_t kMinTileRows = 1024;
constexpr int64_t kDefaultWorkspace = int64_t(1) << 30;  // activations of one tile: 1 GiB
constexpr int kMaxGridX = 1 << 20;

// ---- small device helpers --------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);  // round to nearest even, as torch's .to(torch.bfloat16)
}
// NaN stays NaN, as torch.relu keeps it (a masked NaN would hide a diverged predictor)
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

// Four consecutive values (16-byte aligned for float, 8-byte for bf16: callers check H % 4 == 0).
__device__ __forceinline__ void store4(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void store4(__nv_bfloat16* p, float a, float b, float c, float d) {
  __nv_bfloat162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
  uint2 packed;
  packed.x = *reinterpret_cast<uint32_t*>(&lo);
  packed.y = *reinterpret_cast<uint32_t*>(&hi);
  *reinterpret_cast<uint2*>(p) = packed;
}

template <typename T>
T* device_ptr(const at::Tensor& t);
template <>
float* device_ptr<float>(const at::Tensor& t) { return t.data_ptr<float>(); }
template <>
__nv_bfloat16* device_ptr<__nv_bfloat16>(const at::Tensor& t) {
  return reinterpret_cast<__nv_bfloat16*>(t.data_ptr<at::BFloat16>());
}

inline int grid_for(int64_t work, int per_block) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, kMaxGridX)));
}

// ---- coordinates ------------------------------------------------------------------------------------
// Maps the rows of a tile (flat kernel indices, or positions in a subset) to their kernels.
struct RowSource {
  const int32_t* meta;        // (L, 8) on the device
  const int64_t* rows;        // subset indices or nullptr (full decode)
  const int64_t* coord_rows;  // permutation or nullptr
  int64_t num_kernels;
  int64_t begin;              // first work row of the tile
  int num_layers;
  int k2;
};

struct RowCoord {
  int64_t out;  // first output element of the row; -1: nothing to write (slot out of range)
  int32_t filter, channel, layer, size, crop;
  bool valid;   // the kernel and its (permuted) coordinate lie inside their layer
};

__device__ __forceinline__ int last_layer_at_or_below(const int32_t* meta, int num_layers, int column,
                                                      int64_t value) {
  int lo = 0, hi = num_layers - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (__ldg(meta + mid * kMetaColumns + column) <= value) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

__device__ RowCoord decode_row(const RowSource& s, int64_t i) {
  RowCoord r;
  r.filter = r.channel = r.layer = r.size = r.crop = 0;
  r.valid = false;
  const int64_t work = s.begin + i;
  r.out = s.rows ? work * s.k2 : -1;
  const int64_t slot = s.rows ? s.rows[work] : work;
  if (slot < 0 || slot >= s.num_kernels) return r;
  const int l = last_layer_at_or_below(s.meta, s.num_layers, kKernelOffset, slot);
  const int32_t* m = s.meta + l * kMetaColumns;
  const int64_t q = slot - m[kKernelOffset];
  const int64_t c_in = m[kCIn];
  const int64_t kernels = int64_t(m[kCOut]) * c_in;
  if (q < 0 || q >= kernels) return r;
  r.layer = l;
  r.size = m[kSize];
  r.crop = m[kCrop];
  if (!s.rows) r.out = m[kWeightOffset] + q * m[kSize] * m[kSize];
  const int64_t coord = s.coord_rows ? s.coord_rows[slot] : q;
  if (coord < 0 || coord >= kernels) return r;
  r.filter = static_cast<int32_t>(m[kFilterOffset] + coord / c_in);
  r.channel = static_cast<int32_t>(m[kChannelOffset] + coord % c_in);
  r.valid = true;
  return r;
}

// ---- first-layer tables (basic encoding, NERN_SPEC §4) ------------------------------------------------
// filter_table[f] = W1[:, 0:4L]·[e_l(layer of f), e_f(f)] + b1, channel_table[c] = W1[:, 4L:6L]·e_c(c),
// fp32 accumulation, encodings computed as the reference does: x = (p·freq)·π, sin and cos.
__global__ void tables_kernel(const int32_t* __restrict__ meta, int num_layers,
                              const float* __restrict__ pos_layer, const float* __restrict__ pos_filter,
                              const float* __restrict__ pos_channel, const float* __restrict__ freqs,
                              int levels, const float* __restrict__ w0, const float* __restrict__ b0,
                              int64_t hidden, int64_t num_filters, int64_t num_channels,
                              int64_t filter_blocks, float* __restrict__ filter_table,
                              float* __restrict__ channel_table) {
  extern __shared__ float enc[];  // kTableRows × width
  const bool filters = blockIdx.x < filter_blocks;
  const int64_t row0 = int64_t(filters ? blockIdx.x : blockIdx.x - filter_blocks) * kTableRows;
  const int64_t rows = filters ? num_filters : num_channels;
  const int width = (filters ? 4 : 2) * levels;
  const int pairs = width / 2;
  for (int t = threadIdx.x; t < kTableRows * pairs; t += blockDim.x) {
    const int r = t / pairs, q = t % pairs, block = q / levels, level = q % levels;
    const int64_t row = row0 + r;
    float p = 0.f;
    if (row < rows) {
      if (!filters) p = pos_channel[row];
      else if (block == 1) p = pos_filter[row];
      else p = pos_layer[last_layer_at_or_below(meta, num_layers, kFilterOffset, row)];
    }
    const float x = (p * freqs[level]) * kPi;
    enc[r * width + 2 * q] = sinf(x);
    enc[r * width + 2 * q + 1] = cosf(x);
  }
  __syncthreads();
  const int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= hidden) return;
  float acc[kTableRows];
#pragma unroll
  for (int r = 0; r < kTableRows; ++r) acc[r] = 0.f;
  const float* w = w0 + j * 6 * levels + (filters ? 0 : 4 * levels);
  for (int m = 0; m < width; ++m) {
    const float wm = __ldg(w + m);
#pragma unroll
    for (int r = 0; r < kTableRows; ++r) acc[r] = fmaf(wm, enc[r * width + m], acc[r]);
  }
  const float bias = filters ? b0[j] : 0.f;
  float* out = filters ? filter_table : channel_table;
#pragma unroll
  for (int r = 0; r < kTableRows; ++r)
    if (row0 + r < rows) out[(row0 + r) * hidden + j] = acc[r] + bias;
}

// ---- first layer and encodings (one warp per row) --------------------------------------------------
// Rows of width `width` stored with stride `ld`; when ld > width (bf16 GEMM inputs) columns width and
// width + 1 hold the constant ones that carry the next layer's bias, the rest of the padding zeros.
template <typename out_t>
__device__ __forceinline__ void write_padding(out_t* row, int64_t width, int64_t ld, int lane) {
  for (int64_t j = width + lane; j < ld; j += 32) row[j] = from_float<out_t>(j < width + 2 ? 1.f : 0.f);
}

// basic: h1 = relu(filter_table[f] + channel_table[c]) (layer term and bias are in the filter table)
template <typename out_t>
__global__ void first_layer_kernel(RowSource src, const float* __restrict__ filter_table,
                                   const float* __restrict__ channel_table, int64_t n, int64_t hidden,
                                   int64_t ld, out_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const bool vec = (hidden & 3) == 0 && (ld & 3) == 0;
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < n; r += warps) {
    const RowCoord c = decode_row(src, r);
    out_t* o = out + r * ld;
    write_padding(o, hidden, ld, lane);
    if (!c.valid) {
      for (int64_t j = lane; j < hidden; j += 32) o[j] = from_float<out_t>(0.f);
      continue;
    }
    const float* a = filter_table + int64_t(c.filter) * hidden;
    const float* b = channel_table + int64_t(c.channel) * hidden;
    if (vec) {
      for (int64_t j = 4 * lane; j < hidden; j += 128) {
        const float4 x = *reinterpret_cast<const float4*>(a + j);
        const float4 y = *reinterpret_cast<const float4*>(b + j);
        store4(o + j, relu(x.x + y.x), relu(x.y + y.y), relu(x.z + y.z), relu(x.w + y.w));
      }
    } else {
      for (int64_t j = lane; j < hidden; j += 32) o[j] = from_float<out_t>(relu(a[j] + b[j]));
    }
  }
}

// The encoding of every row of the tile (n, 6·levels), laid out as nern_fast.encoding does.
// basic: x = (p_i·freq)·π per index; ffn: x = (2π·p) @ Bᵀ. Rows without a valid coordinate get zeros.
template <typename out_t>
__global__ void encode_kernel(RowSource src, int encoding, const float* __restrict__ pos_layer,
                              const float* __restrict__ pos_filter, const float* __restrict__ pos_channel,
                              const float* __restrict__ table, int levels, int64_t n, int64_t ld,
                              out_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int pairs = 3 * levels, width = 6 * levels;
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < n; r += warps) {
    const RowCoord c = decode_row(src, r);
    out_t* o = out + r * ld;
    write_padding(o, width, ld, lane);
    if (!c.valid) {
      for (int q = lane; q < width; q += 32) o[q] = from_float<out_t>(0.f);
      continue;
    }
    const float p[3] = {pos_layer[c.layer], pos_filter[c.filter], pos_channel[c.channel]};
    for (int q = lane; q < pairs; q += 32) {
      float x;
      if (encoding == kBasic) {
        x = (p[q / levels] * table[q % levels]) * kPi;
      } else {  // (p * 2) * π in fp32, then the 3-term product with B
        const float* b = table + q * 3;
        x = (p[0] * 2.f) * kPi * b[0] + (p[1] * 2.f) * kPi * b[1] + (p[2] * 2.f) * kPi * b[2];
      }
      o[2 * q] = from_float<out_t>(sinf(x));
      o[2 * q + 1] = from_float<out_t>(cosf(x));
    }
  }
}

// ---- crop (NERN_SPEC §2, torch's avg_pool2d / max_pool2d semantics) ---------------------------------
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

// The last layer's output y (raw product) + its fp32 bias, cropped and written to the output.
template <typename in_t>
__global__ void crop_scatter_kernel(RowSource src, const in_t* __restrict__ y, const float* __restrict__ bias,
                                    int64_t n, int k, bool subset, float* __restrict__ out) {
  const int k2 = k * k;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < n;
       r += int64_t(gridDim.x) * blockDim.x) {
    const RowCoord c = decode_row(src, r);
    if (c.out < 0) continue;
    float* o = out + c.out;
    const int written = subset ? k2 : c.size * c.size;
    if (!c.valid) {
      for (int j = 0; j < written; ++j) o[j] = 0.f;
      continue;
    }
    float v[kMaxK2];
    for (int j = 0; j < k2; ++j) v[j] = to_float(y[r * k2 + j]) + bias[j];
    const int s = c.size;
    if (s == k) {
      for (int j = 0; j < k2; ++j) o[j] = v[j];
    } else if (c.crop == kCropCenter) {
      const int lo = (k - s) / 2;
      for (int a = 0; a < s; ++a)
        for (int b = 0; b < s; ++b) o[a * s + b] = v[(lo + a) * k + lo + b];
    } else {
      const int w = k - s + 1;
      for (int a = 0; a < s; ++a)
        for (int b = 0; b < s; ++b) {
          if (c.crop == kCropAverage) {
            float sum = 0.f;
            for (int i = 0; i < w; ++i)
              for (int j = 0; j < w; ++j) sum += v[(a + i) * k + b + j];
            o[a * s + b] = sum / float(w * w);
          } else {
            o[a * s + b] = v[argmax_window(v, k, a, b, w)];
          }
        }
    }
    for (int j = s * s; j < written; ++j) o[j] = 0.f;
  }
}

// dL/dy (n, k²) in fp32 from dL/d(output) through the crop (y + bias needed by the max crop)
template <typename in_t>
__global__ void crop_backward_kernel(RowSource src, const in_t* __restrict__ y, const float* __restrict__ bias,
                                     const float* __restrict__ grad, int64_t n, int k,
                                     float* __restrict__ gy) {
  const int k2 = k * k;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < n;
       r += int64_t(gridDim.x) * blockDim.x) {
    const RowCoord c = decode_row(src, r);
    float g[kMaxK2];
    for (int j = 0; j < k2; ++j) g[j] = 0.f;
    if (c.valid) {
      const float* go = grad + c.out;
      const int s = c.size;
      if (s == k) {
        for (int j = 0; j < k2; ++j) g[j] = go[j];
      } else if (c.crop == kCropCenter) {
        const int lo = (k - s) / 2;
        for (int a = 0; a < s; ++a)
          for (int b = 0; b < s; ++b) g[(lo + a) * k + lo + b] = go[a * s + b];
      } else {
        const int w = k - s + 1;
        float v[kMaxK2];
        for (int j = 0; j < k2; ++j) v[j] = to_float(y[r * k2 + j]) + bias[j];
        for (int a = 0; a < s; ++a)
          for (int b = 0; b < s; ++b) {
            if (c.crop == kCropAverage) {
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
}

// ---- bf16 weights packed with their bias (see the top of this file), several layers per launch ---------
constexpr int kMaxPack = 16;
struct PackJob {
  const float* weight;   // (rows, cols) fp32
  const float* bias;     // (rows,) fp32, or nullptr: no bias columns (the last layer)
  __nv_bfloat16* out;    // (rows_out, cols_pad) bf16
  int64_t rows, cols, rows_out, cols_pad;
};
struct PackList {
  PackJob job[kMaxPack];
};

// out[r, c] = W[r, c]; out[r, cols] = hi(b[r]); out[r, cols + 1] = lo(b[r]); the rows past `rows`
// copy the input's one-columns (out[rows + t, cols + t] = 1, t < 2) so the next input has them too.
__global__ void pack_bf16_kernel(PackList list) {
  const PackJob job = list.job[blockIdx.y];
  const int64_t total = job.rows_out * job.cols_pad;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / job.cols_pad, c = i % job.cols_pad;
    float v = 0.f;
    if (r < job.rows) {
      if (c < job.cols) {
        v = job.weight[r * job.cols + c];
      } else if (job.bias && c < job.cols + 2) {
        const float hi = __bfloat162float(__float2bfloat16_rn(job.bias[r]));
        v = c == job.cols ? hi : (isfinite(hi) ? job.bias[r] - hi : 0.f);  // Inf - Inf would be NaN
      }
    } else if (r - job.rows < 2 && c == job.cols + (r - job.rows)) {
      v = 1.f;
    }
    job.out[i] = __float2bfloat16_rn(v);
  }
}

// ---- host side -------------------------------------------------------------------------------------
#define NERN_FAST_LAUNCH(kernel, grid, block, smem, stream, ...)                     \
  do {                                                                             \
    TORCH_CHECK((grid).x >= 1 && (grid).y >= 1, "nern_fast: internal error: empty grid"); \
    kernel<<<grid, block, smem, stream>>>(__VA_ARGS__);                           \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                \
  } while (0)

// The layout table on the device, cached by content (one small copy per layout and device, not per
// call: a copy from pageable memory synchronises the stream). Never evicted: freeing a table could
// hand its block to another stream while queued kernels still read it, and tables are tiny (32 bytes
// per conv layer). Never destroyed: tensors must not outlive the CUDA context in static destructors.
at::Tensor device_meta(const DecodeProblem& p, const at::Device& device) {
  using Key = std::pair<int, std::vector<int32_t>>;
  static std::mutex* mutex = new std::mutex();
  static std::map<Key, at::Tensor>* cache = new std::map<Key, at::Tensor>();
  const int32_t* m = p.meta.data_ptr<int32_t>();
  Key key(device.index(), std::vector<int32_t>(m, m + p.meta.numel()));
  std::lock_guard<std::mutex> lock(*mutex);
  auto it = cache->find(key);
  if (it == cache->end()) it = cache->emplace(std::move(key), p.meta.to(device)).first;
  return it->second;
}

// True while `stream` is being captured into a CUDA graph, or when that cannot be told.
bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) == cudaSuccess) return status != cudaStreamCaptureStatusNone;
  (void)cudaGetLastError();
  return true;
}

// Rows per tile from a memory budget for the tile's buffers: the call's workspace_bytes (> 0), else
// NERN_FAST_CUDA_WORKSPACE_MB, else 1 GiB but at most half of the device's free memory for large
// problems (never fewer than 1024 rows). Not while capturing a CUDA graph (capture may forbid the
// query, and free memory now says nothing about the replays): the 1 GiB default then.
int64_t tile_rows(int64_t total_rows, int64_t bytes_per_row, cudaStream_t stream, int64_t workspace_bytes) {
  int64_t budget = kDefaultWorkspace;
  bool explicit_budget = false;
  if (workspace_bytes > 0) {
    budget = workspace_bytes;
    explicit_budget = true;
  } else if (const char* env = std::getenv("NERN_FAST_CUDA_WORKSPACE_MB")) {
    const long mb = std::strtol(env, nullptr, 10);
    if (mb >= 1 && mb <= (1L << 22)) {
      budget = int64_t(mb) << 20;
      explicit_budget = true;
    }
  }
  if (!explicit_budget && total_rows * bytes_per_row > (int64_t(256) << 20) && !capturing(stream)) {
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
      budget = std::min<int64_t>(budget, std::max<int64_t>(int64_t(256) << 20, int64_t(free_bytes / 2)));
    } else {
      (void)cudaGetLastError();  // the query failing only means "no better estimate"
    }
  }
  const int64_t rows = std::clamp<int64_t>(budget / std::max<int64_t>(1, bytes_per_row), kMinTileRows,
                                           kMaxTileRows);
  return std::max<int64_t>(1, std::min(rows, total_rows));
}

inline int64_t round_up8(int64_t v) { return (v + 7) / 8 * 8; }

// acc (fp32) += m1 @ m2 for bf16 m1, m2 with every product exact and fp32 accumulation (what a bf16
// GEMM with an fp32 output computes: per-tile products are never rounded to bf16). Three ways, chosen
// up front from what this torch registers, never by trying one and catching its refusal (the catch
// also swallowed real CUDA errors, and on the GPU host the extension crashed at its first throw):
//  1. aten::addmm.dtype_out with acc as cuBLAS's fp32 C: only when NERN_FAST_CUDA_BF16_WGRAD=addmm
//     forces it (older torch refuses an fp32 `self` there; from which version it is accepted is not
//     established, so it is never chosen by default);
//  2. aten::mm.dtype_out into an fp32 product, added to acc (the default; torch >= 2.8);
//  3. an IEEE fp32 GEMM of the operands cast to fp32: a product of two bf16 values (8-bit
//     significands) is exact in fp32 — the same numerics at fp32-GEMM speed.
// NERN_FAST_CUDA_BF16_WGRAD=addmm|mm|fp32 starts at that way and goes down to the first that exists
// (tests run every way).
enum class WgradWay : int { kAddmm = 0, kMm = 1, kFp32 = 2 };

WgradWay first_wgrad_way() {
  const char* env = std::getenv("NERN_FAST_CUDA_BF16_WGRAD");
  if (env == nullptr) return WgradWay::kMm;
  const std::string way(env);
  if (way == "mm") return WgradWay::kMm;
  if (way == "fp32") return WgradWay::kFp32;
  TORCH_CHECK(way == "addmm", "nern_fast: NERN_FAST_CUDA_BF16_WGRAD must be addmm, mm or fp32, got '",
              way, "'");
  return WgradWay::kAddmm;
}

// Calls a dtype_out overload (addmm: self, m1, m2; mm: m1, m2) boxed, with an fp32 out_dtype.
void call_dtype_out(const c10::OperatorHandle& op, bool addmm, std::vector<c10::IValue> args,
                    const at::Tensor& out) {
  torch::jit::Stack stack(std::move(args));
  stack.emplace_back(at::kFloat);
  if (addmm) {
    stack.emplace_back(at::Scalar(1));
    stack.emplace_back(at::Scalar(1));
  }
  stack.emplace_back(out);
  op.callBoxed(&stack);
}

void add_bf16_product(at::Tensor& acc, const at::Tensor& m1, const at::Tensor& m2) {
  static const std::optional<c10::OperatorHandle> addmm_op =
      c10::Dispatcher::singleton().findSchema({"aten::addmm", "dtype_out"});
  static const std::optional<c10::OperatorHandle> mm_op =
      c10::Dispatcher::singleton().findSchema({"aten::mm", "dtype_out"});
  const WgradWay first = first_wgrad_way();
  if (first == WgradWay::kAddmm && addmm_op.has_value()) {
    call_dtype_out(*addmm_op, /*addmm=*/true, {acc, m1, m2}, acc);
  } else if (first != WgradWay::kFp32 && mm_op.has_value()) {
    at::Tensor product = at::empty(acc.sizes(), acc.options());
    call_dtype_out(*mm_op, /*addmm=*/false, {m1, m2}, product);
    acc.add_(product);
  } else {
    at::NoTF32Guard ieee;  // IEEE fp32: exact products of the bf16 values, fp32 accumulation
    acc.addmm_(m1.to(at::kFloat), m2.to(at::kFloat));
  }
}

// ATen's cuBLASLt GEMMs (the hidden layers' bias + ReLU epilogue) take TF32 or not from the global CUDA
// matmul precision only; at::NoTF32Guard reaches the cuBLAS-handle GEMMs alone. So each call sets the
// global switch to its mode (fp32/bf16: IEEE, tf32: TF32) and restores it after, as the Python wrapper
// does, for callers that bypass the wrapper (raw op, torch.compile'd code). It is process-wide: other
// threads' matmuls during the call see it too. Only flipped when it differs from the mode.
class MatmulPrecisionGuard {
 public:
  explicit MatmulPrecisionGuard(bool tf32)
      : previous_(at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL)),
        changed_((previous_ == at::Float32Precision::TF32) != tf32) {
    if (changed_) set(tf32 ? at::Float32Precision::TF32 : at::Float32Precision::IEEE);
  }
  ~MatmulPrecisionGuard() {
    if (changed_) set(previous_);
  }
  MatmulPrecisionGuard(const MatmulPrecisionGuard&) = delete;
  MatmulPrecisionGuard& operator=(const MatmulPrecisionGuard&) = delete;

 private:
  static void set(at::Float32Precision p) {
    at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, p);
  }
  const at::Float32Precision previous_;
  const bool changed_;
};

class CudaDecoder {
 public:
  CudaDecoder(const DecodeProblem& p, bool backward, int64_t workspace_bytes = 0)
      : p_(p),
        bf16_(p.precision == Precision::kBf16),
        cdt_(bf16_ ? at::kBFloat16 : at::kFloat),
        cbytes_(bf16_ ? 2 : 4),
        last_(p.num_blocks - 1),
        hidden_(p.hidden),
        enc_width_(6 * p.levels),
        // bf16 GEMM inputs carry two one-columns and are padded to 16-byte rows
        act_ld_(bf16_ ? round_up8(p.hidden + 2) : p.hidden),
        enc_ld_(bf16_ && p.encoding == kFfn ? round_up8(6 * p.levels + 2) : 6 * p.levels),
        device_(p.weights[0].device()),
        stream_(c10::cuda::getCurrentCUDAStream(p.weights[0].device().index())) {
    const int64_t k2 = p.k2();
    const bool keep_enc = backward || p.encoding == kFfn;
    const int64_t per_row =
        backward ? last_ * act_ld_ * cbytes_ + 2 * hidden_ * cbytes_ + enc_ld_ * cbytes_ + k2 * (cbytes_ + 4 + 2)
                 : 2 * act_ld_ * cbytes_ + (keep_enc ? enc_ld_ * cbytes_ : 0) + k2 * cbytes_;
    tile_ = tile_rows(p.num_rows(), per_row, stream_, workspace_bytes);
    if (p.num_rows() == 0) return;
    meta_ = device_meta(p, device_);
    prepare_weights();
    if (p.encoding == kBasic) build_tables();
    // Tile buffers, allocated once per call; tiles use views of their first n rows.
    const auto opts = p.weights[0].options().dtype(cdt_);
    const int64_t act_buffers = backward ? last_ : std::min<int64_t>(2, last_);
    for (int64_t i = 0; i < act_buffers; ++i) act_.push_back(at::empty({tile_, act_ld_}, opts));
    if (keep_enc) enc_ = at::empty({tile_, enc_ld_}, opts);
    y_ = at::empty({tile_, k2}, opts);
  }

  at::Tensor forward() {
    at::Tensor out = p_.output_like();
    const int64_t rows = p_.num_rows();
    for (int64_t begin = 0; begin < rows; begin += tile_) {
      const int64_t n = std::min(tile_, rows - begin);
      const RowSource src = source(begin);
      forward_tile(src, n, /*keep=*/false);
      launch_scatter(src, n, out);
    }
    return out;
  }

  std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> backward(const at::Tensor& grad) {
    std::vector<at::Tensor> gw, gb;
    for (int64_t i = 0; i < p_.num_blocks; ++i) {
      gw.push_back(at::zeros_like(p_.weights[i]));
      gb.push_back(at::zeros_like(p_.biases[i]));
    }
    const int64_t rows = p_.num_rows();
    if (rows == 0) return {gw, gb};
    const auto f32 = p_.weights[0].options();
    const auto copts = f32.dtype(cdt_);
    at::Tensor gy32_buf = at::empty({tile_, p_.k2()}, f32);
    at::Tensor gy_buf = bf16_ ? at::empty({tile_, p_.k2()}, copts) : gy32_buf;
    at::Tensor gm_buf = at::empty({tile_, hidden_}, copts);
    at::Tensor gt_buf = at::empty({tile_, hidden_}, copts);
    for (int64_t begin = 0; begin < rows; begin += tile_) {
      const int64_t n = std::min(tile_, rows - begin);
      const RowSource src = source(begin);
      forward_tile(src, n, /*keep=*/true);
      at::Tensor gy32 = rows_of(gy32_buf, n);
      launch_crop_backward(src, n, grad, gy32);
      gb[last_].add_(gy32.sum(0));
      at::Tensor g = rows_of(gy_buf, n);
      if (bf16_) g.copy_(gy32);
      at::Tensor gm = rows_of(gm_buf, n), gt = rows_of(gt_buf, n);
      for (int64_t i = last_; i >= 1; --i) {
        // input of layer i (output of layer i-1), without the bf16 padding columns
        const at::Tensor a = rows_of(act_[i - 1], n).narrow(1, 0, hidden_);
        if (i < last_) gb[i].add_(g.sum(0, false, at::kFloat));
        add_weight_grad(gw[i], g, a);
        at::mm_out(gm, g, weight_view(i));
        at::threshold_backward_out(gt, gm, a, 0);
        g = gt;
      }
      // g = dL/dz1; W1's gradient is one GEMM with the tile's encodings (kept for ffn)
      if (p_.encoding == kBasic) launch_encode(src, n, rows_of(enc_, n));
      gb[0].add_(g.sum(0, false, at::kFloat));
      add_weight_grad(gw[0], g, rows_of(enc_, n).narrow(1, 0, enc_width_));
    }
    return {gw, gb};
  }

 private:
  static at::Tensor rows_of(const at::Tensor& t, int64_t n) { return t.narrow(0, 0, n); }

  RowSource source(int64_t begin) const {
    RowSource s;
    s.meta = meta_.data_ptr<int32_t>();
    s.rows = p_.subset() ? p_.rows.data_ptr<int64_t>() : nullptr;
    s.coord_rows = p_.coord_rows.defined() ? p_.coord_rows.data_ptr<int64_t>() : nullptr;
    s.num_kernels = p_.num_kernels;
    s.begin = begin;
    s.num_layers = static_cast<int>(p_.num_layers);
    s.k2 = static_cast<int>(p_.k2());
    return s;
  }

  // wc_[i]: layer i's GEMM operand. fp32/tf32: the weight itself. bf16: the packed weight
  // (out_pad, in_pad) with the bias columns and the one-rows (see the top of this file).
  void prepare_weights() {
    wc_.assign(p_.weights.begin(), p_.weights.end());
    if (!bf16_) return;
    zero_bias_ = at::zeros({act_ld_}, p_.weights[0].options().dtype(at::kBFloat16));
    std::vector<PackJob> jobs;
    std::vector<int64_t> layer_of_job;
    int64_t total = 0;
    for (int64_t i = (p_.encoding == kBasic ? 1 : 0); i < p_.num_blocks; ++i) {  // basic W1: no GEMM
      const at::Tensor& w = p_.weights[i];
      PackJob job{};
      job.weight = w.data_ptr<float>();
      job.bias = i < last_ ? p_.biases[i].data_ptr<float>() : nullptr;  // last bias: fp32, in scatter
      job.rows = w.size(0);
      job.cols = w.size(1);
      job.rows_out = i < last_ ? act_ld_ : w.size(0);
      job.cols_pad = i == 0 ? enc_ld_ : act_ld_;
      total += job.rows_out * job.cols_pad;
      jobs.push_back(job);
      layer_of_job.push_back(i);
    }
    at::Tensor flat = at::empty({total}, p_.weights[0].options().dtype(at::kBFloat16));
    int64_t offset = 0;
    for (size_t t = 0; t < jobs.size(); ++t) {
      at::Tensor packed = flat.narrow(0, offset, jobs[t].rows_out * jobs[t].cols_pad)
                              .view({jobs[t].rows_out, jobs[t].cols_pad});
      offset += packed.numel();
      jobs[t].out = device_ptr<__nv_bfloat16>(packed);
      wc_[layer_of_job[t]] = packed;
    }
    for (size_t start = 0; start < jobs.size(); start += kMaxPack) {
      PackList list{};
      int count = 0;
      int64_t largest = 1;
      for (size_t t = start; t < std::min(jobs.size(), start + kMaxPack); ++t, ++count) {
        list.job[count] = jobs[t];
        largest = std::max(largest, jobs[t].rows_out * jobs[t].cols_pad);
      }
      const dim3 grid(grid_for(largest, kThreads), count);
      NERN_FAST_LAUNCH(pack_bf16_kernel, grid, dim3(kThreads), 0, stream_, list);
    }
  }

  // Layer i's weight (out, in) as the backward's GEMMs use it: a view into the packed bf16 copy.
  at::Tensor weight_view(int64_t i) const {
    const at::Tensor& w = p_.weights[i];
    return wc_[i].narrow(0, 0, w.size(0)).narrow(1, 0, w.size(1));
  }

  void build_tables() {
    const auto f32 = p_.weights[0].options();
    filter_table_ = at::empty({p_.num_filters, hidden_}, f32);
    channel_table_ = at::empty({p_.num_channels, hidden_}, f32);
    const int64_t filter_blocks = (p_.num_filters + kTableRows - 1) / kTableRows;
    const int64_t channel_blocks = (p_.num_channels + kTableRows - 1) / kTableRows;
    const int64_t hidden_blocks = (hidden_ + kTableThreads - 1) / kTableThreads;
    TORCH_CHECK(filter_blocks + channel_blocks < (int64_t(1) << 31) && hidden_blocks < 65536,
                "nern_fast: the layout or hidden size is too large for the CUDA table kernel");
    const dim3 grid(static_cast<unsigned>(filter_blocks + channel_blocks), static_cast<unsigned>(hidden_blocks));
    const size_t smem = size_t(kTableRows) * 4 * p_.levels * sizeof(float);  // <= 16 KiB (levels <= 64)
    NERN_FAST_LAUNCH(tables_kernel, grid, dim3(kTableThreads), smem, stream_, meta_.data_ptr<int32_t>(),
                     static_cast<int>(p_.num_layers), p_.pos_layer.data_ptr<float>(),
                     p_.pos_filter.data_ptr<float>(), p_.pos_channel.data_ptr<float>(),
                     p_.encoding_table.data_ptr<float>(), static_cast<int>(p_.levels),
                     p_.weights[0].data_ptr<float>(), p_.biases[0].data_ptr<float>(), hidden_,
                     p_.num_filters, p_.num_channels, filter_blocks, filter_table_.data_ptr<float>(),
                     channel_table_.data_ptr<float>());
  }

  // out (n, act_ld) = relu(x @ W_iᵀ + b_i), bias and ReLU in cuBLASLt's epilogue. fp32/tf32: the
  // fp32 result is the same as adding after. bf16: the bias comes through the packed weight, the
  // epilogue's bias is zero.
  void linear_relu(int64_t i, const at::Tensor& x, at::Tensor& out) {
    const at::Tensor& bias = bf16_ ? zero_bias_ : p_.biases[i];
    at::_addmm_activation_out(out, bias, x, wc_[i].t(), 1, 1, /*use_gelu=*/false);
  }

  // Fills y_ (raw last-layer product, no bias) and, with keep, every hidden activation (act_[i] =
  // output of layer i) and the ffn encoding; without keep two activation buffers alternate.
  void forward_tile(const RowSource& src, int64_t n, bool keep) {
    auto act = [&](int64_t i) { return rows_of(act_[keep ? i : i % 2], n); };
    at::Tensor h = act(0);
    if (p_.encoding == kBasic) {
      const dim3 grid(grid_for(n, kThreads / 32));
      if (bf16_) {
        NERN_FAST_LAUNCH(first_layer_kernel<__nv_bfloat16>, grid, dim3(kThreads), 0, stream_, src,
                         filter_table_.data_ptr<float>(), channel_table_.data_ptr<float>(), n, hidden_,
                         act_ld_, device_ptr<__nv_bfloat16>(h));
      } else {
        NERN_FAST_LAUNCH(first_layer_kernel<float>, grid, dim3(kThreads), 0, stream_, src,
                         filter_table_.data_ptr<float>(), channel_table_.data_ptr<float>(), n, hidden_,
                         act_ld_, device_ptr<float>(h));
      }
    } else {
      const at::Tensor e = rows_of(enc_, n);
      launch_encode(src, n, e);
      linear_relu(0, e, h);
    }
    for (int64_t i = 1; i < last_; ++i) {
      at::Tensor next = act(i);
      linear_relu(i, h, next);
      h = next;
    }
    at::Tensor y = rows_of(y_, n);
    at::mm_out(y, h, wc_[last_].t());
  }

  // encodings of the tile's rows into e (n, enc_ld_ columns of storage)
  void launch_encode(const RowSource& src, int64_t n, const at::Tensor& e) {
    const dim3 grid(grid_for(n, kThreads / 32));
    const float* table = p_.encoding_table.data_ptr<float>();
    const int64_t ld = e.stride(0);
    if (bf16_) {
      NERN_FAST_LAUNCH(encode_kernel<__nv_bfloat16>, grid, dim3(kThreads), 0, stream_, src,
                       static_cast<int>(p_.encoding), p_.pos_layer.data_ptr<float>(),
                       p_.pos_filter.data_ptr<float>(), p_.pos_channel.data_ptr<float>(), table,
                       static_cast<int>(p_.levels), n, ld, device_ptr<__nv_bfloat16>(e));
    } else {
      NERN_FAST_LAUNCH(encode_kernel<float>, grid, dim3(kThreads), 0, stream_, src,
                       static_cast<int>(p_.encoding), p_.pos_layer.data_ptr<float>(),
                       p_.pos_filter.data_ptr<float>(), p_.pos_channel.data_ptr<float>(), table,
                       static_cast<int>(p_.levels), n, ld, device_ptr<float>(e));
    }
  }

  void launch_scatter(const RowSource& src, int64_t n, const at::Tensor& out) {
    const dim3 grid(grid_for(n, kThreads));
    const int k = static_cast<int>(p_.kernel_size);
    const float* bias = p_.biases[last_].data_ptr<float>();
    if (bf16_) {
      NERN_FAST_LAUNCH(crop_scatter_kernel<__nv_bfloat16>, grid, dim3(kThreads), 0, stream_, src,
                       device_ptr<__nv_bfloat16>(y_), bias, n, k, p_.subset(), out.data_ptr<float>());
    } else {
      NERN_FAST_LAUNCH(crop_scatter_kernel<float>, grid, dim3(kThreads), 0, stream_, src,
                       device_ptr<float>(y_), bias, n, k, p_.subset(), out.data_ptr<float>());
    }
  }

  void launch_crop_backward(const RowSource& src, int64_t n, const at::Tensor& grad, const at::Tensor& gy) {
    const dim3 grid(grid_for(n, kThreads));
    const int k = static_cast<int>(p_.kernel_size);
    const float* bias = p_.biases[last_].data_ptr<float>();
    if (bf16_) {
      NERN_FAST_LAUNCH(crop_backward_kernel<__nv_bfloat16>, grid, dim3(kThreads), 0, stream_, src,
                       device_ptr<__nv_bfloat16>(y_), bias, grad.data_ptr<float>(), n, k, gy.data_ptr<float>());
    } else {
      NERN_FAST_LAUNCH(crop_backward_kernel<float>, grid, dim3(kThreads), 0, stream_, src,
                       device_ptr<float>(y_), bias, grad.data_ptr<float>(), n, k, gy.data_ptr<float>());
    }
  }

  // acc (out, in) fp32 += g (n, out)ᵀ @ a (n, in); bf16: bf16 operands, fp32 accumulation
  void add_weight_grad(at::Tensor& acc, const at::Tensor& g, const at::Tensor& a) {
    if (!bf16_) acc.addmm_(g.t(), a);
    else add_bf16_product(acc, g.t(), a);
  }

  const DecodeProblem& p_;
  const bool bf16_;
  const at::ScalarType cdt_;
  const int64_t cbytes_;
  const int64_t last_;
  const int64_t hidden_, enc_width_;
  const int64_t act_ld_, enc_ld_;  // row strides of the activation and encoding buffers
  const at::Device device_;
  cudaStream_t stream_;
  int64_t tile_ = 0;
  at::Tensor meta_;
  std::vector<at::Tensor> wc_;
  at::Tensor zero_bias_;
  at::Tensor filter_table_, channel_table_;
  std::vector<at::Tensor> act_;
  at::Tensor enc_, y_;
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
  TORCH_CHECK(p.num_filters < (int64_t(1) << 31) && p.num_channels < (int64_t(1) << 31) &&
                  p.num_kernels < (int64_t(1) << 31),
              "nern_fast: too many kernels/filters/channels for the CUDA decoder (limit 2^31)");
  return p;
}

at::Tensor decode_forward_cuda(at::TensorList weights, at::TensorList biases, const at::Tensor& meta,
                               const at::Tensor& pos_layer, const at::Tensor& pos_filter,
                               const at::Tensor& pos_channel, const c10::optional<at::Tensor>& coord_rows,
                               const c10::optional<at::Tensor>& rows, const at::Tensor& encoding_table,
                               int64_t encoding, int64_t kernel_size, int64_t num_kernels,
                               int64_t num_weights, c10::string_view precision, int64_t workspace_bytes) {
  DecodeProblem p = cuda_problem(weights, biases, meta, pos_layer, pos_filter, pos_channel, coord_rows,
                                 rows, encoding_table, encoding, kernel_size, num_kernels, num_weights,
                                 precision);
  TORCH_CHECK(workspace_bytes >= 0, "nern_fast: workspace_bytes must be >= 0 (0: the default budget), got ",
              workspace_bytes);
  const c10::cuda::CUDAGuard device_guard(p.weights[0].device());
  const MatmulPrecisionGuard matmul_precision(p.precision == Precision::kTf32);
  return CudaDecoder(p, /*backward=*/false, workspace_bytes).forward();
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> decode_backward_cuda(
    const at::Tensor& grad, at::TensorList weights, at::TensorList biases, const at::Tensor& meta,
    const at::Tensor& pos_layer, const at::Tensor& pos_filter, const at::Tensor& pos_channel,
    const c10::optional<at::Tensor>& coord_rows, const c10::optional<at::Tensor>& rows,
    const at::Tensor& encoding_table, int64_t encoding, int64_t kernel_size, int64_t num_kernels,
    int64_t num_weights, c10::string_view precision, const c10::optional<at::Tensor>& saved) {
  DecodeProblem p = cuda_problem(weights, biases, meta, pos_layer, pos_filter, pos_channel, coord_rows,
                                 rows, encoding_table, encoding, kernel_size, num_kernels, num_weights,
                                 precision);
  check_grad_output(p, grad);
  TORCH_CHECK(!(saved.has_value() && saved->defined()), "nern_fast: the CUDA decoder recomputes "
              "activations in backward; pass saved=None (decode_forward_saving is CPU-only)");
  const c10::cuda::CUDAGuard device_guard(p.weights[0].device());
  const MatmulPrecisionGuard matmul_precision(p.precision == Precision::kTf32);
  return CudaDecoder(p, /*backward=*/true).backward(grad);
}

}  // namespace
}  // namespace nern_fast

TORCH_LIBRARY_IMPL(nern_fast_C, CUDA, m) {
  m.impl("decode_forward", &nern_fast::decode_forward_cuda);
  m.impl("decode_backward", &nern_fast::decode_backward_cuda);
}
