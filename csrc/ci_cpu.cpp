// CI on the CPU: per image, the Gram matrix on the small side, its eigendecomposition by LAPACK
// (one image per task, spread over the intra-op threads), then the shared quadrature.
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "ci_cpu.h"
#include "ci_quadrature.h"

namespace pccfast {
namespace {

// Batched eigh with the images spread over threads: ATen's batched CPU eigh loops over the
// matrices one at a time.
std::tuple<at::Tensor, at::Tensor> parallel_eigh(const at::Tensor& gram) {
  const int64_t b = gram.size(0), m = gram.size(1);
  at::Tensor values = at::empty({b, m}, gram.options());
  at::Tensor vectors = at::empty({b, m, m}, gram.options());
  const int64_t grain = m >= 32 ? 1 : 16;
  at::parallel_for(0, b, grain, [&](int64_t begin, int64_t end) {
    auto [w, v] = at::linalg_eigh(gram.narrow(0, begin, end - begin));
    values.narrow(0, begin, end - begin).copy_(w);
    vectors.narrow(0, begin, end - begin).copy_(v);
  });
  return {values, vectors};
}

}  // namespace

at::Tensor channel_independence_cpu(const at::Tensor& fmaps) {
  TORCH_CHECK_VALUE(fmaps.dim() == 3, "fmaps must have shape (B, C, P), got ", fmaps.sizes());
  TORCH_CHECK_VALUE(fmaps.numel() > 0, "fmaps must not be empty, got ", fmaps.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(fmaps.scalar_type()), "fmaps must be a float tensor, got ",
                   fmaps.scalar_type());
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // float64 math
  const int64_t b = fmaps.size(0), c = fmaps.size(1), p = fmaps.size(2);
  at::Tensor out = at::empty({b, c}, fmaps.options().dtype(at::kDouble));
  const int64_t chunk = ci_chunk(c, p);
  for (int64_t i0 = 0; i0 < b; i0 += chunk) {
    const int64_t count = std::min(chunk, b - i0);
    const at::Tensor a = fmaps.narrow(0, i0, count).to(at::kDouble).contiguous();
    auto [values, vectors] = parallel_eigh(small_side_gram(a));
    auto [lam, weights, null] = spectral_weights(a, values, vectors);
    out.narrow(0, i0, count).copy_(ci_quadrature(lam, weights, null));
  }
  return out;
}

TORCH_LIBRARY_IMPL(pccfast, CPU, m) {
  m.impl("channel_independence", &channel_independence_cpu);
}

}  // namespace pccfast
