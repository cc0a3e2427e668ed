// NeRN's greedy nearest-neighbour chains (NERN_SPEC §6) as two CPU ops, for nern_fast.permutations.
//
// NeRN walks the chain in Python (NeRN/permutations/tsp.py: get_max_sim_order): start at row 0,
// repeatedly jump to the not-yet-visited row of highest similarity; np.argmax decides, so the first
// NaN wins when there is one, otherwise the first maximum (the lowest index). The chain is
// sequential, so it is walked here in plain C++ with one thread:
//
//  * point_chains(points (B, n, d) float32) -> orders (B, n) int64: one chain per point set, the
//    similarity being the dot product of the points as given (the caller normalises; a zero kernel
//    normalises to NaN, as in NeRN, and a row with a NaN is NeRN's NaN row). Each step takes the
//    dot products of the current point with every remaining one (no n×n matrix: n can be large),
//    over a coordinate-major copy of the remaining points that shrinks by swap-removal. Used for
//    crossfilter (B = 1, the kernels of a layer) and infilter (per filter its kernels; then the
//    filters, each a flattened row of its channel-reordered normalised kernels).
//  * matrix_chains(similarity (B, n, n) float32/float64) -> orders (B, n) int64: one chain per
//    precomputed similarity matrix (infilter's rule for 1×1 kernels, which is not a cosine).
//  * infilter_chains(kernels (C_out, C_in, d) or a conv weight (C_out, C_in, s, s), float32, d > 1,
//    C_in > 1) -> (filter_order (C_out), channel_orders (C_out, C_in)): NeRN's whole infilter
//    permutation of a layer in one call —
//    kernels normalised (a zero kernel to NaN), per filter its chain (up to 128 channels: the
//    C_in×C_in cosine matrices of four filters, their chains walked side by side; wider filters: a
//    walk that computes the cosines as it goes), then the filters (their normalised kernels in
//    their own channel order, flattened), their dot-product matrix and its chain. One call instead of seven torch ops
//    and two chain calls: on a 64×64 layer that is most of the time (many tiny ops).
//
// Dot products are summed over the coordinates in order, the same way for every candidate, so
// identical kernels tie exactly and the tie goes to the lowest index, as in NeRN.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

// On x86 the hot loops are compiled for the baseline ISA and for AVX2, chosen at load time when the
// CPU has it; both sum with separate multiplies and adds (no FMA): the same bits either way.
#if defined(__x86_64__) && defined(__GNUC__)
#define NERN_FAST_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define NERN_FAST_AVX2_CLONES
#endif

namespace nern_fast {
namespace {

constexpr int64_t kBlock = 64;  // slots per block of the arg-max search

typedef float Lanes8 __attribute__((vector_size(32)));  // 8 float lanes (GCC/Clang vectors)

// sims[j] = <q, point in slot j> for the first `active` slots (coordinates summed in order), and
// block_max[b] = the largest of block b (kBlock slots). D > 0 fixes the dimension at compile time.
template <int64_t D>
inline __attribute__((always_inline)) void similarities_fixed(const float* q, const float* coords, int64_t stride, int64_t d,
                        int64_t active, float* sims, float* block_max) {
  const int64_t dim = D > 0 ? D : d;
  float qk[D > 0 ? D : 1];  // the query in registers
  for (int64_t k = 0; k < D; ++k) qk[k] = q[k];
  for (int64_t start = 0, b = 0; start < active; start += kBlock, ++b) {
    const int64_t stop = std::min(start + kBlock, active);
    float m = -INFINITY;
    if (D > 0) {
#pragma omp simd reduction(max : m)
      for (int64_t j = start; j < stop; ++j) {
        float v = qk[0] * coords[j];
#pragma GCC unroll 32
        for (int64_t k = 1; k < D; ++k) v += qk[k] * coords[k * stride + j];
        sims[j] = v;
        m = v > m ? v : m;
      }
    } else {
      for (int64_t j = start; j < stop; ++j) sims[j] = q[0] * coords[j];
      for (int64_t k = 1; k < dim; ++k) {
        const float w = q[k];
        const float* ck = coords + k * stride;
        for (int64_t j = start; j < stop; ++j) sims[j] += w * ck[j];
      }
#pragma omp simd reduction(max : m)
      for (int64_t j = start; j < stop; ++j) m = sims[j] > m ? sims[j] : m;
    }
    block_max[b] = m;
  }
}

NERN_FAST_AVX2_CLONES
void similarities(const float* q, const float* coords, int64_t stride, int64_t d, int64_t active,
                  float* sims, float* block_max) {
  switch (d) {  // the kernel sizes NeRN represents: 3×3 (k=3), 1×1, 2×2, 5×5
    case 9: return similarities_fixed<9>(q, coords, stride, d, active, sims, block_max);
    case 1: return similarities_fixed<1>(q, coords, stride, d, active, sims, block_max);
    case 4: return similarities_fixed<4>(q, coords, stride, d, active, sims, block_max);
    case 25: return similarities_fixed<25>(q, coords, stride, d, active, sims, block_max);
    default: return similarities_fixed<0>(q, coords, stride, d, active, sims, block_max);
  }
}

// The chain of one point set x (n, d), written to order[0..n).
void walk_points(const float* x, int64_t n, int64_t d, int64_t* order) {
  if (n == 0) return;
  // A row with a NaN (a zero kernel) has NaN similarity to every row: np.argmax picks it first.
  std::vector<uint8_t> nan_row(n, 0), visited(n, 0);
  std::vector<int64_t> nan_rows;  // ascending
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t k = 0; k < d; ++k) {
      if (std::isnan(x[r * d + k])) {
        nan_row[r] = 1;
        nan_rows.push_back(r);
        break;
      }
    }
  }
  // The remaining finite rows, coordinate-major (coords[k * n + slot]), slot <-> row maps.
  std::vector<float> coords(static_cast<size_t>(d) * n);
  std::vector<int64_t> slot_row, row_slot(n, -1);
  slot_row.reserve(n);
  for (int64_t r = 0; r < n; ++r) {
    if (nan_row[r]) continue;
    const int64_t s = static_cast<int64_t>(slot_row.size());
    for (int64_t k = 0; k < d; ++k) coords[k * n + s] = x[r * d + k];
    row_slot[r] = s;
    slot_row.push_back(r);
  }
  int64_t active = static_cast<int64_t>(slot_row.size());
  auto remove = [&](int64_t row) {
    const int64_t s = row_slot[row];
    if (s < 0) return;
    const int64_t last = --active;
    if (s != last) {
      for (int64_t k = 0; k < d; ++k) coords[k * n + s] = coords[k * n + last];
      slot_row[s] = slot_row[last];
      row_slot[slot_row[s]] = s;
    }
    row_slot[row] = -1;
  };

