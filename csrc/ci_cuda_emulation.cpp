// Host emulations of the CUDA CI kernels, so that their numerics are tested on machines without
// a GPU (tests/test_ci_cuda.py) and a GPU run can be compared with them. Each runs the kernel's
// own per-thread steps (kernels/jacobi_eigh.cuh, kernels/gemm_f64.cuh) in the kernel's order,
// and channel_independence_emulation runs the CUDA operator's host flow
// (kernels/ci_cuda_flow.h) on them. Built in every configuration; slow, not a fast path.
//
// pccfast::jacobi_eigh_emulation(gram, shared_bytes=232448) -> (eigenvalues, eigenvectors, sweeps)
// pccfast::small_side_gram_emulation(fmaps) -> gram
// pccfast::channel_independence_emulation(fmaps, chunk=0) -> CI
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../kernels/ci_cuda_flow.h"
#include "../kernels/gemm_f64.cuh"
#include "../kernels/jacobi_eigh.cuh"

namespace pccfast {
namespace {

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

// gram: (B, n, n) float64 CPU, symmetric (lower triangle read) -> (values (B, n) ascending,
// vectors (B, n, n) with eigenvectors as columns, sweeps (B,) int32: -1 = did not converge).
// shared_bytes: the emulated block's shared memory (default: an H100's); less spills more of
// the storage to "global memory", which must not change a bit of the result.
std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_eigh_emulation(const at::Tensor& gram,
                                                                     int64_t shared_bytes) {
  TORCH_CHECK_VALUE(gram.dim() == 3 && gram.size(1) == gram.size(2),
                    "gram must have shape (B, n, n), got ", gram.sizes());
  TORCH_CHECK_TYPE(gram.scalar_type() == at::kDouble, "gram must be float64, got ",
                   gram.scalar_type());
  check_cpu(gram, "gram");
  TORCH_CHECK_VALUE(gram.size(1) <= jacobi::kMaxSize, "gram: n must be at most ",
                    jacobi::kMaxSize, ", got ", gram.size(1));
  const int n = static_cast<int>(gram.size(1));
  TORCH_CHECK_VALUE(shared_bytes <= (int64_t(1) << 30) &&
                        jacobi::shared_capacity(n, static_cast<int>(shared_bytes)) >= 0,
                    "shared_bytes must hold at least ", jacobi::fixed_shared_bytes(n),
                    " bytes for n = ", n, ", got ", shared_bytes);
  const int64_t b = gram.size(0);
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
    for (int64_t i = begin; i < end; ++i) {
      sp[i] = jacobi::jacobi_eigh_host(gp + i * nn, n, vp + i * n, tp + i * nn,
                                       static_cast<int>(shared_bytes));
    }
  });
  return {values, vectors_t.transpose(1, 2), sweeps};
}

// The GEMM kernel's grid on the host: every block, every thread, phase by phase.
template <typename L, typename R>
void emulate_gemm(const GemmProblem& problem, at::Tensor& out) {
  const gemm::Shape shape = problem.shape;
  const int tiles_i = (shape.m_rows + gemm::kTile - 1) / gemm::kTile;
  const int tiles_j = (shape.n_cols + gemm::kTile - 1) / gemm::kTile;
  double* op = out.data_ptr<double>();
  at::parallel_for(0, problem.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> left_tile(gemm::kTileK * gemm::kPad), right_tile(gemm::kTileK * gemm::kPad);
    std::vector<double> acc(gemm::kThreads * 16);
    auto* lt = reinterpret_cast<double(*)[gemm::kPad]>(left_tile.data());
    auto* rt = reinterpret_cast<double(*)[gemm::kPad]>(right_tile.data());
    for (int64_t b = begin; b < end; ++b) {
      const L* lp = static_cast<const L*>(problem.left.data) + b * problem.left.batch;
      const R* rp = static_cast<const R*>(problem.right.data) + b * problem.right.batch;
      double* o = op + b * int64_t(shape.m_rows) * shape.n_cols;
      for (int tile_i = 0; tile_i < tiles_i; ++tile_i) {
        for (int tile_j = 0; tile_j < tiles_j; ++tile_j) {
          if (!gemm::tile_runs(shape, tile_i, tile_j)) continue;
          const int i0 = tile_i * gemm::kTile, j0 = tile_j * gemm::kTile;
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int k0 = 0; k0 < shape.k_depth; k0 += gemm::kTileK) {
            for (int tid = 0; tid < gemm::kThreads; ++tid) {
              gemm::load_slice(tid, lp, problem.left, rp, problem.right, shape, i0, j0, k0, lt, rt);
            }
            for (int tid = 0; tid < gemm::kThreads; ++tid) {
              gemm::accumulate_slice(tid, lt, rt,
                                     reinterpret_cast<double(*)[4]>(acc.data() + tid * 16));
            }
          }
          for (int tid = 0; tid < gemm::kThreads; ++tid) {
            gemm::store_tile(tid, reinterpret_cast<const double(*)[4]>(acc.data() + tid * 16), o,
                             shape, i0, j0);
          }
        }
      }
    }
  });
}

