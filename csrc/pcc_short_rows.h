// PCC of one group whose rows are short (K features, K small: the last layers of a CNN, whose
// maps are 2x2). There a matrix product R = Vhat Vhat^T does K multiply-adds per entry of
// R but moves each entry through memory several times (written, reduced, turned into phi'(R),
// read again by D Vhat), and that traffic dominates. These loops visit each pair i < j once
// (R is symmetric), keep a row of R in L1, and fuse phi / phi' and D Vhat into the same pass.
#pragma once

#include "pcc_rows.h"

#include <type_traits>

namespace pccfast {

// Rows of at most this many features (2x2 maps) take the loops below; longer rows a BLAS
// product. Measured at M = 512, 128 groups, 1 thread: 2x faster than the products at K = 4,
// 3-5x slower at K = 16 (its three sweeps per pair then cost more than the products' traffic).
constexpr int64_t kShortRowFeatures = 4;

// vt (K, M) = v (M, K) transposed.
template <typename acc_t>
void transpose_rows(const acc_t* v, acc_t* vt, int64_t m, int64_t k) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t f = 0; f < k; ++f) vt[f * m + i] = v[i * k + f];
  }
}

// One row i of R against the columns [j0, j0 + n): vectorised over the columns, the K products
// of each entry summed in a register. K is a compile-time constant (with_features below picks
// it), so that the compiler unrolls the K loop and vectorises the column loop around it.

// sum_j phi(R[i, j0 + j]), in double.
template <int64_t k, typename acc_t>
PCCFAST_INLINE double short_row_phi_impl(const acc_t* vi, const acc_t* vt, int64_t m,
                                         int64_t j0, int64_t n, acc_t inv_k, bool square) {
  double total = 0.0;
  if (square) {
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {
      acc_t acc = 0;
      for (int64_t f = 0; f < k; ++f) acc += vi[f] * vt[f * m + j0 + j];
      acc *= inv_k;
      total += double(acc) * acc;
    }
  } else {
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {
      acc_t acc = 0;
      for (int64_t f = 0; f < k; ++f) acc += vi[f] * vt[f * m + j0 + j];
      total += std::abs(acc * inv_k);
    }
  }
  return total;
}

// d[j] = factor * phi'(R[i, j0 + j]).
template <int64_t k, typename acc_t>
PCCFAST_INLINE void short_row_derivative_impl(const acc_t* vi, const acc_t* vt, int64_t m,
                                              int64_t j0, int64_t n, acc_t inv_k, acc_t factor,
                                              bool square, acc_t* d) {
  const acc_t a = 2 * factor * inv_k;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    acc_t acc = 0;
    for (int64_t f = 0; f < k; ++f) acc += vi[f] * vt[f * m + j0 + j];
    d[j] = square ? a * acc : factor * acc_t((acc > 0) - (acc < 0));
  }
}

// g_i[f] = sum_j d[j] vt[f][j0 + j] (returned through gi) and gt[f][j0 + j] += d[j] vi[f].
template <int64_t k, typename acc_t>
PCCFAST_INLINE void short_row_scatter_impl(const acc_t* vi, const acc_t* vt, const acc_t* d,
                                           int64_t m, int64_t j0, int64_t n, acc_t* gt,
                                           acc_t* gi) {
  for (int64_t f = 0; f < k; ++f) {
    const acc_t* c = vt + f * m + j0;
    acc_t* g = gt + f * m + j0;
    const acc_t a = vi[f];
    acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < n; ++j) {
      dot += d[j] * c[j];
      g[j] += a * d[j];
    }
    gi[f] = dot;
  }
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

// The sweeps over all rows i < M - 1 of one group (each row against the columns after it),
// compiled per K and, for fp32, also for AVX2.
template <typename acc_t>
PCCFAST_INLINE double short_pairs_phi_impl(const acc_t* v, const acc_t* vt, int64_t m, int64_t k,
                                           acc_t inv_k, bool square) {
  return with_features(k, [&](auto features) {
    constexpr int64_t K = decltype(features)::value;
    double total = 0.0;
    for (int64_t i = 0; i + 1 < m; ++i) {
      total += short_row_phi_impl<K>(v + i * K, vt, m, i + 1, m - i - 1, inv_k, square);
    }
    return total;
  });
}