  std::vector<float> sims(n), block_max((n + kBlock - 1) / kBlock);
  size_t nan_next = 0;   // first possibly unvisited entry of nan_rows
  int64_t lowest = 0;    // lowest possibly unvisited row
  int64_t current = 0;
  visited[0] = 1;
  remove(0);
  order[0] = 0;
  for (int64_t step = 1; step < n; ++step) {
    while (nan_next < nan_rows.size() && visited[nan_rows[nan_next]]) ++nan_next;
    int64_t next;
    if (nan_row[current]) {  // every similarity is NaN: the first remaining row
      while (visited[lowest]) ++lowest;
      next = lowest;
    } else if (nan_next < nan_rows.size()) {  // the first NaN among the remaining rows
      next = nan_rows[nan_next];
    } else {
      similarities(x + current * d, coords.data(), n, d, active, sims.data(), block_max.data());
      const int64_t blocks = (active + kBlock - 1) / kBlock;
      float best = -INFINITY;
      for (int64_t b = 0; b < blocks; ++b) best = std::max(best, block_max[b]);
      next = n;
      for (int64_t b = 0; b < blocks; ++b) {  // the lowest row of the maximum (slots are unordered)
        if (block_max[b] != best) continue;
        for (int64_t j = b * kBlock, stop = std::min(j + kBlock, active); j < stop; ++j) {
          if (sims[j] == best && slot_row[j] < next) next = slot_row[j];
        }
      }
      if (next == n) {  // nothing compared (rows with infinities: the caller's normalisation
        while (visited[lowest]) ++lowest;  // makes NaN rows of them): never index past the end
        next = lowest;
      }
    }
    visited[next] = 1;
    remove(next);
    order[step] = next;
    current = next;
  }
}

at::Tensor point_chains(const at::Tensor& points_in) {
  TORCH_CHECK(points_in.dim() == 3, "point_chains: expected points (B, n, d), got ",
              points_in.sizes());
  TORCH_CHECK(points_in.scalar_type() == at::kFloat, "point_chains: expected float32 points, got ",
              points_in.scalar_type());
  TORCH_CHECK(points_in.device().is_cpu(), "point_chains: expected CPU points");
  const at::Tensor points = points_in.contiguous();
  const int64_t b = points.size(0), n = points.size(1), d = points.size(2);
  at::Tensor result = at::empty({b, n}, points.options().dtype(at::kLong));
  const float* x = points.data_ptr<float>();
  int64_t* orders = result.data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i) walk_points(x + i * n * d, n, d, orders + i * n);
  return result;
}

