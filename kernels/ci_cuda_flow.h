// The host-side steps of CI on CUDA, written once for the CUDA operator (kernels/ci_cuda.cu,
// with the CUDA kernels) and for its host emulation (csrc/ci_cuda_emulation.cpp, with the
// kernels' host twins), so that the CPU tests run exactly this chunking and weighting.
//
// Per chunk of images: the Gram matrix on the small side (kernel), its eigendecomposition
// (Jacobi kernel or torch.linalg.eigh), for P < C the projections A V (kernel), then the
// quadrature shared with the CPU operator (csrc/ci_quadrature.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <tuple>

#include "ci_quadrature.h"
#include "gemm_f64.cuh"
#include "jacobi_eigh.cuh"

namespace pccfast {

// Elements of float64 intermediates per chunk (quadrature (B, C, nodes) tensors, weights, Gram
// and eigenvector matrices): 512 MB, so that a chunk holds enough images to fill a GPU.
constexpr int64_t kGpuChunkElements = int64_t(64) << 20;
// Upper estimate of the quadrature nodes per image (body + lower extension).
constexpr int64_t kQuadratureNodesEstimate = 256;

struct CiKernels {
  // a: (B, C, P) any float dtype -> (B, m, m) float64: A A^T (C <= P) or A^T A.
  std::function<at::Tensor(const at::Tensor&)> gram;
  // gram: (B, m, m) float64 -> (eigenvalues (B, m) ascending, eigenvectors (B, m, m) as columns).
  std::function<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)> eigh;
  // a: (B, C, P) any float dtype, v: (B, P, m) float64 -> A V: (B, C, m) float64.
  std::function<at::Tensor(const at::Tensor&, const at::Tensor&)> project;
};

inline void check_fmaps(const at::Tensor& fmaps) {
  TORCH_CHECK_VALUE(fmaps.dim() == 3, "fmaps must have shape (B, C, P), got ", fmaps.sizes());
  TORCH_CHECK_VALUE(fmaps.numel() > 0, "fmaps must not be empty, got ", fmaps.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(fmaps.scalar_type()), "fmaps must be a float tensor, got ",
                   fmaps.scalar_type());
}

// One batched product for the GEMM kernel (kernels/gemm_f64.cuh): operands and sizes.
struct GemmProblem {
  gemm::Operand left, right;
  gemm::Shape shape;
  int64_t batch;
};

inline gemm::Operand gemm_operand(const at::Tensor& t, int64_t row_dim, int64_t col_dim) {
  return {t.data_ptr(), t.stride(0), t.stride(row_dim), t.stride(col_dim)};
}

inline gemm::Shape gemm_shape(int64_t m_rows, int64_t n_cols, int64_t k_depth, int64_t batch,
                              bool symmetric) {
  constexpr int64_t kMaxDim = int64_t(65535) * gemm::kTile;  // CUDA grid.y/z limit
  TORCH_CHECK_VALUE(m_rows <= kMaxDim && n_cols <= kMaxDim &&
                        k_depth <= std::numeric_limits<int>::max() - gemm::kTileK,
                    "fmaps: dimensions too large for the CI kernels, got ", m_rows, " x ",
                    n_cols, " x ", k_depth);
  TORCH_CHECK_VALUE(batch <= std::numeric_limits<int>::max(), "fmaps: at most 2^31 - 1 images");
  return {int(m_rows), int(n_cols), int(k_depth), symmetric};
}

// a: (B, C, P) -> the Gram matrix on the small side as X X^T: X = A (C <= P) or A^T, read
// through strides (no copy); the product is symmetric.
inline GemmProblem gram_problem(const at::Tensor& a) {
  const int64_t b = a.size(0), c = a.size(1), p = a.size(2);
  const bool rows = c <= p;
  const int64_t m = rows ? c : p, depth = rows ? p : c;
  return {rows ? gemm_operand(a, 1, 2) : gemm_operand(a, 2, 1),
          rows ? gemm_operand(a, 2, 1) : gemm_operand(a, 1, 2),
          gemm_shape(m, m, depth, b, /*symmetric=*/true), b};
}

