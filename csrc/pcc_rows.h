// Fused row loops of the CPU PCC kernels: one pass over a chunk of rows for the statistics and
// the normalisation (read straight from x through its strides, any float dtype), and one for the
// layer-norm backward (written straight into dx). Each row's K features fit in cache, so the
// repeated sweeps over a row cost about one pass over memory; the ATen equivalent is ~10 passes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <type_traits>
#include <vector>

namespace pccfast {

// Strides of the (group, row, feature) elements of an (N, C, H, W) tensor, for rows of channels
// (features = pixels) or rows of pixels (features = channels).
struct RowLayout {
  int64_t group = 0, row = 0, feature = 0;
};

// False when H and W cannot be addressed as one pixel index (then make the tensor contiguous).
inline bool row_layout(const at::Tensor& t, bool pixel, RowLayout* out) {
  int64_t pixel_stride;
  if (t.size(3) == 1) {
    pixel_stride = t.stride(2);
  } else if (t.size(2) == 1 || t.stride(2) == t.size(3) * t.stride(3)) {
    pixel_stride = t.stride(3);
  } else {
    return false;
  }
  out->group = t.stride(0);
  out->row = pixel ? pixel_stride : t.stride(1);
  out->feature = pixel ? t.stride(1) : pixel_stride;
  return true;
}

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline int64_t row_grain(int64_t features) { return std::max<int64_t>(1, 16384 / features); }

// ---- per-row vector loops (contiguous rows of the compute dtype) ----
// `omp simd` reductions let the compiler vectorise the double-accumulated sums; the fp32 entry
// points are also compiled for AVX2 and picked at load time (the default clone runs anywhere).

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__CUDACC__)
#define PCCFAST_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PCCFAST_SIMD_CLONES
#endif
#define PCCFAST_INLINE inline __attribute__((always_inline))

struct RowSums {
  double mean = 0.0, rstd = 0.0;
};

template <typename acc_t>
PCCFAST_INLINE RowSums row_statistics_impl(const acc_t* v, int64_t n, double eps) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += v[k];
  const acc_t mu = static_cast<acc_t>(sum / double(n));
  double squares = 0.0;
#pragma omp simd reduction(+ : squares)
  for (int64_t k = 0; k < n; ++k) {
    const double d = v[k] - mu;
    squares += d * d;
  }
  return {double(mu), 1.0 / std::sqrt(squares / double(n) + eps)};
}

template <typename acc_t>
PCCFAST_INLINE void normalize_impl(acc_t* v, int64_t n, acc_t mu, acc_t rs) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) v[k] = (v[k] - mu) * rs;
}

// The four row sums of the layer-norm backward: sum d, sum v, <d, v>, <v, v>.
struct BackwardSums {
  double d = 0.0, v = 0.0, dv = 0.0, vv = 0.0;
};

template <typename acc_t>
PCCFAST_INLINE BackwardSums backward_sums_impl(const acc_t* d, const acc_t* v, int64_t n) {
  double sd = 0.0, sv = 0.0, sdv = 0.0, svv = 0.0;
#pragma omp simd reduction(+ : sd, sv, sdv, svv)
  for (int64_t k = 0; k < n; ++k) {
    sd += d[k];
    sv += v[k];
    sdv += double(d[k]) * v[k];
    svv += double(v[k]) * v[k];
  }
  return {sd, sv, sdv, svv};
}

// out[k] = a * d[k] + b * v[k] + c   (the whole backward of one row, once its sums are known)
template <typename acc_t>
PCCFAST_INLINE void backward_apply_impl(const acc_t* d, const acc_t* v, acc_t* out, int64_t n,
                                        acc_t a, acc_t b, acc_t c) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = a * d[k] + b * v[k] + c;
}