template <typename T>
void walk_matrix_exact(const T* sim, int64_t n, int64_t* order, std::vector<int64_t>& remaining) {
  remaining.resize(n - 1);
  for (int64_t i = 1; i < n; ++i) remaining[i - 1] = i;  // ascending: first maximum = lowest
  int64_t current = 0;
  for (int64_t step = 1; step < n; ++step) {
    const T* row = sim + current * n;
    size_t pick = 0;
    T best = row[remaining[0]];
    if (!std::isnan(best)) {
      for (size_t i = 1; i < remaining.size(); ++i) {
        const T v = row[remaining[i]];
        if (std::isnan(v)) {  // np.argmax: the first NaN wins
          pick = i;
          break;
        }
        if (v > best) {
          best = v;
          pick = i;
        }
      }
    }
    current = remaining[pick];
    remaining.erase(remaining.begin() + pick);
    order[step] = current;
  }
}

// The first j of the largest row[j] + pen[j] (finite row values; pen 0 or -inf for a visited
// column, which is never the answer while one column is unvisited).
template <typename T>
inline __attribute__((always_inline)) int64_t first_max(const T* row, const T* pen, int64_t n) {
  T best = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : best)
  for (int64_t j = 0; j < n; ++j) {
    const T v = row[j] + pen[j];
    best = v > best ? v : best;
  }
  int64_t next = 0;
  while (row[next] + pen[next] != best) ++next;
  return next;
}

#if defined(__GNUC__) && !defined(__clang__)
// float, in one pass over 8 lanes: each lane keeps its first maximum (only a strictly larger value
// replaces it), then the lowest index among the lanes holding the overall maximum; the tail
// (indices above every lane's) replaces only on a strictly larger value. Same answer as above.
typedef int32_t LaneIndex8 __attribute__((vector_size(32)));

// Lane by lane, keep the first maximum: only a strictly larger value (and its index) replaces.
inline __attribute__((always_inline)) void keep_larger(const Lanes8& v, const LaneIndex8& index,
                                                       Lanes8& best, LaneIndex8& where) {
  const LaneIndex8 larger = v > best;
  best = larger ? v : best;
  where = larger ? index : where;
}

// The lowest index among the lanes holding the largest value, which goes to *top (n and -inf
// when every lane is -inf).
inline __attribute__((always_inline)) int64_t first_of_lanes(const Lanes8& best,
                                                             const LaneIndex8& where, int64_t n,
                                                             float* top) {
  float largest = -std::numeric_limits<float>::infinity();
  int64_t first = n;
  for (int u = 0; u < 8; ++u) {
    if (best[u] > largest || (best[u] == largest && where[u] < first)) {
      largest = best[u];
      first = where[u];
    }
  }
  *top = largest;
  return first;
}

// Lane by lane, the first maximum of row[j] + pen[j] over the whole groups of 8 in [0, n): two
// independent compare-select chains (alternate groups of 8), merged lane by lane (the larger value;
// on a tie the lower index). `where` starts at n. Returns where the whole groups end.
inline __attribute__((always_inline)) int64_t lane_first_maxima(const float* row, const float* pen,
                                                                int64_t n, Lanes8& best,
                                                                LaneIndex8& where) {
  const float lowest = -std::numeric_limits<float>::infinity();
  Lanes8 best_odd = Lanes8{} + lowest;
  LaneIndex8 where_odd = LaneIndex8{} + static_cast<int32_t>(n);
  best = best_odd;
  where = where_odd;
  LaneIndex8 index = {0, 1, 2, 3, 4, 5, 6, 7};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16, index += 16) {
    Lanes8 v, p, w, q;
    std::memcpy(&v, row + j, sizeof(v));
    std::memcpy(&p, pen + j, sizeof(p));
    std::memcpy(&w, row + j + 8, sizeof(w));
    std::memcpy(&q, pen + j + 8, sizeof(q));
    keep_larger(v + p, index, best, where);
    keep_larger(w + q, index + 8, best_odd, where_odd);
  }
  const LaneIndex8 take_odd = (best_odd > best) | ((best_odd == best) & (where_odd < where));
  best = take_odd ? best_odd : best;
  where = take_odd ? where_odd : where;
  if (j + 8 <= n) {
    Lanes8 v, p;
    std::memcpy(&v, row + j, sizeof(v));
    std::memcpy(&p, pen + j, sizeof(p));
    keep_larger(v + p, index, best, where);
    j += 8;
  }
  return j;
}

template <>
inline __attribute__((always_inline)) int64_t first_max<float>(const float* row, const float* pen,
                                                               int64_t n) {
  Lanes8 best;
  LaneIndex8 where;
  int64_t j = lane_first_maxima(row, pen, n, best, where);
  float top = -std::numeric_limits<float>::infinity();
  int64_t next = first_of_lanes(best, where, n, &top);
  for (; j < n; ++j) {  // the tail: indices above every lane's, so only a larger value replaces
    const float v = row[j] + pen[j];
    if (v > top) {
      top = v;
      next = j;
    }
  }
  return next;
}
#endif

