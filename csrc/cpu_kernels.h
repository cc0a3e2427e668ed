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

// fp32/fp64 passes (the template is the portable version of both; fp64 always uses it)
template <bool Relu, typename T>
inline void bias_act(T* x, const T* bias, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = x + r * cols;
    for (int64_t j = 0; j < cols; ++j) {
      T v = row[j] + bias[j];
      if (Relu) v = v < T(0) ? T(0) : v;  // NaN stays NaN, like torch.relu
      row[j] = v;
    }
  }
}

template <typename T>
inline void add_relu(const T* a, const T* b, T* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const T v = a[j] + b[j];
    out[j] = v < T(0) ? T(0) : v;
  }
}

// threshold_backward: d passes where !(mask <= 0) (NaN passes). A select, not a branch: the
// compiler vectorizes it, and a ReLU mask is a coin flip per entry.
template <typename T>
inline void relu_mask(const T* mask, T* d, int64_t n) {
  for (int64_t j = 0; j < n; ++j) d[j] = mask[j] <= T(0) ? T(0) : d[j];
}

// v = relu_mask(mask, x); a += v; b += v (a, b, x distinct): the mask, then two sums, without storing v
template <typename T>
inline void masked_accumulate2(T* a, T* b, const T* x, const T* mask, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const T v = mask[j] <= T(0) ? T(0) : x[j];
    a[j] += v;
    b[j] += v;
  }
}

// the same with bf16 x and mask, fp32 sums: masked_bf16 then accumulate_bf16 twice
inline void masked_accumulate2_bf16(float* a, float* b, const BF16* x, const BF16* mask, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = static_cast<float>(mask[j]) <= 0.f ? 0.f : static_cast<float>(x[j]);
    a[j] += v;
    b[j] += v;
  }
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

template <bool Relu>
NERN_FAST_AVX512 inline void bias_act(float* x, const float* bias, int64_t rows, int64_t cols) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * cols;
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 m = tail(cols - j);
      __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, row + j), _mm512_maskz_loadu_ps(m, bias + j));
      if (Relu) v = _mm512_max_ps(zero, v);  // v < 0: +0; NaN and ±0: v (the second operand)
      _mm512_mask_storeu_ps(row + j, m, v);
    }
  }
}

NERN_FAST_AVX512 inline void add_relu(const float* a, const float* b, float* out, int64_t n) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail(n - j);
    const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, a + j), _mm512_maskz_loadu_ps(m, b + j));
    _mm512_mask_storeu_ps(out + j, m, _mm512_max_ps(zero, v));
  }
}

NERN_FAST_AVX512 inline __mmask16 kept(const float* mask, __mmask16 m) {  // !(mask <= 0)
  return _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, mask), _mm512_setzero_ps(), _CMP_NLE_UQ);
}

NERN_FAST_AVX512 inline void relu_mask(const float* mask, float* d, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail(n - j);
    _mm512_mask_storeu_ps(d + j, m, _mm512_maskz_loadu_ps(kept(mask + j, m), d + j));
  }
}

NERN_FAST_AVX512 inline void masked_accumulate2(float* a, float* b, const float* x, const float* mask,
                                                int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail(n - j);
    const __m512 v = _mm512_maskz_loadu_ps(kept(mask + j, m), x + j);
    _mm512_mask_storeu_ps(a + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, a + j), v));
    _mm512_mask_storeu_ps(b + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, b + j), v));
  }
}

NERN_FAST_AVX512 inline void masked_accumulate2_bf16(float* a, float* b, const BF16* x, const BF16* mask,
                                                     int64_t n) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail(n - j);
    const __mmask16 keep = _mm512_cmp_ps_mask(load_bf16(mask + j, m), zero, _CMP_NLE_UQ);
    const __m512 v = load_bf16(x + j, keep & m);
    _mm512_mask_storeu_ps(a + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, a + j), v));
    _mm512_mask_storeu_ps(b + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, b + j), v));
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
inline void masked_accumulate2_bf16(float* a, float* b, const BF16* x, const BF16* mask, int64_t n) {
  NERN_FAST_DISPATCH(masked_accumulate2_bf16, a, b, x, mask, n);
}

// fp32/fp64 passes: fp32 through the same run-time choice as the bf16 passes, fp64 portable.
template <bool Relu>
inline void bias_act(float* x, const float* bias, int64_t rows, int64_t cols) {
  NERN_FAST_DISPATCH(bias_act<Relu>, x, bias, rows, cols);
}
template <bool Relu>
inline void bias_act(double* x, const double* bias, int64_t rows, int64_t cols) {
  scalar::bias_act<Relu>(x, bias, rows, cols);
}
inline void add_relu(const float* a, const float* b, float* out, int64_t n) { NERN_FAST_DISPATCH(add_relu, a, b, out, n); }
inline void add_relu(const double* a, const double* b, double* out, int64_t n) { scalar::add_relu(a, b, out, n); }
inline void relu_mask(const float* mask, float* d, int64_t n) { NERN_FAST_DISPATCH(relu_mask, mask, d, n); }
inline void relu_mask(const double* mask, double* d, int64_t n) { scalar::relu_mask(mask, d, n); }
inline void masked_accumulate2(float* a, float* b, const float* x, const float* mask, int64_t n) {
  NERN_FAST_DISPATCH(masked_accumulate2, a, b, x, mask, n);
}
inline void masked_accumulate2(double* a, double* b, const double* x, const double* mask, int64_t n) {
  scalar::masked_accumulate2(a, b, x, mask, n);
}

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
