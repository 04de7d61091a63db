#include "ci_quadrature.h"

#include <algorithm>
#include <cmath>
#include <limits>

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

at::Tensor ci_quadrature(const at::Tensor& lam, const at::Tensor& weights,
                         const at::Tensor& null) {
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
  const at::Tensor valid = (q.unsqueeze(0) < count.unsqueeze(1)).to(at::kDouble);  // (B, Q)
  const at::Tensor x_hi = x_lo + kQuadratureStep * (count - 1.0);
  const at::Tensor t = at::exp(2.0 * x);  // (B, Q)

  // Nodes near the spectrum: N and h for all channels by two matrix products.
  const at::Tensor resolvent = (lam.unsqueeze(2) + t.unsqueeze(1)).reciprocal_();  // (B, m, Q)
  const at::Tensor h = at::baddbmm(null.unsqueeze(2) / t.unsqueeze(1), weights, resolvent);
  const at::Tensor numerator = at::bmm(weights * lam.unsqueeze(1), resolvent.square());
  const at::Tensor body = (numerator.div_(h) * (at::exp(x) * valid).unsqueeze(1)).sum(-1);

  // Above: N/h -> G_cc / t, a geometric series over the remaining nodes.
  const double ratio = std::exp(-kQuadratureStep);
  const double geometric = ratio / (1.0 - ratio);
  const at::Tensor gram_diagonal = (weights * lam.unsqueeze(1)).sum(-1);
  const at::Tensor upper = gram_diagonal * at::exp(-x_hi).unsqueeze(1) * geometric;

  // Below: N/h -> N0 t / (N0 t + r), per channel, then a geometric remainder.
  const at::Tensor safe_lam = at::where(kept, lam, at::ones_like(lam));
  const at::Tensor n0 = (weights / safe_lam.unsqueeze(1)).sum(-1).unsqueeze(2);  // (B, C, 1)
  const int64_t extra = int64_t(std::ceil(kLowerExtension / kQuadratureStep));
  const at::Tensor x_ext =
      x_lo.unsqueeze(1) - kQuadratureStep * at::arange(1, extra + 1, options);  // (B, J)
  const at::Tensor t_ext = at::exp(2.0 * x_ext).unsqueeze(1);
  const at::Tensor scaled = n0 * t_ext;
  at::Tensor lower = (scaled / (scaled + null.unsqueeze(2)) * at::exp(x_ext).unsqueeze(1)).sum(-1);
  lower.add_((null == 0).to(at::kDouble) * at::exp(x_ext.narrow(1, extra - 1, 1)) * geometric);

  const at::Tensor ci = (body + upper + lower) * (2.0 / M_PI * kQuadratureStep);
  return at::where(any_kept.unsqueeze(1), ci, at::zeros_like(ci)).clamp_min_(0.0);
}

}  // namespace pccfast
