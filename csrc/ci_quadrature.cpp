#include "ci_quadrature.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

namespace pccfast {

at::Tensor small_side_gram(const at::Tensor& a) {
  return a.size(1) <= a.size(2) ? at::bmm(a, a.transpose(1, 2)) : at::bmm(a.transpose(1, 2), a);
}

int64_t ci_chunk(int64_t channels, int64_t pixels) {
  const int64_t m = std::min(channels, pixels);
  const int64_t per_image = (2 * channels + m) * 256 + channels * (m + pixels);
  return std::max<int64_t>(1, (int64_t(8) << 20) / std::max<int64_t>(per_image, 1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spectral_weights(const at::Tensor& a,
                                                                const at::Tensor& eigenvalues,
                                                                const at::Tensor& eigenvectors) {
  const int64_t c = a.size(1), p = a.size(2), m = std::min(c, p);
  const double tolerance = double(m) * std::numeric_limits<double>::epsilon();
  const at::Tensor largest = eigenvalues.amax(-1, /*keepdim=*/true).clamp_min(0.0);
  const at::Tensor kept = eigenvalues > largest * tolerance;  // (B, m)
  const at::Tensor lam = at::where(kept, eigenvalues, at::zeros_like(eigenvalues));
  const at::Tensor kept_columns = kept.unsqueeze(1).to(at::kDouble);  // (B, 1, m)
  if (c <= p) {
    const at::Tensor weights = eigenvectors.square();
    // The deflated columns summed directly keep a small null weight exact (no 1 - sum).
    const at::Tensor null = (weights * (1.0 - kept_columns)).sum(-1);
    return {lam, weights * kept_columns, null};
  }
  const at::Tensor safe = at::where(kept, eigenvalues, at::ones_like(eigenvalues));
  const at::Tensor weights =
      at::bmm(a, eigenvectors).square_().div_(safe.unsqueeze(1)).mul_(kept_columns);
  const at::Tensor null = (1.0 - weights.sum(-1)).clamp_min(0.0);
  return {lam, weights, null};
}

namespace {

const double kRatio = std::exp(-kQuadratureStep);  // node-to-node factor of exp(-|x|)
const double kGeometric = kRatio / (1.0 - kRatio);  // sum_{j>=1} ratio^j
const int64_t kExtensionNodes = int64_t(std::ceil(kLowerExtension / kQuadratureStep));

// The per-image node grid: x_lo, x_hi (B), x (B, Q), node counts (B), images with a spectrum (B).
struct NodeGrid {
  at::Tensor x_lo, x_hi, x, count, any_kept;
};

// The elementwise rest of the quadrature (everything after the two matrix products) in one pass
// per (image, channel): the ATen version below makes ~15 passes over (B, C, Q)-sized tensors,
// which dominate when m is small (P < C). Same formulas, same order of terms.
at::Tensor quadrature_tail_cpu(const NodeGrid& grid, const at::Tensor& lam,
                               const at::Tensor& weights, const at::Tensor& null,
                               const at::Tensor& h_weights, const at::Tensor& numerator) {
  const int64_t b = weights.size(0), c = weights.size(1), m = weights.size(2);
  const int64_t nodes = grid.x.size(1);
  const at::Tensor lam_c = lam.contiguous(), w_c = weights.contiguous(), null_c = null.contiguous();
  const at::Tensor h_c = h_weights.contiguous(), n_c = numerator.contiguous();
  const at::Tensor x_c = grid.x.contiguous(), count_c = grid.count.contiguous();
  const at::Tensor lo_c = grid.x_lo.contiguous(), hi_c = grid.x_hi.contiguous();
  const at::Tensor kept_c = grid.any_kept.contiguous();
  at::Tensor out = at::empty({b, c}, weights.options());
  const double* lam_p = lam_c.const_data_ptr<double>();
  const double* w_p = w_c.const_data_ptr<double>();
  const double* null_p = null_c.const_data_ptr<double>();
  const double* h_p = h_c.const_data_ptr<double>();
  const double* n_p = n_c.const_data_ptr<double>();
  const double* x_p = x_c.const_data_ptr<double>();
  const double* count_p = count_c.const_data_ptr<double>();
  const double* lo_p = lo_c.const_data_ptr<double>();
  const double* hi_p = hi_c.const_data_ptr<double>();
  const bool* kept_p = kept_c.const_data_ptr<bool>();
  double* out_p = out.data_ptr<double>();
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> t(nodes), ex(nodes), t_ext(kExtensionNodes), ex_ext(kExtensionNodes);
    for (int64_t i = begin; i < end; ++i) {
      if (!kept_p[i]) {
        std::fill(out_p + i * c, out_p + (i + 1) * c, 0.0);
        continue;
      }
      const int64_t used = static_cast<int64_t>(count_p[i]);
      for (int64_t q = 0; q < used; ++q) {
        t[q] = std::exp(2.0 * x_p[i * nodes + q]);
        ex[q] = std::exp(x_p[i * nodes + q]);
      }
      for (int64_t j = 0; j < kExtensionNodes; ++j) {
        const double xj = lo_p[i] - kQuadratureStep * double(j + 1);
        t_ext[j] = std::exp(2.0 * xj);
        ex_ext[j] = std::exp(xj);
      }
      const double upper_factor = std::exp(-hi_p[i]) * kGeometric;
      for (int64_t ch = 0; ch < c; ++ch) {
        const double* w = w_p + (i * c + ch) * m;
        const double* lam_i = lam_p + i * m;
        double gram_diagonal = 0.0, n0 = 0.0;
        for (int64_t k = 0; k < m; ++k) {
          if (lam_i[k] > 0) {
            gram_diagonal += w[k] * lam_i[k];
            n0 += w[k] / lam_i[k];
          }
        }
        const double r = null_p[i * c + ch];
        const double* h = h_p + (i * c + ch) * nodes;
        const double* num = n_p + (i * c + ch) * nodes;
        double body = 0.0;
        for (int64_t q = 0; q < used; ++q) body += num[q] / (h[q] + r / t[q]) * ex[q];
        double lower = 0.0;
        for (int64_t j = 0; j < kExtensionNodes; ++j) {
          const double scaled = n0 * t_ext[j];
          lower += scaled / (scaled + r) * ex_ext[j];
        }
        if (r == 0) lower += ex_ext[kExtensionNodes - 1] * kGeometric;
        const double ci = (body + gram_diagonal * upper_factor + lower) * (2.0 / M_PI * kQuadratureStep);
        out_p[i * c + ch] = std::max(ci, 0.0);
      }
    }
  });
  return out;
}

}  // namespace

at::Tensor ci_quadrature(const at::Tensor& lam, const at::Tensor& weights, const at::Tensor& null,
                         bool fused_cpu_tail) {
  const auto options = lam.options();
  const at::Tensor kept = lam > 0;
  const at::Tensor any_kept = kept.any(-1);
  const at::Tensor lam_max = at::where(any_kept, lam.amax(-1), at::ones_like(lam.select(1, 0)));
  at::Tensor lam_min =
      at::where(kept, lam, at::full_like(lam, std::numeric_limits<double>::infinity())).amin(-1);
  lam_min = at::where(any_kept, lam_min, lam_max);
  const at::Tensor x_lo = 0.5 * at::log(lam_min) - kQuadratureMargin;
  // A fixed step and per-image node counts (the batch padded to its longest, padding masked), so
  // an image's score does not depend on the other images of its batch.
  const at::Tensor count =
      at::ceil((0.5 * at::log(lam_max) + kQuadratureMargin - x_lo) / kQuadratureStep) + 1.0;
  const int64_t nodes = static_cast<int64_t>(count.max().item<double>());
  const at::Tensor q = at::arange(nodes, options);
  const at::Tensor x = x_lo.unsqueeze(1) + kQuadratureStep * q;
  const at::Tensor x_hi = x_lo + kQuadratureStep * (count - 1.0);
  const at::Tensor t = at::exp(2.0 * x);  // (B, Q)

  // Nodes near the spectrum: N and h for all channels by two matrix products.
  const at::Tensor resolvent = (lam.unsqueeze(2) + t.unsqueeze(1)).reciprocal_();  // (B, m, Q)
  const at::Tensor h_weights = at::bmm(weights, resolvent);                        // h - r/t
  const at::Tensor numerator = at::bmm(weights * lam.unsqueeze(1), resolvent.square());
  const NodeGrid grid{x_lo, x_hi, x, count, any_kept};
  if (lam.is_cpu() && fused_cpu_tail) return quadrature_tail_cpu(grid, lam, weights, null, h_weights, numerator);

  const at::Tensor valid = (q.unsqueeze(0) < count.unsqueeze(1)).to(at::kDouble);  // (B, Q)
  const at::Tensor h = h_weights + null.unsqueeze(2) / t.unsqueeze(1);
  const at::Tensor body = (numerator / h * (at::exp(x) * valid).unsqueeze(1)).sum(-1);

  // Above: N/h -> G_cc / t, a geometric series over the remaining nodes.
  const at::Tensor gram_diagonal = (weights * lam.unsqueeze(1)).sum(-1);
  const at::Tensor upper = gram_diagonal * at::exp(-x_hi).unsqueeze(1) * kGeometric;

  // Below: N/h -> N0 t / (N0 t + r), per channel, then a geometric remainder.
  const at::Tensor safe_lam = at::where(kept, lam, at::ones_like(lam));
  const at::Tensor n0 = (weights / safe_lam.unsqueeze(1)).sum(-1).unsqueeze(2);  // (B, C, 1)
  const at::Tensor x_ext =
      x_lo.unsqueeze(1) - kQuadratureStep * at::arange(1, kExtensionNodes + 1, options);  // (B, J)
  const at::Tensor t_ext = at::exp(2.0 * x_ext).unsqueeze(1);
  const at::Tensor scaled = n0 * t_ext;
  at::Tensor lower = (scaled / (scaled + null.unsqueeze(2)) * at::exp(x_ext).unsqueeze(1)).sum(-1);
  lower.add_((null == 0).to(at::kDouble) *
             at::exp(x_ext.narrow(1, kExtensionNodes - 1, 1)) * kGeometric);

  const at::Tensor ci = (body + upper + lower) * (2.0 / M_PI * kQuadratureStep);
  return at::where(any_kept.unsqueeze(1), ci, at::zeros_like(ci)).clamp_min_(0.0);
}

}  // namespace pccfast
