// The Python module pccfast._C: importing it loads the operator library (ops.cpp and the
// kernels linked with it) and gives Python the build record that `pccfast info` prints, and
// the CPU kernels' rule for the size of their kept sign codes (the fake implementation's).
#include "pcc_cpu.h"

#include <torch/extension.h>

#include <string>

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

// Bytes per group of the sign codes pcc_forward keeps (0: none), for the fake implementation.
int64_t sign_code_bytes(int64_t rows, int64_t features, const std::string& orientation,
                        const std::string& group, const std::string& penalty,
                        bool include_diagonal, double eps) {
  const pccfast::PCCConfig cfg =
      pccfast::parse_pcc_config(orientation, group, penalty, include_diagonal, eps);
  return pccfast::pcc_sign_code_bytes(rows, features, cfg);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "pccfast compiled kernels; the operators live in torch.ops.pccfast";
  module.def("build_info", &build_info, "The torch/CUDA versions and flags this was built with");
  module.def("pcc_sign_code_bytes", &sign_code_bytes,
             "Bytes per group of the sign codes pcc_forward keeps for groups of (rows, features) "
             "with (orientation, group, penalty, include_diagonal, eps); 0 where it keeps none");
}