// The chain of one n×n matrix. A matrix of finite values takes a vectorised scan of whole rows
// (visited columns pushed to -inf); one with NaN or infinities the exact np.argmax rules above.
// all_finite: the caller knows every entry is finite (skips the scan).
template <typename T>
inline __attribute__((always_inline)) void walk_matrix(const T* sim, int64_t n, int64_t* order,
                                                       std::vector<int64_t>& remaining,
                                                       std::vector<T>& penalty,
                                                       bool all_finite = false) {
  if (n == 0) return;
  order[0] = 0;
  int finite = 1;
  if (!all_finite) {
#pragma omp simd reduction(& : finite)
    for (int64_t i = 0; i < n * n; ++i) finite &= (sim[i] - sim[i] == T(0));  // false for inf, NaN
  }
  if (!finite) return walk_matrix_exact(sim, n, order, remaining);
  penalty.assign(n, T(0));
  penalty[0] = -std::numeric_limits<T>::infinity();
  int64_t current = 0;
  for (int64_t step = 1; step < n; ++step) {
    const int64_t next = first_max(sim + current * n, penalty.data(), n);
    penalty[next] = -std::numeric_limits<T>::infinity();
    order[step] = next;
    current = next;
  }
}

NERN_FAST_AVX2_CLONES
void walk_matrices(const float* sim, int64_t b, int64_t n, int64_t* orders) {
  std::vector<int64_t> remaining;
  std::vector<float> penalty;
  for (int64_t i = 0; i < b; ++i) walk_matrix(sim + i * n * n, n, orders + i * n, remaining, penalty);
}

NERN_FAST_AVX2_CLONES
void walk_matrices(const double* sim, int64_t b, int64_t n, int64_t* orders) {
  std::vector<int64_t> remaining;
  std::vector<double> penalty;
  for (int64_t i = 0; i < b; ++i) walk_matrix(sim + i * n * n, n, orders + i * n, remaining, penalty);
}

// sim (n, n) = x xᵀ for rows x (n, d): each entry summed over the coordinates in order, so the
// matrix is exactly symmetric and identical rows tie exactly. coords: scratch of n·d floats,
// block_max: of (n + kBlock - 1) / kBlock.
inline void gram_small(const float* x, int64_t n, int64_t d, float* coords, float* block_max,
                       float* sim) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t k = 0; k < d; ++k) coords[k * n + j] = x[j * d + k];  // coordinate-major
  for (int64_t i = 0; i < n; ++i) similarities(x + i * d, coords, n, d, n, sim + i * n, block_max);
}

// Dot products of one vector a with up to four vectors b[0..count) over `length` coordinates, in
// 8 lanes (lane u sums coordinates u, u+8, ... in order; the lanes are then added in order): the
// same bits for the same two vectors whichever is a or b and whichever slot b is in, so identical
// filters tie exactly and the matrix built from it is exactly symmetric.
inline __attribute__((always_inline)) void dots_to_four(const float* a, const float* const* b,
                                                        int count, int64_t length, float* out) {
  Lanes8 acc[4] = {};
  int64_t k = 0;
  for (; k + 8 <= length; k += 8) {
    Lanes8 va;
    std::memcpy(&va, a + k, sizeof(va));
    for (int i = 0; i < 4; ++i) {
      if (i >= count) break;
      Lanes8 vb;
      std::memcpy(&vb, b[i] + k, sizeof(vb));
      acc[i] += va * vb;
    }
  }
  for (int i = 0; i < count; ++i) {
    float lanes[8];
    std::memcpy(lanes, &acc[i], sizeof(lanes));
    for (int64_t u = 0; k + u < length; ++u) lanes[u] += a[k + u] * b[i][k + u];  // the tail
    float sum = 0.f;
    for (int u = 0; u < 8; ++u) sum += lanes[u];
    out[i] = sum;
  }
}

