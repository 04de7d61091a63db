// Host entry points of the CUDA CI kernels, shared by kernels/*.cu.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace pccfast {

// Batched Jacobi eigensolver (kernels/jacobi_eigh.cu).
// gram: (B, n, n) float64 CUDA, symmetric (lower triangle read) -> (eigenvalues (B, n)
// ascending, eigenvectors (B, n, n) as columns, sweeps (B,) int32, -1 where it did not converge).
// Asynchronous: nothing is checked on the device's results.
std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_eigh_cuda(const at::Tensor& gram);

}  // namespace pccfast