PCCFAST_SIMD_CLONES inline RowSums row_statistics(const float* v, int64_t n, double eps) {
  return row_statistics_impl(v, n, eps);
}
inline RowSums row_statistics(const double* v, int64_t n, double eps) {
  return row_statistics_impl(v, n, eps);
}
PCCFAST_SIMD_CLONES inline void normalize_row(float* v, int64_t n, float mu, float rs) {
  normalize_impl(v, n, mu, rs);
}
inline void normalize_row(double* v, int64_t n, double mu, double rs) {
  normalize_impl(v, n, mu, rs);
}
PCCFAST_SIMD_CLONES inline BackwardSums backward_sums(const float* d, const float* v, int64_t n) {
  return backward_sums_impl(d, v, n);
}
inline BackwardSums backward_sums(const double* d, const double* v, int64_t n) {
  return backward_sums_impl(d, v, n);
}
PCCFAST_SIMD_CLONES inline void backward_apply(const float* d, const float* v, float* out,
                                               int64_t n, float a, float b, float c) {
  backward_apply_impl(d, v, out, n, a, b, c);
}
inline void backward_apply(const double* d, const double* v, double* out, int64_t n, double a,
                           double b, double c) {
  backward_apply_impl(d, v, out, n, a, b, c);
}

// ---- raw-row loops (pcc_cpu.cpp's raw rows: vhat = (x - mu) rstd formed on the fly) ----

template <typename acc_t>
PCCFAST_INLINE double row_sum_impl(const acc_t* v, int64_t n) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += v[k];
  return sum;
}

// v += c (the rank-one part of the raw rows' dx)
template <typename acc_t>
PCCFAST_INLINE void add_to_row_impl(acc_t* v, int64_t n, acc_t c) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) v[k] += c;
}

PCCFAST_SIMD_CLONES inline double row_sum(const float* v, int64_t n) {
  return row_sum_impl(v, n);
}
inline double row_sum(const double* v, int64_t n) { return row_sum_impl(v, n); }
PCCFAST_SIMD_CLONES inline void add_to_row(float* v, int64_t n, float c) {
  add_to_row_impl(v, n, c);
}
inline void add_to_row(double* v, int64_t n, double c) { add_to_row_impl(v, n, c); }

template <typename acc_t>
PCCFAST_INLINE double phi_row_sum_impl(const acc_t* r, int64_t n, acc_t scale, bool square) {
  double total = 0.0;
  if (square) {
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t t = r[j] * scale;
      total += double(t) * t;
    }
  } else {
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) total += std::abs(r[j] * scale);
  }
  return total;
}

// r[j] <- factor * phi'(r[j] * scale): 2 t for "square", sign(t) for "abs" (0 at 0).
template <typename acc_t>
PCCFAST_INLINE void phi_derivative_row_impl(acc_t* r, int64_t n, acc_t scale, acc_t factor,
                                            bool square) {
  if (square) {
    const acc_t a = 2 * factor * scale;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) r[j] = a * r[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) r[j] = factor * acc_t((r[j] > 0) - (r[j] < 0));
  }
}

PCCFAST_SIMD_CLONES inline double phi_row_sum(const float* r, int64_t n, float scale, bool square) {
  return phi_row_sum_impl(r, n, scale, square);
}
inline double phi_row_sum(const double* r, int64_t n, double scale, bool square) {
  return phi_row_sum_impl(r, n, scale, square);
}
PCCFAST_SIMD_CLONES inline void phi_derivative_row(float* r, int64_t n, float scale, float factor,
                                                   bool square) {
  phi_derivative_row_impl(r, n, scale, factor, square);
}
inline void phi_derivative_row(double* r, int64_t n, double scale, double factor, bool square) {
  phi_derivative_row_impl(r, n, scale, factor, square);
}

// ---- chunk loops over matrices (g, M, M) of raw products Vhat Vhat^T, R = products / K ----