#if defined(__GNUC__) && !defined(__clang__)
// The chain of n finite unit vectors x (n, d) without their n×n matrix: each step computes the
// current vector's dot products with every column, 8 lanes at a time (coordinates summed in order:
// the same values as gram_small), and takes the first maximum among the unvisited ones (penalty 0,
// or -inf for visited and padding columns) in the same pass, as first_max<float> does. Scratch:
// coords (d·n8 floats) and penalty (n8), n8 = n rounded up to 8. walk_cosines returns false
// (nothing written) where it does not apply; the caller then builds the matrix.
template <int64_t D>
inline __attribute__((always_inline)) void walk_cosines_fixed(const float* x, int64_t n, int64_t d,
                                                              int64_t* order, float* coords,
                                                              float* penalty) {
  const int64_t dim = D > 0 ? D : d;
  const int64_t n8 = (n + 7) / 8 * 8;
  const float lowest = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < dim; ++k) {
    for (int64_t j = 0; j < n; ++j) coords[k * n8 + j] = x[j * dim + k];
    for (int64_t j = n; j < n8; ++j) coords[k * n8 + j] = 0.f;
  }
  for (int64_t j = 0; j < n8; ++j) penalty[j] = j < n ? 0.f : lowest;
  penalty[0] = lowest;
  order[0] = 0;
  int64_t current = 0;
  for (int64_t step = 1; step < n; ++step) {
    const float* q = x + current * dim;
    Lanes8 qk[D > 0 ? D : 1];
    if (D > 0)
      for (int64_t k = 0; k < D; ++k) qk[k] = Lanes8{} + q[k];
    Lanes8 best = Lanes8{} + lowest;
    LaneIndex8 where = LaneIndex8{} + static_cast<int32_t>(n);
    LaneIndex8 index = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int64_t j = 0; j < n8; j += 8, index += 8) {
      Lanes8 c, v, p;
      std::memcpy(&c, coords + j, sizeof(c));
      v = (D > 0 ? qk[0] : Lanes8{} + q[0]) * c;
      for (int64_t k = 1; k < dim; ++k) {
        std::memcpy(&c, coords + k * n8 + j, sizeof(c));
        v += (D > 0 ? qk[k] : Lanes8{} + q[k]) * c;
      }
      std::memcpy(&p, penalty + j, sizeof(p));
      keep_larger(v + p, index, best, where);
    }
    float top = lowest;
    const int64_t next = first_of_lanes(best, where, n, &top);
    penalty[next] = lowest;
    order[step] = next;
    current = next;
  }
}

inline __attribute__((always_inline)) bool walk_cosines(const float* x, int64_t n, int64_t d,
                                                        int64_t* order, float* coords,
                                                        float* penalty) {
  if (n < 1) return false;
  switch (d) {  // the kernel sizes NeRN represents: 3×3, 2×2, 5×5
    case 9: walk_cosines_fixed<9>(x, n, d, order, coords, penalty); return true;
    case 4: walk_cosines_fixed<4>(x, n, d, order, coords, penalty); return true;
    case 25: walk_cosines_fixed<25>(x, n, d, order, coords, penalty); return true;
    default: walk_cosines_fixed<0>(x, n, d, order, coords, penalty); return true;
  }
}
// Gram matrix of n finite unit vectors x (n, d) into sim (n rows of n8 = n rounded up to 8 floats;
// columns >= n hold 0): each entry summed over the coordinates in order — the values walk_cosines
// computes; products commute, so the matrix is exactly symmetric. Every row is computed whole
// (mirroring the upper triangle element by element was slower: 128×128 layer 1.65 vs 1.32–1.48 ms on
// one thread). coords: d·n8 floats.
template <int64_t D>
inline __attribute__((always_inline)) void gram_lanes_fixed(const float* x, int64_t n, int64_t d,
                                                            float* coords, float* sim) {
  const int64_t dim = D > 0 ? D : d;
  const int64_t n8 = (n + 7) / 8 * 8;
  for (int64_t k = 0; k < dim; ++k) {
    for (int64_t j = 0; j < n; ++j) coords[k * n8 + j] = x[j * dim + k];
    for (int64_t j = n; j < n8; ++j) coords[k * n8 + j] = 0.f;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* q = x + i * dim;
    Lanes8 qk[D > 0 ? D : 1];
    if (D > 0)
      for (int64_t k = 0; k < D; ++k) qk[k] = Lanes8{} + q[k];
    for (int64_t j = 0; j < n8; j += 8) {
      Lanes8 c, v;
      std::memcpy(&c, coords + j, sizeof(c));
      v = (D > 0 ? qk[0] : Lanes8{} + q[0]) * c;
      for (int64_t k = 1; k < dim; ++k) {
        std::memcpy(&c, coords + k * n8 + j, sizeof(c));
        v += (D > 0 ? qk[k] : Lanes8{} + q[k]) * c;
      }
      std::memcpy(sim + i * n8 + j, &v, sizeof(v));
    }
  }
}

inline __attribute__((always_inline)) void gram_lanes(const float* x, int64_t n, int64_t d,
                                                      float* coords, float* sim) {
  switch (d) {  // the kernel sizes NeRN represents: 3×3, 2×2, 5×5
    case 9: return gram_lanes_fixed<9>(x, n, d, coords, sim);
    case 4: return gram_lanes_fixed<4>(x, n, d, coords, sim);
    case 25: return gram_lanes_fixed<25>(x, n, d, coords, sim);
    default: return gram_lanes_fixed<0>(x, n, d, coords, sim);
  }
}

