// nern_fast._C: fused NeRN decode (forward and backward) for CPU and CUDA.
//
// One problem description (DecodeProblem) is built and checked at the op boundary; the device
// implementations (decode_cpu.cpp, decode_cuda.cu) only read it. The maths is NERN_SPEC §3-5 and
// the semantics are those of nern_fast/reference.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/TensorBody.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>
#include <vector>

namespace nern_fast {

// Column order of LayoutTensors.meta (nern_fast/layout.py).
enum MetaColumn : int {
  kKernelOffset = 0,
  kWeightOffset = 1,
  kCOut = 2,
  kCIn = 3,
  kSize = 4,
  kCrop = 5,
  kFilterOffset = 6,
  kChannelOffset = 7,
  kMetaColumns = 8,
};

enum CropMode : int { kCropCenter = 0, kCropAverage = 1, kCropMax = 2 };
enum EncodingKind : int { kBasic = 0, kFfn = 1 };
enum class Precision { kFp32, kTf32, kBf16 };

// Everything one decode call needs, checked and made contiguous.
struct DecodeProblem {
  std::vector<at::Tensor> weights;  // [0] (H, 6·levels), [1..nb-2] (H, H), [nb-1] (k², H)
  std::vector<at::Tensor> biases;
  at::Tensor meta;                  // int32 (L, 8) on the CPU (host-side copy of the layout)
  at::Tensor pos_layer;             // (L,)  float32, on the weights' device
  at::Tensor pos_filter;            // (F,)  concatenated per layer
  at::Tensor pos_channel;           // (C,)
  at::Tensor coord_rows;            // int64 (num_kernels,) or undefined (no permutation)
  at::Tensor rows;                  // int64 (M,) subset, or undefined (full decode)
  at::Tensor encoding_table;        // basic: frequencies (levels,); ffn: B (3·levels, 3)
  int64_t encoding = kBasic;
  int64_t kernel_size = 3;
  int64_t num_kernels = 0;
  int64_t num_weights = 0;
  Precision precision = Precision::kFp32;
  // CPU bf16 mode without bf16 matrix instructions (precision "bf16_fp32_gemm"): the same bf16
  // operands and activations, multiplied by fp32 GEMMs (see CpuDecoder::mm_bf16).
  bool bf16_fp32_gemm = false;

  int64_t hidden = 0;
  int64_t num_blocks = 0;
  int64_t levels = 0;
  int64_t num_layers = 0;
  int64_t num_filters = 0;   // F = Σ C_out
  int64_t num_channels = 0;  // C = Σ C_in

  bool subset() const { return rows.defined(); }
  // Rows of work: every kernel (full decode) or every requested index (subset).
  int64_t num_rows() const { return subset() ? rows.size(0) : num_kernels; }
  int64_t k2() const { return kernel_size * kernel_size; }
  at::Tensor output_like() const;  // an uninitialised output of the right shape
};

DecodeProblem make_problem(at::TensorList weights, at::TensorList biases, const at::Tensor& meta,
                           const at::Tensor& pos_layer, const at::Tensor& pos_filter,
                           const at::Tensor& pos_channel,
                           const c10::optional<at::Tensor>& coord_rows,
                           const c10::optional<at::Tensor>& rows,
                           const at::Tensor& encoding_table, int64_t encoding,
                           int64_t kernel_size, int64_t num_kernels, int64_t num_weights,
                           const std::string& precision);

// Checks the incoming gradient of a decode output (shape, dtype, device, contiguity).
void check_grad_output(const DecodeProblem& p, const at::Tensor& grad);

// decode_forward_saving's row count: 0 <= save_rows <= rows of work, and a model with hidden layers
// after the first (num_blocks >= 3) — with two blocks there is nothing to keep.
void check_save_rows(const DecodeProblem& p, int64_t save_rows);

// decode_backward's `saved`: (num_blocks-2, R, H), R <= rows of work, `dtype`, the parameters'
// device, contiguous (what decode_forward_saving returned for the same arguments).
void check_saved(const DecodeProblem& p, const at::Tensor& saved, at::ScalarType dtype);

// Per-index encodings (the basic encoding's 2·levels blocks), computed with the same ATen
// operations as nern_fast.encoding.EncodingSpec.encode_index so the values match the reference.
at::Tensor encode_index(const at::Tensor& positions, const at::Tensor& frequencies);

// The three blocks of W1 acting on the layer, filter and channel encodings (views, (H, 2·levels)).
std::vector<at::Tensor> first_layer_blocks(const DecodeProblem& p);

// Layer index of every filter / channel of the concatenated per-layer lists (int64, CPU).
at::Tensor filter_layers(const DecodeProblem& p);

// Crop windows (NERN_SPEC §2): centre crop start, pool window.
inline int center_lo(int k, int s) { return (k - s) / 2; }
inline int pool_window(int k, int s) { return k - s + 1; }

}  // namespace nern_fast