// gt (K, M) += the off-diagonal part of (D Vhat)^T, D = factor * phi'(R); r: M scratch values.
template <typename acc_t>
PCCFAST_INLINE void short_pairs_gradient_impl(const acc_t* v, const acc_t* vt, int64_t m,
                                              int64_t k, acc_t inv_k, acc_t factor, bool square,
                                              acc_t* r, acc_t* gt) {
  with_features(k, [&](auto features) {
    constexpr int64_t K = decltype(features)::value;
    acc_t gi[K];
    for (int64_t i = 0; i + 1 < m; ++i) {
      const int64_t n = m - i - 1;
      const acc_t* vi = v + i * K;
      short_row_derivative_impl<K>(vi, vt, m, i + 1, n, inv_k, factor, square, r);  // D[i, i+1:]
      short_row_scatter_impl<K>(vi, vt, r, m, i + 1, n, gt, gi);  // rows j > i: D_ji vhat_i
      for (int64_t f = 0; f < K; ++f) gt[f * m + i] += gi[f];     // row i: sum_j D_ij vhat_j
    }
  });
}

PCCFAST_SIMD_CLONES inline double short_pairs_phi(const float* v, const float* vt, int64_t m,
                                                  int64_t k, float inv_k, bool square) {
  return short_pairs_phi_impl(v, vt, m, k, inv_k, square);
}
inline double short_pairs_phi(const double* v, const double* vt, int64_t m, int64_t k,
                              double inv_k, bool square) {
  return short_pairs_phi_impl(v, vt, m, k, inv_k, square);
}
PCCFAST_SIMD_CLONES inline void short_pairs_gradient(const float* v, const float* vt, int64_t m,
                                                     int64_t k, float inv_k, float factor,
                                                     bool square, float* r, float* gt) {
  short_pairs_gradient_impl(v, vt, m, k, inv_k, factor, square, r, gt);
}
inline void short_pairs_gradient(const double* v, const double* vt, int64_t m, int64_t k,
                                 double inv_k, double factor, bool square, double* r,
                                 double* gt) {
  short_pairs_gradient_impl(v, vt, m, k, inv_k, factor, square, r, gt);
}

// sum over the pairs of phi(R) for one group: v (M, K) normalised rows, vt scratch of K*M
// values.
template <typename acc_t>
double short_rows_phi_sum(const acc_t* v, acc_t* vt, int64_t m, int64_t k,
                          bool square, bool include_diagonal) {
  transpose_rows(v, vt, m, k);
  const acc_t inv_k = static_cast<acc_t>(1.0 / double(k));
  double off_diagonal = 0.0, diagonal = 0.0;
  off_diagonal = short_pairs_phi(v, vt, m, k, inv_k, square);
  if (include_diagonal) {
    for (int64_t i = 0; i < m; ++i) {
      const double t = double(backward_sums(v + i * k, v + i * k, k).vv) / double(k);
      diagonal += square ? t * t : std::abs(t);
    }
  }
  return 2.0 * off_diagonal + diagonal;
}

// dvhat (M, K) = D Vhat for one group, D = factor * phi'(R), its diagonal masked unless
// `include_diagonal`. Scratch: vt and gt of K*M values, r of M.
template <typename acc_t>
void short_rows_gradient(const acc_t* v, acc_t* dvhat, acc_t* vt, acc_t* gt, acc_t* r, int64_t m,
                         int64_t k, double factor, bool square, bool include_diagonal) {
  transpose_rows(v, vt, m, k);
  std::fill(gt, gt + k * m, acc_t(0));
  const acc_t inv_k = static_cast<acc_t>(1.0 / double(k));
  const acc_t fac = static_cast<acc_t>(factor);
  short_pairs_gradient(v, vt, m, k, inv_k, fac, square, r, gt);
  for (int64_t i = 0; i < m; ++i) {
    const acc_t* vi = v + i * k;
    acc_t d_ii = 0;
    if (include_diagonal) {
      const acc_t r_ii = static_cast<acc_t>(backward_sums(vi, vi, k).vv * double(inv_k));
      d_ii = square ? 2 * fac * r_ii : fac * acc_t(r_ii > 0);
    }
    for (int64_t f = 0; f < k; ++f) dvhat[i * k + f] = gt[f * m + i] + d_ii * vi[f];
  }
}

}  // namespace pccfast