// The lowest index among the lanes holding the largest value (n when every lane is -inf: `where`
// starts at n), without branches: which lane wins is data-dependent, so a per-lane branch would
// mispredict at every step of a walk.
inline __attribute__((always_inline)) int64_t first_of_lanes_branchless(const Lanes8& best,
                                                                        const LaneIndex8& where,
                                                                        int64_t n) {
  const LaneIndex8 swap4 = {4, 5, 6, 7, 0, 1, 2, 3}, swap2 = {2, 3, 0, 1, 6, 7, 4, 5},
                   swap1 = {1, 0, 3, 2, 5, 4, 7, 6};
  Lanes8 m = best, t;
  t = __builtin_shuffle(m, swap4);
  m = t > m ? t : m;
  t = __builtin_shuffle(m, swap2);
  m = t > m ? t : m;
  t = __builtin_shuffle(m, swap1);
  m = t > m ? t : m;  // every lane: the maximum
  LaneIndex8 at = best == m ? where : LaneIndex8{} + std::numeric_limits<int32_t>::max(), u;
  u = __builtin_shuffle(at, swap4);
  at = u < at ? u : at;
  u = __builtin_shuffle(at, swap2);
  at = u < at ? u : at;
  u = __builtin_shuffle(at, swap1);
  at = u < at ? u : at;
  return std::min<int64_t>(at[0], n);
}

constexpr int kInterleaved = 4;  // chains walked side by side
constexpr int64_t kInterleavedMaxChannels = 128;  // their matrices: at most 4 × 64 KiB

// The chains of `count` (<= kInterleaved) finite n×n matrices (rows of n8 floats) walked side by
// side: each chain's steps are a latency-bound arg-max (compare-select over the row, the winner
// decides the next row), and independent chains overlap in the CPU's pipeline. Same answer as
// walk_matrix: the first maximum among the unvisited columns. penalties: kInterleaved·n8 floats.
inline __attribute__((always_inline)) void walk_interleaved(const float* const* sims, int count,
                                                            int64_t n, int64_t* const* orders,
                                                            float* penalties) {
  const int64_t n8 = (n + 7) / 8 * 8;
  const float lowest = -std::numeric_limits<float>::infinity();
  int64_t current[kInterleaved] = {0, 0, 0, 0};
  for (int c = 0; c < count; ++c) {
    float* pen = penalties + c * n8;
    for (int64_t j = 0; j < n8; ++j) pen[j] = j < n ? 0.f : lowest;
    pen[0] = lowest;
    orders[c][0] = 0;
  }
  for (int64_t step = 1; step < n; ++step) {
#pragma GCC unroll 4
    for (int c = 0; c < kInterleaved; ++c) {
      if (c >= count) break;
      const float* row = sims[c] + current[c] * n8;
      float* pen = penalties + c * n8;
      Lanes8 best;
      LaneIndex8 where;
      lane_first_maxima(row, pen, n8, best, where);  // n8: whole groups only
      const int64_t next = first_of_lanes_branchless(best, where, n);
      pen[next] = lowest;
      orders[c][step] = next;
      current[c] = next;
    }
  }
}
#define NERN_FAST_HAVE_INTERLEAVED_WALK 1
#else
inline bool walk_cosines(const float*, int64_t, int64_t, int64_t*, float*, float*) { return false; }
#endif

// Normalises the c_in kernels (d weights each) of one filter into `normed` (a zero kernel to
// NaN, as NeRN's 0/0); true when every value is finite (then every cosine is). The divisions run
// over the whole filter in one loop against a per-weight copy of the norms, which the compiler
// vectorises (the same quotients: 37.6 → 15.9 µs for a 64×64 layer's 64 filters, one EPYC core).
inline __attribute__((always_inline)) bool normalise_kernels(const float* x, int64_t c_in, int64_t d,
                                                             float* norms, float* normed) {
  for (int64_t c = 0; c < c_in; ++c) {
    float squares = 0.f;
    for (int64_t k = 0; k < d; ++k) squares += x[c * d + k] * x[c * d + k];
    // A kernel whose squares underflow to 0 (|w| below ~1e-23) counts as a zero kernel: NaN, not
    // the ±inf of x / 0 (the Python side's rule too, nern_fast.permutations._normalise_rows).
    const float norm = squares == 0.f ? std::numeric_limits<float>::quiet_NaN() : std::sqrt(squares);
    for (int64_t k = 0; k < d; ++k) norms[c * d + k] = norm;
  }
  int finite = 1;
  for (int64_t i = 0; i < c_in * d; ++i) {
    const float v = x[i] / norms[i];
    normed[i] = v;
    finite &= (v - v == 0.f);
  }
  return finite != 0;
}