at::Tensor small_side_gram_emulation(const at::Tensor& fmaps) {
  check_fmaps(fmaps);
  check_cpu(fmaps, "fmaps");
  const GemmProblem problem = gram_problem(fmaps);
  const int64_t m = problem.shape.m_rows;
  at::Tensor out = at::empty({problem.batch, m, m}, fmaps.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fmaps.scalar_type(), "ci_gram", [&] {
    emulate_gemm<scalar_t, scalar_t>(problem, out);
  });
  return out;
}

at::Tensor project_emulation(const at::Tensor& a, const at::Tensor& v) {
  const GemmProblem problem = projection_problem(a, v);
  at::Tensor out = at::empty({problem.batch, problem.shape.m_rows, problem.shape.n_cols},
                             a.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "ci_project", [&] {
    emulate_gemm<scalar_t, double>(problem, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> jacobi_checked(const at::Tensor& gram) {
  auto [values, vectors, sweeps] = jacobi_eigh_emulation(gram, jacobi::kHopperSharedBytes);
  check_jacobi_converged(sweeps, "channel_independence_emulation");
  return {values, vectors};
}

// The CUDA operator with the Jacobi eigensolver, every kernel replaced by its emulation.
// chunk: images per step (0: the CUDA operator's choice), so that tests can cross chunk edges.
at::Tensor channel_independence_emulation(const at::Tensor& fmaps, int64_t chunk) {
  check_fmaps(fmaps);
  check_cpu(fmaps, "fmaps");
  CiKernels kernels;
  kernels.gram = small_side_gram_emulation;
  kernels.eigh = jacobi_checked;
  kernels.project = project_emulation;
  return ci_with_kernels(fmaps, kernels, chunk);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pccfast, m) {
  // gram: (B, n, n) float64 -> (eigenvalues (B, n), eigenvectors (B, n, n), sweeps (B,) int32);
  // shared_bytes: the emulated block's shared memory (232448: an H100's or H200's).
  m.def("jacobi_eigh_emulation(Tensor gram, int shared_bytes=232448) -> (Tensor, Tensor, Tensor)");
  // fmaps: (B, C, P) any float dtype -> (B, m, m) float64, the CUDA Gram kernel's result.
  m.def("small_side_gram_emulation(Tensor fmaps) -> Tensor");
  // fmaps: (B, C, P) any float dtype -> (B, C) float64, the CUDA operator's result; chunk:
  // images per step (0: the operator's own choice).
  m.def("channel_independence_emulation(Tensor fmaps, int chunk=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(pccfast, CPU, m) {
  m.impl("jacobi_eigh_emulation", &jacobi_eigh_emulation);
  m.impl("small_side_gram_emulation", &small_side_gram_emulation);
  m.impl("channel_independence_emulation", &channel_independence_emulation);
}

}  // namespace pccfast
