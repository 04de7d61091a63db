// PCC of one group whose rows are short (K features, K small: the late layers of a CNN, whose
// maps are 2x2 or 4x4). There a matrix product R = Vhat Vhat^T does K multiply-adds per entry of
// R but moves each entry through memory several times (written, reduced, turned into phi'(R),
// read again by D Vhat), and that traffic dominates. These loops visit each pair i < j once
// (R is symmetric), keep a row of R in L1, and fuse phi / phi' and D Vhat into the same pass.
#pragma once

#include "pcc_rows.h"

namespace pccfast {

// Rows of at most this many features take the loops below; longer rows a BLAS product.
constexpr int64_t kShortRowFeatures = 16;

// vt (K, M) = v (M, K) transposed.
template <typename acc_t>
void transpose_rows(const acc_t* v, acc_t* vt, int64_t m, int64_t k) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t f = 0; f < k; ++f) vt[f * m + i] = v[i * k + f];
  }
}

// One row i of R against the columns [j0, j0 + n): vectorised over the columns, the K products
// of each entry summed in a register.

// sum_j phi(R[i, j0 + j]), in double.
template <typename acc_t>
PCCFAST_INLINE double short_row_phi_impl(const acc_t* vi, const acc_t* vt, int64_t m, int64_t k,
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
template <typename acc_t>
PCCFAST_INLINE void short_row_derivative_impl(const acc_t* vi, const acc_t* vt, int64_t m,
                                              int64_t k, int64_t j0, int64_t n, acc_t inv_k,
                                              acc_t factor, bool square, acc_t* d) {
  const acc_t a = 2 * factor * inv_k;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    acc_t acc = 0;
    for (int64_t f = 0; f < k; ++f) acc += vi[f] * vt[f * m + j0 + j];
    d[j] = square ? a * acc : factor * acc_t((acc > 0) - (acc < 0));
  }
}

// g_i[f] = sum_j d[j] vt[f][j0 + j] (returned through gi) and gt[f][j0 + j] += d[j] vi[f].
template <typename acc_t>
PCCFAST_INLINE void short_row_scatter_impl(const acc_t* vi, const acc_t* vt, const acc_t* d,
                                           int64_t m, int64_t k, int64_t j0, int64_t n,
                                           acc_t* gt, acc_t* gi) {
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

PCCFAST_SIMD_CLONES inline double short_row_phi(const float* vi, const float* vt, int64_t m,
                                                int64_t k, int64_t j0, int64_t n, float inv_k,
                                                bool square) {
  return short_row_phi_impl(vi, vt, m, k, j0, n, inv_k, square);
}
inline double short_row_phi(const double* vi, const double* vt, int64_t m, int64_t k, int64_t j0,
                            int64_t n, double inv_k, bool square) {
  return short_row_phi_impl(vi, vt, m, k, j0, n, inv_k, square);
}
PCCFAST_SIMD_CLONES inline void short_row_derivative(const float* vi, const float* vt, int64_t m,
                                                     int64_t k, int64_t j0, int64_t n,
                                                     float inv_k, float factor, bool square,
                                                     float* d) {
  short_row_derivative_impl(vi, vt, m, k, j0, n, inv_k, factor, square, d);
}
inline void short_row_derivative(const double* vi, const double* vt, int64_t m, int64_t k,
                                 int64_t j0, int64_t n, double inv_k, double factor, bool square,
                                 double* d) {
  short_row_derivative_impl(vi, vt, m, k, j0, n, inv_k, factor, square, d);
}
PCCFAST_SIMD_CLONES inline void short_row_scatter(const float* vi, const float* vt,
                                                  const float* d, int64_t m, int64_t k,
                                                  int64_t j0, int64_t n, float* gt, float* gi) {
  short_row_scatter_impl(vi, vt, d, m, k, j0, n, gt, gi);
}
inline void short_row_scatter(const double* vi, const double* vt, const double* d, int64_t m,
                              int64_t k, int64_t j0, int64_t n, double* gt, double* gi) {
  short_row_scatter_impl(vi, vt, d, m, k, j0, n, gt, gi);
}

// sum over the pairs of phi(R) for one group: v (M, K) normalised rows, vt scratch of K*M
// values.
template <typename acc_t>
double short_rows_phi_sum(const acc_t* v, acc_t* vt, int64_t m, int64_t k,
                          bool square, bool include_diagonal) {
  transpose_rows(v, vt, m, k);
  const acc_t inv_k = static_cast<acc_t>(1.0 / double(k));
  double off_diagonal = 0.0, diagonal = 0.0;
  for (int64_t i = 0; i + 1 < m; ++i) {
    off_diagonal += short_row_phi(v + i * k, vt, m, k, i + 1, m - i - 1, inv_k, square);
  }
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
  acc_t gi[kShortRowFeatures];
  for (int64_t i = 0; i + 1 < m; ++i) {
    const int64_t n = m - i - 1;
    const acc_t* vi = v + i * k;
    short_row_derivative(vi, vt, m, k, i + 1, n, inv_k, fac, square, r);  // r = D[i, i+1:]
    short_row_scatter(vi, vt, r, m, k, i + 1, n, gt, gi);  // rows j > i get D_ji vhat_i
    for (int64_t f = 0; f < k; ++f) gt[f * m + i] += gi[f];  // row i: sum_j D_ij vhat_j
  }
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