// Filters [f0, f1) of walk_infilter: normalise the filter's kernels, their chain (a cosine walk
// without the matrix for finite ones, the matrix and np.argmax's rules otherwise), and its row of
// `filters` (its normalised kernels in chain order).
NERN_FAST_AVX2_CLONES
void channel_chains(const float* w, int64_t f0, int64_t f1, int64_t c_in, int64_t d,
                    int64_t* channel_orders, float* filters) {
  const int64_t length = c_in * d;
  const int64_t c_in8 = (c_in + 7) / 8 * 8;
  std::vector<float> normed(static_cast<size_t>(length)), norms(static_cast<size_t>(length));
  std::vector<float> coords(static_cast<size_t>(c_in8 * d));
  std::vector<float> sim(static_cast<size_t>(c_in) * c_in), penalty;
  std::vector<float> block_max((c_in + kBlock - 1) / kBlock);
  std::vector<int64_t> remaining;
#ifdef NERN_FAST_HAVE_INTERLEAVED_WALK
  if (c_in > kInterleavedMaxChannels) {
    // Large filters: the walk computes its dot products as it goes (no c_in × c_in matrices).
    std::vector<float> lane_penalty(static_cast<size_t>(c_in8));
    for (int64_t f = f0; f < f1; ++f) {
      const bool finite = normalise_kernels(w + f * length, c_in, d, norms.data(), normed.data());
      int64_t* order = channel_orders + f * c_in;
      if (finite) {
        walk_cosines(normed.data(), c_in, d, order, coords.data(), lane_penalty.data());
      } else {
        gram_small(normed.data(), c_in, d, coords.data(), block_max.data(), sim.data());
        walk_matrix(sim.data(), c_in, order, remaining, penalty, false);
      }
      float* row = filters + f * length;
      for (int64_t c = 0; c < c_in; ++c) std::copy_n(normed.data() + order[c] * d, d, row + c * d);
    }
    return;
  }
  // Small filters: the finite ones' Gram matrices, then kInterleaved chains walked side by side (a
  // walk is a chain of c_in dependent arg-max steps, latency-bound alone). Warm, 2-core EPYC: 64×64
  // layer 0.26 → 0.12–0.13 ms on 2 threads, 0.23 → 0.20–0.21 ms on one; 128×128 1.31 → 0.66–0.73
  // ms on 2. Above 128 channels the walk above is as fast or faster (256×256 on 2 threads: 6.1 vs
  // 6.9 ms; with the triangle mirrored, 512×512 took 210 ms against 88 on one thread).
  std::vector<float> grams(static_cast<size_t>(kInterleaved * c_in * c_in8));
  std::vector<float> penalties(static_cast<size_t>(kInterleaved * c_in8));
  for (int64_t g0 = f0; g0 < f1; g0 += kInterleaved) {
    const float* batch[kInterleaved];
    int64_t* batch_orders[kInterleaved];
    int count = 0;
    for (int64_t f = g0; f < std::min(g0 + kInterleaved, f1); ++f) {
      float* normed_f = filters + f * length;  // normalised in place of its row, reordered below
      const bool finite = normalise_kernels(w + f * length, c_in, d, norms.data(), normed_f);
      int64_t* order = channel_orders + f * c_in;
      if (finite) {
        float* gram = grams.data() + count * c_in * c_in8;
        gram_lanes(normed_f, c_in, d, coords.data(), gram);
        batch[count] = gram;
        batch_orders[count++] = order;
      } else {
        gram_small(normed_f, c_in, d, coords.data(), block_max.data(), sim.data());
        walk_matrix(sim.data(), c_in, order, remaining, penalty, false);
      }
    }
    walk_interleaved(batch, count, c_in, batch_orders, penalties.data());
    for (int64_t f = g0; f < std::min(g0 + kInterleaved, f1); ++f) {  // rows in chain order
      float* row = filters + f * length;
      std::copy_n(row, length, normed.data());
      const int64_t* order = channel_orders + f * c_in;
      for (int64_t c = 0; c < c_in; ++c) std::copy_n(normed.data() + order[c] * d, d, row + c * d);
    }
  }
#else
  for (int64_t f = f0; f < f1; ++f) {
    const bool finite = normalise_kernels(w + f * length, c_in, d, norms.data(), normed.data());
    int64_t* order = channel_orders + f * c_in;
    gram_small(normed.data(), c_in, d, coords.data(), block_max.data(), sim.data());
    walk_matrix(sim.data(), c_in, order, remaining, penalty, finite);
    float* row = filters + f * length;
    for (int64_t c = 0; c < c_in; ++c) std::copy_n(normed.data() + order[c] * d, d, row + c * d);
  }
#endif
}

// Row f of the upper triangle of the filters' dot-product matrix, four entries at a time, each
// mirrored below the diagonal.
inline __attribute__((always_inline)) void filter_similarity_row(const float* filters, int64_t f,
                                                                 int64_t c_out, int64_t length,
                                                                 float* sim) {
  const float* a = filters + f * length;
  for (int64_t g = f; g < c_out; g += 4) {
    const int count = static_cast<int>(std::min<int64_t>(4, c_out - g));
    const float* b[4];
    for (int i = 0; i < count; ++i) b[i] = filters + (g + i) * length;
    float dots[4];
    dots_to_four(a, b, count, length, dots);
    for (int i = 0; i < count; ++i) {
      sim[f * c_out + g + i] = dots[i];
      sim[(g + i) * c_out + f] = dots[i];
    }
  }
}

