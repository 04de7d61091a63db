// PCC of one group whose rows are short (K features, K small: the last layers of a CNN, whose
// maps are 2x2). There a matrix product R = Vhat Vhat^T does K multiply-adds per entry of R
// but moves each entry through memory several times (written, reduced, turned into phi'(R),
// read again by D Vhat), and that traffic dominates. These loops keep R in registers: a block
// of RB rows against a vector of columns, its K features broadcast from the rows and loaded
// from the transposed rows (K, M), gives RB vectors of K R that are reduced to phi (forward)
// or turned into phi' and multiplied into D Vhat (backward) before the next columns; nothing
// of size M x M is ever stored.
#pragma once

#include "pcc_rows.h"

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace pccfast {

// Rows of at most this many features (2x2 maps) take the loops below; longer rows a BLAS
// product. Measured at M = 512, 128 groups, 1 thread: 2x faster than the products at K = 4,
// 3-5x slower at K = 16 (before the loops were register-blocked).
constexpr int64_t kShortRowFeatures = 4;

// One 32-byte vector of the compute dtype (an AVX2 register; two SSE registers in the default
// clone) and the integer vector its comparisons give.
template <typename acc_t>
struct ShortVec;
template <>
struct ShortVec<float> {
  typedef float vec __attribute__((vector_size(32)));
  typedef int32_t bits __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 8;
};
template <>
struct ShortVec<double> {
  typedef double vec __attribute__((vector_size(32)));
  typedef int64_t bits __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 4;
};

// Columns of the transposed rows are padded with zeros to this multiple (a whole vector for
// either dtype): a zero column gives R = 0, phi = phi' = 0, so the last vector needs no mask.
constexpr int64_t kShortRowPad = 8;

inline int64_t short_row_stride(int64_t m) {
  return (m + kShortRowPad - 1) / kShortRowPad * kShortRowPad;
}

// vt (K, stride) = v (M, K) transposed, the columns past M zero.
template <typename acc_t>
void transpose_rows(const acc_t* v, acc_t* vt, int64_t m, int64_t k) {
  const int64_t stride = short_row_stride(m);
  for (int64_t f = 0; f < k; ++f) {
    acc_t* col = vt + f * stride;
    for (int64_t i = 0; i < m; ++i) col[i] = v[i * k + f];
    for (int64_t i = m; i < stride; ++i) col[i] = 0;
  }
}

// The entry points below are compiled for x86-64-v3 (AVX2 with FMA: a multiply-add per
// feature) and for the default target, picked at load time.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__CUDACC__)
#define PCCFAST_FMA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PCCFAST_FMA_CLONES
#endif

// Lambdas inside the AVX2 clones must be inlined too, or they are compiled for the default
// target alone and the clone calls them.
#define PCCFAST_LAMBDA_INLINE __attribute__((always_inline))

template <typename vec, typename acc_t>
PCCFAST_INLINE void load_vec(vec& out, const acc_t* p) {
  std::memcpy(&out, p, sizeof(vec));
}

template <typename vec>
PCCFAST_INLINE double lane_sum(const vec& x) {
  double total = 0.0;
  for (size_t l = 0; l < sizeof(vec) / sizeof(x[0]); ++l) total += x[l];
  return total;
}

// sum over rows i in [i0, i0 + RB) and columns j > i of phi(K R[i, j]) (R unscaled).
template <int64_t K, int64_t RB, bool kSquare, typename acc_t>
PCCFAST_INLINE double short_block_phi(const acc_t* v, const acc_t* vt, int64_t m, int64_t i0) {
  using V = ShortVec<acc_t>;
  using vec = typename V::vec;
  using bits = typename V::bits;
  using lane_int = std::remove_reference_t<decltype(bits{}[0])>;
  constexpr int64_t W = V::lanes;
  const int64_t stride = short_row_stride(m);
  const bits magnitude = bits{} + std::numeric_limits<lane_int>::max();  // all but the sign
  bits lane{};
  for (int64_t l = 0; l < W; ++l) lane[l] = lane_int(l);
  acc_t row[RB][K];
  for (int64_t r = 0; r < RB; ++r)
    for (int64_t f = 0; f < K; ++f) row[r][f] = v[(i0 + r) * K + f];
  vec sum[RB];
  for (int64_t r = 0; r < RB; ++r) sum[r] = vec{};
  auto columns = [&](int64_t c, auto masked) PCCFAST_LAMBDA_INLINE {
    vec col[K];
#pragma GCC unroll 4
    for (int64_t f = 0; f < K; ++f) load_vec(col[f], vt + f * stride + c);
#pragma GCC unroll 8
    for (int64_t r = 0; r < RB; ++r) {
      vec a = col[0] * row[r][0];
#pragma GCC unroll 4
      for (int64_t f = 1; f < K; ++f) a += col[f] * row[r][f];
      if constexpr (decltype(masked)::value) {  // only the columns j > i
        a = (vec)((bits)a & (lane + lane_int(c) > lane_int(i0 + r)));
      }
      if constexpr (kSquare) {
        sum[r] += a * a;
      } else {
        sum[r] += (vec)((bits)a & magnitude);
      }
    }
  };
  int64_t c = (i0 + 1) / W * W;
  for (; c < m && c < i0 + RB; c += W) columns(c, std::true_type{});
  for (; c < m; c += W) columns(c, std::false_type{});
  double total = 0.0;
  for (int64_t r = 0; r < RB; ++r) total += lane_sum(sum[r]);
  return total;
}

// dv[i, :] = sum_j coef * phi'(K R[i, j]) vhat_j for rows i in [i0, i0 + RB) (j != i unless
// `diagonal`): whole rows of D, both orders of each pair, so that nothing is scattered.
template <int64_t K, int64_t RB, bool kSquare, typename acc_t>
PCCFAST_INLINE void short_block_gradient(const acc_t* v, const acc_t* vt, int64_t m, int64_t i0,
                                         acc_t coef, bool diagonal, acc_t* dv) {
  using V = ShortVec<acc_t>;
  using vec = typename V::vec;
  using bits = typename V::bits;
  using lane_int = std::remove_reference_t<decltype(bits{}[0])>;
  constexpr int64_t W = V::lanes;
  const int64_t stride = short_row_stride(m);
  const bits sign_bit = bits{} + std::numeric_limits<lane_int>::min();
  const bits one = (bits)(vec{} + acc_t(1));
  bits lane{};
  for (int64_t l = 0; l < W; ++l) lane[l] = lane_int(l);
  acc_t row[RB][K];
  for (int64_t r = 0; r < RB; ++r)
    for (int64_t f = 0; f < K; ++f) row[r][f] = v[(i0 + r) * K + f];
  vec dot[RB][K];
  for (int64_t r = 0; r < RB; ++r)
    for (int64_t f = 0; f < K; ++f) dot[r][f] = vec{};
  auto columns = [&](int64_t c, auto masked) PCCFAST_LAMBDA_INLINE {
    vec col[K];
#pragma GCC unroll 4
    for (int64_t f = 0; f < K; ++f) load_vec(col[f], vt + f * stride + c);
#pragma GCC unroll 8
    for (int64_t r = 0; r < RB; ++r) {
      vec a = col[0] * row[r][0];
#pragma GCC unroll 4
      for (int64_t f = 1; f < K; ++f) a += col[f] * row[r][f];
      vec d;
      if constexpr (kSquare) {
        d = a * coef;
      } else {  // coef * sign(a), 0 at 0
        d = (vec)((((bits)a & sign_bit) | one) & (a != 0)) * coef;
      }
      if constexpr (decltype(masked)::value) {  // not the diagonal j == i
        d = (vec)((bits)d & (lane + lane_int(c) != lane_int(i0 + r)));
      }
#pragma GCC unroll 4
      for (int64_t f = 0; f < K; ++f) dot[r][f] += d * col[f];
    }
  };
  // The vectors holding the block's diagonal entries are masked (when the diagonal is out).
  const int64_t lo = diagonal ? m : i0 / W * W, hi = diagonal ? m : i0 + RB;
  int64_t c = 0;
  for (; c < lo; c += W) columns(c, std::false_type{});
  for (; c < hi; c += W) columns(c, std::true_type{});
  for (; c < m; c += W) columns(c, std::false_type{});
  for (int64_t r = 0; r < RB; ++r)
    for (int64_t f = 0; f < K; ++f) dv[(i0 + r) * K + f] = static_cast<acc_t>(lane_sum(dot[r][f]));
}

// Calls body(std::integral_constant<int64_t, k>{}) for a runtime k in [1, kShortRowFeatures].
template <typename Body>
PCCFAST_INLINE decltype(auto) with_features(int64_t k, Body&& body) {
  switch (k) {
#define PCCFAST_FEATURES_CASE(K) \
  case K:                        \
    return body(std::integral_constant<int64_t, K>{});
    PCCFAST_FEATURES_CASE(1) PCCFAST_FEATURES_CASE(2) PCCFAST_FEATURES_CASE(3)
#undef PCCFAST_FEATURES_CASE
    default:
      TORCH_INTERNAL_ASSERT(k == kShortRowFeatures, "short rows have 1..4 features, got ", k);
      return body(std::integral_constant<int64_t, kShortRowFeatures>{});
  }
}

// Rows per register block: RB vectors of R plus, in backward, RB * K accumulators of D Vhat
// and K column vectors within the 16 AVX2 registers.
template <int64_t K>
constexpr int64_t short_block_rows() {
  return K <= 2 ? 4 : 2;
}

// The sweeps over all row blocks of one group, compiled per K and penalty and, for fp32,
// also for AVX2. Returns sum over i < j of phi(K R[i, j]).
template <typename acc_t>
PCCFAST_INLINE double short_pairs_phi_impl(const acc_t* v, const acc_t* vt, int64_t m, int64_t k,
                                           bool square) {
  return with_features(k, [&](auto features) PCCFAST_LAMBDA_INLINE {
    constexpr int64_t K = decltype(features)::value, RB = short_block_rows<K>();
    double total = 0.0;
    int64_t i0 = 0;
    if (square) {
      for (; i0 + RB <= m; i0 += RB) total += short_block_phi<K, RB, true>(v, vt, m, i0);
      for (; i0 < m; ++i0) total += short_block_phi<K, 1, true>(v, vt, m, i0);
    } else {
      for (; i0 + RB <= m; i0 += RB) total += short_block_phi<K, RB, false>(v, vt, m, i0);
      for (; i0 < m; ++i0) total += short_block_phi<K, 1, false>(v, vt, m, i0);
    }
    return total;
  });
}

// dv (M, K) = D Vhat with D = coef * phi'(K R) (its diagonal zero unless `diagonal`).
template <typename acc_t>
PCCFAST_INLINE void short_pairs_gradient_impl(const acc_t* v, const acc_t* vt, int64_t m,
                                              int64_t k, acc_t coef, bool square, bool diagonal,
                                              acc_t* dv) {
  with_features(k, [&](auto features) PCCFAST_LAMBDA_INLINE {
    constexpr int64_t K = decltype(features)::value, RB = short_block_rows<K>();
    int64_t i0 = 0;
    if (square) {
      for (; i0 + RB <= m; i0 += RB)
        short_block_gradient<K, RB, true>(v, vt, m, i0, coef, diagonal, dv);
      for (; i0 < m; ++i0) short_block_gradient<K, 1, true>(v, vt, m, i0, coef, diagonal, dv);
    } else {
      for (; i0 + RB <= m; i0 += RB)
        short_block_gradient<K, RB, false>(v, vt, m, i0, coef, diagonal, dv);
      for (; i0 < m; ++i0) short_block_gradient<K, 1, false>(v, vt, m, i0, coef, diagonal, dv);
    }
  });
}

PCCFAST_FMA_CLONES inline double short_pairs_phi(const float* v, const float* vt, int64_t m,
                                                 int64_t k, bool square) {
  return short_pairs_phi_impl(v, vt, m, k, square);
}
PCCFAST_FMA_CLONES inline double short_pairs_phi(const double* v, const double* vt, int64_t m,
                                                 int64_t k, bool square) {
  return short_pairs_phi_impl(v, vt, m, k, square);
}
PCCFAST_FMA_CLONES inline void short_pairs_gradient(const float* v, const float* vt, int64_t m,
                                                    int64_t k, float coef, bool square,
                                                    bool diagonal, float* dv) {
  short_pairs_gradient_impl(v, vt, m, k, coef, square, diagonal, dv);
}
PCCFAST_FMA_CLONES inline void short_pairs_gradient(const double* v, const double* vt,
                                                    int64_t m, int64_t k, double coef,
                                                    bool square, bool diagonal, double* dv) {
  short_pairs_gradient_impl(v, vt, m, k, coef, square, diagonal, dv);
}

// Values of scratch the loops below need for one group: the transposed rows, padded.
inline int64_t short_rows_scratch(int64_t m, int64_t k) { return k * short_row_stride(m); }

// sum over the pairs of phi(R) for one group: v (M, K) normalised rows, vt scratch of
// short_rows_scratch(M, K) values.
template <typename acc_t>
double short_rows_phi_sum(const acc_t* v, acc_t* vt, int64_t m, int64_t k,
                          bool square, bool include_diagonal) {
  transpose_rows(v, vt, m, k);
  const double inv_k = 1.0 / double(k);
  const double off_diagonal =
      short_pairs_phi(v, vt, m, k, square) * (square ? inv_k * inv_k : inv_k);
  double diagonal = 0.0;
  if (include_diagonal) {
    for (int64_t i = 0; i < m; ++i) {
      const double t = double(backward_sums(v + i * k, v + i * k, k).vv) / double(k);
      diagonal += square ? t * t : std::abs(t);
    }
  }
  return 2.0 * off_diagonal + diagonal;
}

// dvhat (M, K) = D Vhat for one group, D = factor * phi'(R), its diagonal masked unless
// `include_diagonal`. Scratch: vt of short_rows_scratch(M, K) values.
template <typename acc_t>
void short_rows_gradient(const acc_t* v, acc_t* dvhat, acc_t* vt, int64_t m, int64_t k,
                         double factor, bool square, bool include_diagonal) {
  transpose_rows(v, vt, m, k);
  // phi'(R) from K R: 2 R = (2 / K) (K R) for "square", sign(K R) for "abs".
  const acc_t coef = static_cast<acc_t>(square ? 2.0 * factor / double(k) : factor);
  short_pairs_gradient(v, vt, m, k, coef, square, include_diagonal, dvhat);
}

}  // namespace pccfast