// sum over all entries (without the diagonal unless `include_diagonal`) of phi(R), in double.
inline double phi_sum_of_products(const at::Tensor& products, double inv_k, bool square,
                                  bool include_diagonal) {
  const int64_t m = products.size(1), rows = products.size(0) * m;
  return AT_DISPATCH_FLOATING_TYPES(products.scalar_type(), "pcc_phi_sum", [&] {
    const scalar_t* base = products.const_data_ptr<scalar_t>();
    const scalar_t scale = static_cast<scalar_t>(inv_k);
    return at::parallel_reduce(
        0, rows, row_grain(m), 0.0,
        [&](int64_t begin, int64_t end, double partial) {
          for (int64_t row = begin; row < end; ++row) {
            const scalar_t* r = base + row * m;
            partial += phi_row_sum(r, m, scale, square);
            if (!include_diagonal) {
              const double t = double(r[row % m] * scale);
              partial -= square ? t * t : std::abs(t);
            }
          }
          return partial;
        },
        std::plus<double>());
  });
}

// products <- factor * phi'(products / K), the diagonal zeroed unless `include_diagonal`.
inline void phi_derivative_of_products(at::Tensor& products, double inv_k, double factor,
                                       bool square, bool include_diagonal) {
  const int64_t m = products.size(1), rows = products.size(0) * m;
  AT_DISPATCH_FLOATING_TYPES(products.scalar_type(), "pcc_phi_grad", [&] {
    scalar_t* base = products.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(m), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        scalar_t* r = base + row * m;
        phi_derivative_row(r, m, static_cast<scalar_t>(inv_k), static_cast<scalar_t>(factor),
                           square);
        if (!include_diagonal) r[row % m] = 0;
      }
    });
  });
}

// ---- loops over rows ----

// Rows of at most this many features (2x2 to 4x8 maps) use the row loops inlined: a call
// through the SIMD clones' dispatch per row cost more than the row's arithmetic (128 channels
// of 4x4 maps, batch 128, 1 thread: forward + backward 5.0 -> 4.1 ms; 8x8 maps even at 64).
constexpr int64_t kInlineRowFeatures = 32;

// Rows [begin, end) of the groups that start at `base` (row r is row r % rows of group
// r / rows): vhat = (v - mean) * rstd, written to out_all + r * features. With `compute_stats`,
// mean and rstd are computed first (biased variance, rstd = 1/sqrt(var + eps)); otherwise read.
template <typename scalar_t, typename acc_t>
void normalize_row_range(const scalar_t* base, const RowLayout& layout, int64_t rows,
                         int64_t features, int64_t begin, int64_t end, double eps,
                         bool compute_stats, acc_t* out_all, acc_t* mean_all, acc_t* rstd_all) {
  const int64_t stride = layout.feature;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* row = base + (r / rows) * layout.group + (r % rows) * layout.row;
    acc_t* out = out_all + r * features;
    if (stride == 1) {  // the common NCHW channel row: a vectorised conversion
      for (int64_t k = 0; k < features; ++k) out[k] = static_cast<acc_t>(row[k]);
    } else {
      for (int64_t k = 0; k < features; ++k) out[k] = static_cast<acc_t>(row[k * stride]);
    }
    if (features <= kInlineRowFeatures) {  // short rows: inlined, no call per row
      if (compute_stats) {
        const RowSums stats = row_statistics_impl(out, features, eps);
        mean_all[r] = static_cast<acc_t>(stats.mean);
        rstd_all[r] = static_cast<acc_t>(stats.rstd);
      }
      normalize_impl(out, features, mean_all[r], rstd_all[r]);
      continue;
    }
    if (compute_stats) {
      const RowSums stats = row_statistics(out, features, eps);
      mean_all[r] = static_cast<acc_t>(stats.mean);
      rstd_all[r] = static_cast<acc_t>(stats.rstd);
    }
    normalize_row(out, features, mean_all[r], rstd_all[r]);
  }
}

