// The Python module pccfast._C: importing it loads the operator library (ops.cpp and the
// kernels linked with it) and gives Python the build record that `pccfast info` prints.
#include <torch/extension.h>

#ifndef PCCFAST_TORCH_VERSION
#define PCCFAST_TORCH_VERSION "unknown"
#endif

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