// Rows p and c_out-1-p of that triangle for p in [p0, p1): the same work for every p.
NERN_FAST_AVX2_CLONES
void filter_similarity_rows(const float* filters, int64_t p0, int64_t p1, int64_t c_out,
                            int64_t length, float* sim) {
  for (int64_t p = p0; p < p1; ++p) {
    filter_similarity_row(filters, p, c_out, length, sim);
    if (c_out - 1 - p != p) filter_similarity_row(filters, c_out - 1 - p, c_out, length, sim);
  }
}

void walk_infilter(const float* w, int64_t c_out, int64_t c_in, int64_t d, int64_t* filter_order,
                   int64_t* channel_orders) {
  const int64_t length = c_in * d;  // one filter, flattened
  // Per-filter work is independent: split over threads (a grain of 8 filters: ~30 µs each).
  // Every value is written by channel_chains: no zero fill.
  std::unique_ptr<float[]> filters(new float[static_cast<size_t>(c_out) * length]);
  at::parallel_for(0, c_out, 8, [&](int64_t f0, int64_t f1) {
    channel_chains(w, f0, f1, c_in, d, channel_orders, filters.get());
  });
  std::vector<float> filter_sim(static_cast<size_t>(c_out) * c_out);
  at::parallel_for(0, (c_out + 1) / 2, 4, [&](int64_t p0, int64_t p1) {
    filter_similarity_rows(filters.get(), p0, p1, c_out, length, filter_sim.data());
  });
  walk_matrices(filter_sim.data(), 1, c_out, filter_order);
}

std::tuple<at::Tensor, at::Tensor> infilter_chains(const at::Tensor& weight_in) {
  // A conv weight (C_out, C_in, s, s) is taken as it is (one call from Python: each torch call
  // there costs ~10 µs when it runs cold), or its kernels (C_out, C_in, d).
  TORCH_CHECK(weight_in.dim() == 3 || weight_in.dim() == 4,
              "infilter_chains: expected kernels (C_out, C_in, d) or a conv weight (C_out, C_in, s, s), got ",
              weight_in.sizes());
  const at::Tensor kernels_in =
      weight_in.dim() == 4 ? weight_in.reshape({weight_in.size(0), weight_in.size(1), -1}) : weight_in;
  TORCH_CHECK(kernels_in.scalar_type() == at::kFloat,
              "infilter_chains: expected float32 kernels, got ", kernels_in.scalar_type());
  TORCH_CHECK(kernels_in.device().is_cpu(), "infilter_chains: expected CPU kernels");
  TORCH_CHECK(kernels_in.size(1) > 1 && kernels_in.size(2) > 1,
              "infilter_chains: needs C_in > 1 and kernels of more than one weight (NeRN's "
              "length-1 rule is not a cosine: use matrix_chains), got ", kernels_in.sizes());
  const at::Tensor kernels = kernels_in.contiguous();
  const int64_t c_out = kernels.size(0), c_in = kernels.size(1), d = kernels.size(2);
  at::Tensor filter_order = at::empty({c_out}, kernels.options().dtype(at::kLong));
  at::Tensor channel_orders = at::empty({c_out, c_in}, kernels.options().dtype(at::kLong));
  if (c_out > 0)
    walk_infilter(kernels.data_ptr<float>(), c_out, c_in, d, filter_order.data_ptr<int64_t>(),
                  channel_orders.data_ptr<int64_t>());
  return {filter_order, channel_orders};
}

at::Tensor matrix_chains(const at::Tensor& similarity_in) {
  TORCH_CHECK(similarity_in.dim() == 3 && similarity_in.size(1) == similarity_in.size(2),
              "matrix_chains: expected similarities (B, n, n), got ", similarity_in.sizes());
  TORCH_CHECK(similarity_in.scalar_type() == at::kFloat || similarity_in.scalar_type() == at::kDouble,
              "matrix_chains: expected float32 or float64 similarities, got ",
              similarity_in.scalar_type());
  TORCH_CHECK(similarity_in.device().is_cpu(), "matrix_chains: expected CPU similarities");
  const at::Tensor similarity = similarity_in.contiguous();
  const int64_t b = similarity.size(0), n = similarity.size(1);
  at::Tensor result = at::empty({b, n}, similarity.options().dtype(at::kLong));
  int64_t* orders = result.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(similarity.scalar_type(), "matrix_chains", [&] {
    walk_matrices(similarity.data_ptr<scalar_t>(), b, n, orders);
  });
  return result;
}

}  // namespace
}  // namespace nern_fast

TORCH_LIBRARY_FRAGMENT(nern_fast_C, m) {
  m.def("point_chains(Tensor points) -> Tensor");
  m.def("matrix_chains(Tensor similarity) -> Tensor");
  m.def("infilter_chains(Tensor kernels) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nern_fast_C, CPU, m) {
  m.impl("point_chains", &nern_fast::point_chains);
  m.impl("matrix_chains", &nern_fast::matrix_chains);
  m.impl("infilter_chains", &nern_fast::infilter_chains);
}