// dx rows [begin, end) (indexed as in normalize_row_range) = rstd * (d - mean(d) - vhat *
// mean(d * vhat)) with d = scale * (dvhat - c_i vhat), c_i = |vhat_i|^2 when
// `subtract_diagonal` (else 0). `staging` holds `features` values when dx's rows are not
// contiguous rows of the compute dtype.
template <typename scalar_t, typename acc_t>
void row_backward_range(const acc_t* d_all, const acc_t* v_all, const acc_t* rstd_all,
                        double scale, bool subtract_diagonal, scalar_t* base,
                        const RowLayout& layout, int64_t rows, int64_t features, int64_t begin,
                        int64_t end, acc_t* staging) {
  const int64_t stride = layout.feature;
  for (int64_t r = begin; r < end; ++r) {
    const acc_t* d = d_all + r * features;
    const acc_t* v = v_all + r * features;
    const BackwardSums sums = features <= kInlineRowFeatures ? backward_sums_impl(d, v, features)
                                                             : backward_sums(d, v, features);
    const double n = double(features);
    const double diagonal = subtract_diagonal ? sums.vv : 0.0;
    // d' = scale (d - diagonal v): its mean and its mean product with v
    const double mean_d = scale * (sums.d - diagonal * sums.v) / n;
    const double mean_dv = scale * (sums.dv - diagonal * sums.vv) / n;
    const double rs = rstd_all[r];
    scalar_t* out = base + (r / rows) * layout.group + (r % rows) * layout.row;
    acc_t* target = staging ? staging : reinterpret_cast<acc_t*>(out);
    const acc_t a = static_cast<acc_t>(rs * scale);
    const acc_t b = static_cast<acc_t>(-rs * (scale * diagonal + mean_dv));
    const acc_t c = static_cast<acc_t>(-rs * mean_d);
    if (features <= kInlineRowFeatures) {
      backward_apply_impl(d, v, target, features, a, b, c);
    } else {
      backward_apply(d, v, target, features, a, b, c);
    }
    if (staging) {
      for (int64_t k = 0; k < features; ++k) out[k * stride] = static_cast<scalar_t>(staging[k]);
    }
  }
}

// Whether row_backward_range writes dx of type scalar_t with this layout directly.
template <typename scalar_t, typename acc_t>
bool writes_directly(const RowLayout& layout) {
  return std::is_same_v<scalar_t, acc_t> && layout.feature == 1;
}

// vhat (count, M, K) = (v - mean) * rstd for the groups [g0, g0 + count) of src. With
// `compute_stats`, mean and rstd (count * M values) are computed first; otherwise they are read.
inline void normalize_rows(const at::Tensor& src, const RowLayout& layout, int64_t g0,
                           int64_t count, int64_t rows, int64_t features, double eps,
                           bool compute_stats, at::Tensor& vhat, at::Tensor& mean,
                           at::Tensor& rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "pcc_rows", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* base = src.const_data_ptr<scalar_t>() + g0 * layout.group;
    acc_t* out_all = vhat.data_ptr<acc_t>();
    acc_t* mean_all = mean.data_ptr<acc_t>();
    acc_t* rstd_all = rstd.data_ptr<acc_t>();
    at::parallel_for(0, count * rows, row_grain(features), [&](int64_t begin, int64_t end) {
      normalize_row_range(base, layout, rows, features, begin, end, eps, compute_stats, out_all,
                          mean_all, rstd_all);
    });
  });
}

// dx rows of the groups [g0, g0 + count), see row_backward_range.
inline void row_backward(const at::Tensor& dvhat, const at::Tensor& vhat, const at::Tensor& rstd,
                         double scale, bool subtract_diagonal, at::Tensor& dx,
                         const RowLayout& layout, int64_t g0, int64_t count, int64_t rows,
                         int64_t features) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "pcc_row_bwd", [&] {
    using acc_t = acc_type_t<scalar_t>;
    scalar_t* base = dx.data_ptr<scalar_t>() + g0 * layout.group;
    const acc_t* d_all = dvhat.const_data_ptr<acc_t>();
    const acc_t* v_all = vhat.const_data_ptr<acc_t>();
    const acc_t* rstd_all = rstd.const_data_ptr<acc_t>();
    const bool direct = writes_directly<scalar_t, acc_t>(layout);
    at::parallel_for(0, count * rows, row_grain(features), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> staging(direct ? 0 : features);
      row_backward_range(d_all, v_all, rstd_all, scale, subtract_diagonal, base, layout, rows,
                         features, begin, end, direct ? nullptr : staging.data());
    });
  });
}

}  // namespace pccfast
