// The pccfast operator library: schemas (TORCH_LIBRARY) and the Python module's build record.
// Kernels register per device in their own files (TORCH_LIBRARY_IMPL), so a build without CUDA
// simply has no CUDA kernels; the Python side adds fake implementations and autograd.
#include <torch/extension.h>

#ifndef PCCFAST_TORCH_VERSION
#define PCCFAST_TORCH_VERSION "unknown"
#endif

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

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = PCCFAST_TORCH_VERSION;
#ifdef PCCFAST_WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_version"] = PCCFAST_CUDA_VERSION;
  info["cuda_arch"] = PCCFAST_CUDA_ARCH;
#else
  info["with_cuda"] = false;
#endif
  info["compiler"] = __VERSION__;
  info["cplusplus"] = static_cast<long>(__cplusplus);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "pccfast compiled kernels; the operators live in torch.ops.pccfast";
  module.def("build_info", &build_info, "The torch/CUDA versions and flags this was built with");
}
