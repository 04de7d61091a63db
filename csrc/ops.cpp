// The pccfast operator library: the schemas (TORCH_LIBRARY). Kernels register per device in
// their own files (TORCH_LIBRARY_IMPL), so a build without CUDA simply has no CUDA kernels; the
// Python side adds fake implementations and autograd (pccfast/ops/pcc_cpu.py, ci_compiled.py).
#include <torch/library.h>

TORCH_LIBRARY(pccfast, m) {
  // x: (N, C, H, W) -> (score: 0-d, mean: (G, M), rstd: (G, M)), fp32 (fp64 for fp64 input),
  // and sign_codes: uint8 (G, bytes), the signs of R at 2 bits a pair, kept for "abs" where they
  // are at most 1/8 of the activation's fp32 bytes (the rule: csrc/pcc_cpu.cpp keeps_signs,
  // from the shapes and options alone), then for long channel rows a double a row (R's row sums
  // of |R|, group_code_bytes), else (0,).
  m.def(
      "pcc_forward(Tensor x, str orientation, str group, str penalty, bool include_diagonal, "
      "float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // d score / d x from x, the per-row statistics and the sign codes of the forward pass (D is
  // decoded from the codes where they are valid; R is formed again otherwise, or for (0,)).
  m.def(
      "pcc_backward(Tensor grad_score, Tensor x, Tensor mean, Tensor rstd, Tensor sign_codes, "
      "str orientation, str group, str penalty, bool include_diagonal, float eps) -> Tensor");
  // fmaps: (B, C, P), any float dtype -> CI: (B, C) float64.
  m.def("channel_independence(Tensor fmaps) -> Tensor");
}

