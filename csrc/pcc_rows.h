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
#include <type_traits>

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

// vhat (count, M, K) = (v - mean) * rstd for the groups [g0, g0 + count) of src. With
// `compute_stats`, mean and rstd (count * M values) are computed first (biased variance,
// rstd = 1/sqrt(var + eps)); otherwise they are read.
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
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = base + (r / rows) * layout.group + (r % rows) * layout.row;
        acc_t* out = out_all + r * features;
        for (int64_t k = 0; k < features; ++k) out[k] = static_cast<acc_t>(row[k * layout.feature]);
        double mu, rs;
        if (compute_stats) {
          double sum = 0.0;
          for (int64_t k = 0; k < features; ++k) sum += out[k];
          mu = sum / double(features);
          double squares = 0.0;
          for (int64_t k = 0; k < features; ++k) {
            const double d = out[k] - mu;
            squares += d * d;
          }
          rs = 1.0 / std::sqrt(squares / double(features) + eps);
          mean_all[r] = static_cast<acc_t>(mu);
          rstd_all[r] = static_cast<acc_t>(rs);
        }
        mu = mean_all[r];
        rs = rstd_all[r];
        for (int64_t k = 0; k < features; ++k) out[k] = static_cast<acc_t>((out[k] - mu) * rs);
      }
    });
  });
}

// dx rows of the groups [g0, g0 + count) = rstd * (d - mean(d) - vhat * mean(d * vhat)) with
// d = scale * (dvhat - c_i vhat), c_i = |vhat_i|^2 when `subtract_diagonal` (else 0).
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
    at::parallel_for(0, count * rows, row_grain(features), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t* d = d_all + r * features;
        const acc_t* v = v_all + r * features;
        double diagonal = 0.0;
        if (subtract_diagonal) {
          for (int64_t k = 0; k < features; ++k) diagonal += double(v[k]) * v[k];
        }
        double sum_d = 0.0, sum_dv = 0.0;
        for (int64_t k = 0; k < features; ++k) {
          const double dk = scale * (d[k] - diagonal * v[k]);
          sum_d += dk;
          sum_dv += dk * v[k];
        }
        const double mean_d = sum_d / double(features), mean_dv = sum_dv / double(features);
        const double rs = rstd_all[r];
        scalar_t* out = base + (r / rows) * layout.group + (r % rows) * layout.row;
        for (int64_t k = 0; k < features; ++k) {
          const double dk = scale * (d[k] - diagonal * v[k]);
          out[k * layout.feature] = static_cast<scalar_t>(rs * (dk - mean_d - v[k] * mean_dv));
        }
      }
    });
  });
}

}  // namespace pccfast
