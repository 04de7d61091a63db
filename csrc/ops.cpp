// The pccfast operator library: the schemas (TORCH_LIBRARY). Kernels register per device in
// their own files (TORCH_LIBRARY_IMPL), so a build without CUDA simply has no CUDA kernels; the
// Python side adds fake implementations and autograd (pccfast/ops/pcc_cpu.py, ci_compiled.py).
#include <torch/library.h>

TORCH_LIBRARY(pccfast, m) {
  // x: (N, C, H, W) -> (score: 0-d, mean: (G, M), rstd: (G, M)), fp32 (fp64 for fp64 input).
  m.def(
      "pcc_forward(Tensor x, str orientation, str group, str penalty, bool include_diagonal, "
      "float eps) -> (Tensor, Tensor, Tensor)");
  // d score / d x, recomputed from x and the per-row statistics of the forward pass.
  m.def(
      "pcc_backward(Tensor grad_score, Tensor x, Tensor mean, Tensor rstd, str orientation, "
      "str group, str penalty, bool include_diagonal, float eps) -> Tensor");
  // fmaps: (B, C, P), any float dtype -> CI: (B, C) float64.
  m.def("channel_independence(Tensor fmaps) -> Tensor");
}

