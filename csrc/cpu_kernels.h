// The CPU decode's elementwise passes (bias, ReLU, masks, bf16 conversions) over tile buffers.
//
// The extension is compiled for the baseline x86-64 ISA, so each pass has an AVX-512 (+BF16)
// version selected at run time when the CPU has it, and a portable scalar version. Both round
// fp32 -> bf16 to nearest even, as c10::BFloat16 and torch's .to(torch.bfloat16) do.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define NERN_FAST_X86 1
#endif

namespace nern_fast::cpu {

using BF16 = c10::BFloat16;

namespace scalar {

// ReLU and its mask with torch's NaN semantics: relu(NaN) = NaN (a masked NaN would hide a
// diverged predictor), and the backward passes the gradient wherever !(x <= 0) (threshold_backward).
inline float relu(float v) { return v < 0.f ? 0.f : v; }

inline void bias_relu_to_bf16(const BF16* acc, const float* bias, BF16* out, int64_t rows,
                              int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j)
      out[r * cols + j] = BF16(relu(static_cast<float>(acc[r * cols + j]) + bias[j]));
}

inline void bias_to_float(const BF16* acc, const float* bias, float* out, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) out[r * cols + j] = static_cast<float>(acc[r * cols + j]) + bias[j];
}

inline void add_relu_to_bf16(const float* a, const float* b, BF16* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = BF16(relu(a[j] + b[j]));
}

inline void masked_bf16(const BF16* x, const BF16* mask, BF16* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(mask[j]) <= 0.f ? BF16(0.f) : x[j];
}

inline void accumulate_bf16(float* acc, const BF16* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<float>(x[j]);
}

inline void to_bf16(const float* src, BF16* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = BF16(src[j]);
}

}  // namespace scalar

#ifdef NERN_FAST_X86
namespace avx512 {

#define NERN_FAST_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

NERN_FAST_AVX512 inline __mmask16 tail(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}
NERN_FAST_AVX512 inline __m512 load_bf16(const BF16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
NERN_FAST_AVX512 inline void store_bf16(BF16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

NERN_FAST_AVX512 inline void bias_relu_to_bf16(const BF16* acc, const float* bias, BF16* out,
                                               int64_t rows, int64_t cols) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 m = tail(cols - j);
      __m512 v = _mm512_add_ps(load_bf16(acc + r * cols + j, m), _mm512_maskz_loadu_ps(m, bias + j));
      store_bf16(out + r * cols + j, _mm512_max_ps(zero, v), m);  // NaN in v: v (second operand)
    }
  }
}

NERN_FAST_AVX512 inline void bias_to_float(const BF16* acc, const float* bias, float* out,
                                           int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 m = tail(cols - j);
      const __m512 v = _mm512_add_ps(load_bf16(acc + r * cols + j, m), _mm512_maskz_loadu_ps(m, bias + j));
      _mm512_mask_storeu_ps(out + r * cols + j, m, v);
    }
  }
}

NERN_FAST_AVX512 inline void add_relu_to_bf16(const float* a, const float* b, BF16* out, int64_t n) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail(n - j);
    const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, a + j), _mm512_maskz_loadu_ps(m, b + j));
    store_bf16(out + j, _mm512_max_ps(zero, v), m);
  }
}

NERN_FAST_AVX512 inline void masked_bf16(const BF16* x, const BF16* mask, BF16* out, int64_t n) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail(n - j);
    const __mmask16 keep = _mm512_cmp_ps_mask(load_bf16(mask + j, m), zero, _CMP_NLE_UQ);  // !(x <= 0)
    // x's bits where kept, +0 elsewhere: the same values, without a round trip through fp32
    _mm256_mask_storeu_epi16(out + j, m, _mm256_maskz_loadu_epi16(keep & m, x + j));
  }
}

NERN_FAST_AVX512 inline void accumulate_bf16(float* acc, const BF16* x, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail(n - j);
    _mm512_mask_storeu_ps(acc + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + j), load_bf16(x + j, m)));
  }
}

NERN_FAST_AVX512 inline void to_bf16(const float* src, BF16* dst, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail(n - j);
    store_bf16(dst + j, _mm512_maskz_loadu_ps(m, src + j), m);
  }
}

#undef NERN_FAST_AVX512
}  // namespace avx512

// NERN_FAST_CPU_ISA=scalar forces the portable passes (tests compare both on one machine).
inline bool has_avx512_bf16() {
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bf16");
  static const bool forced_scalar = [] {
    const char* isa = std::getenv("NERN_FAST_CPU_ISA");
    return isa != nullptr && std::string(isa) == "scalar";
  }();
  return cpu && !forced_scalar;
}
#define NERN_FAST_DISPATCH(fn, ...) \
  (has_avx512_bf16() ? avx512::fn(__VA_ARGS__) : scalar::fn(__VA_ARGS__))
#else
#define NERN_FAST_DISPATCH(fn, ...) scalar::fn(__VA_ARGS__)
#endif

inline void bias_relu_to_bf16(const BF16* acc, const float* bias, BF16* out, int64_t rows, int64_t cols) {
  NERN_FAST_DISPATCH(bias_relu_to_bf16, acc, bias, out, rows, cols);
}
inline void bias_to_float(const BF16* acc, const float* bias, float* out, int64_t rows, int64_t cols) {
  NERN_FAST_DISPATCH(bias_to_float, acc, bias, out, rows, cols);
}
inline void add_relu_to_bf16(const float* a, const float* b, BF16* out, int64_t n) {
  NERN_FAST_DISPATCH(add_relu_to_bf16, a, b, out, n);
}
inline void masked_bf16(const BF16* x, const BF16* mask, BF16* out, int64_t n) {
  NERN_FAST_DISPATCH(masked_bf16, x, mask, out, n);
}
inline void accumulate_bf16(float* acc, const BF16* x, int64_t n) {
  NERN_FAST_DISPATCH(accumulate_bf16, acc, x, n);
}
inline void to_bf16(const float* src, BF16* dst, int64_t n) { NERN_FAST_DISPATCH(to_bf16, src, dst, n); }

// acc (cols) += the column sums of g (rows, cols), bf16 values summed in fp32: blocks of 64 rows,
// then the blocks, then one add (error ~(64 + rows/64)·ε, not rows·ε as a running sum would have;
// ATen's sum over a bf16 dim 0 with an fp32 result took 6x its fp32 time here). `scratch`: 2·cols
// floats of the caller's (no allocation per call).
inline void add_column_sums_bf16(const BF16* g, int64_t rows, int64_t cols, float* acc, float* scratch) {
  constexpr int64_t kBlock = 64;
  float* block = scratch;
  float* total = scratch + cols;
  std::fill(total, total + cols, 0.f);
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    std::fill(block, block + cols, 0.f);
    for (int64_t r = r0; r < std::min(rows, r0 + kBlock); ++r) accumulate_bf16(block, g + r * cols, cols);
    for (int64_t j = 0; j < cols; ++j) total[j] += block[j];
  }
  for (int64_t j = 0; j < cols; ++j) acc[j] += total[j];
}

#undef NERN_FAST_DISPATCH

}  // namespace nern_fast::cpu
