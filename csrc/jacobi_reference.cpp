// pccfast::jacobi_eigh_reference: the CUDA Jacobi eigensolver's algorithm run on the host
// (kernels/jacobi_eigh.cuh, the same rotations, ordering and convergence test), so that its
// numerics are tested on machines without a GPU and a GPU run can be compared with it.
// Built in every configuration (CPU only or with CUDA); not a fast path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../kernels/jacobi_eigh.cuh"

namespace pccfast {
namespace {

// gram: (B, n, n) float64 CPU, symmetric (lower triangle read) -> (values (B, n) ascending,
// vectors (B, n, n) with eigenvectors as columns, sweeps (B,) int32: -1 = did not converge).
std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_eigh_reference_cpu(const at::Tensor& gram) {
  TORCH_CHECK_VALUE(gram.dim() == 3 && gram.size(1) == gram.size(2),
                    "gram must have shape (B, n, n), got ", gram.sizes());
  TORCH_CHECK_TYPE(gram.scalar_type() == at::kDouble, "gram must be float64, got ",
                   gram.scalar_type());
  TORCH_CHECK_VALUE(gram.size(1) <= jacobi::kMaxSize, "gram: n must be at most ",
                    jacobi::kMaxSize, ", got ", gram.size(1));
  const int64_t b = gram.size(0);
  const int n = static_cast<int>(gram.size(1));
  const at::Tensor g = gram.contiguous();
  at::Tensor values = at::empty({b, n}, g.options());
  at::Tensor vectors_t = at::empty({b, n, n}, g.options());
  at::Tensor sweeps = at::empty({b}, g.options().dtype(at::kInt));
  const double* gp = g.data_ptr<double>();
  double* vp = values.data_ptr<double>();
  double* tp = vectors_t.data_ptr<double>();
  int* sp = sweeps.data_ptr<int>();
  const int64_t nn = int64_t(n) * n;
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> work(jacobi::jacobi_host_work_size(n));
    for (int64_t i = begin; i < end; ++i) {
      sp[i] = jacobi::jacobi_eigh_host(gp + i * nn, n, vp + i * n, tp + i * nn, work.data());
    }
  });
  return {values, vectors_t.transpose(1, 2), sweeps};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pccfast, m) {
  // gram: (B, n, n) float64 -> (eigenvalues (B, n), eigenvectors (B, n, n), sweeps (B,) int32).
  m.def("jacobi_eigh_reference(Tensor gram) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pccfast, CPU, m) {
  m.impl("jacobi_eigh_reference", &jacobi_eigh_reference_cpu);
}

}  // namespace pccfast