// a: (B, C, P), v: (B, P, m) float64 -> the product A V (B, C, m).
inline GemmProblem projection_problem(const at::Tensor& a, const at::Tensor& v) {
  const int64_t b = a.size(0), c = a.size(1), p = a.size(2), m = v.size(2);
  TORCH_CHECK(v.scalar_type() == at::kDouble && v.dim() == 3 && v.size(0) == b && v.size(1) == p,
              "projection: eigenvectors of shape (B, P, m) float64 expected, got ", v.sizes());
  return {gemm_operand(a, 1, 2), gemm_operand(v, 1, 2), gemm_shape(c, m, p, b, false), b};
}

inline int64_t gpu_ci_chunk(int64_t c, int64_t p) {
  const int64_t m = std::min(c, p);
  const int64_t per_image = (2 * c + m) * kQuadratureNodesEstimate + c * m + 4 * m * m;
  return std::max<int64_t>(1, kGpuChunkElements / std::max<int64_t>(per_image, 1));
}

// Raises ValueError if any entry of `sweeps` (from the Jacobi solver) is -1; one sync.
inline void check_jacobi_converged(const at::Tensor& sweeps, const char* what) {
  if (sweeps.numel() == 0) return;
  const int64_t failed = (sweeps < 0).sum().item<int64_t>();
  TORCH_CHECK_VALUE(failed == 0, what, ": the Jacobi eigensolver did not converge in ",
                    jacobi::kMaxSweeps, " sweeps for ", failed, " of ", sweeps.numel(),
                    " matrices (does the input hold NaN or Inf?)");
}

// The P < C branch of spectral_weights (csrc/ci_quadrature.cpp) with A V computed by a kernel
// from A in its own dtype: the same deflation, weights (A V)^2 / lam and null weight.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> wide_spectral_weights(
    const at::Tensor& eigenvalues, const at::Tensor& projections) {
  const int64_t m = eigenvalues.size(1);
  const double tolerance = double(m) * std::numeric_limits<double>::epsilon();
  const at::Tensor largest = eigenvalues.amax(-1, /*keepdim=*/true).clamp_min(0.0);
  const at::Tensor kept = eigenvalues > largest * tolerance;
  const at::Tensor lam = at::where(kept, eigenvalues, at::zeros_like(eigenvalues));
  const at::Tensor kept_columns = kept.unsqueeze(1).to(at::kDouble);
  const at::Tensor safe = at::where(kept, eigenvalues, at::ones_like(eigenvalues));
  const at::Tensor weights = projections.square().div_(safe.unsqueeze(1)).mul_(kept_columns);
  const at::Tensor null = (1.0 - weights.sum(-1)).clamp_min(0.0);
  return {lam, weights, null};
}

// fmaps: (B, C, P) any float dtype -> CI (B, C) float64, `chunk` images at a time (0: as many
// as gpu_ci_chunk allows).
inline at::Tensor ci_with_kernels(const at::Tensor& fmaps, const CiKernels& kernels,
                                  int64_t chunk = 0) {
  const int64_t b = fmaps.size(0), c = fmaps.size(1), p = fmaps.size(2);
  at::Tensor out = at::empty({b, c}, fmaps.options().dtype(at::kDouble));
  TORCH_CHECK_VALUE(chunk >= 0, "chunk must be >= 0, got ", chunk);
  if (chunk == 0) chunk = gpu_ci_chunk(c, p);
  for (int64_t i0 = 0; i0 < b; i0 += chunk) {
    const int64_t count = std::min(chunk, b - i0);
    const at::Tensor a = fmaps.narrow(0, i0, count);
    auto [values, vectors] = kernels.eigh(kernels.gram(a));
    at::Tensor lam, weights, null;
    if (c <= p) {
      // On this branch spectral_weights reads only the sizes of `a`: W = U^2.
      std::tie(lam, weights, null) = spectral_weights(a, values, vectors);
    } else {
      std::tie(lam, weights, null) = wide_spectral_weights(values, kernels.project(a, vectors));
    }
    // The device's elementwise tail (ATen ops) also in the host emulation, which runs this flow.
    out.narrow(0, i0, count).copy_(ci_quadrature(lam, weights, null, /*fused_cpu_tail=*/false));
  }
  return out;
}

}  // namespace pccfast
