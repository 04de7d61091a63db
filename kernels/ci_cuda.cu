// CI on CUDA (SPEC section 2): pccfast::channel_independence for CUDA tensors.
//
// Per chunk of images, straight from the activations as given (fp16/bf16/fp32/fp64, any
// strides; nothing converted or copied):
//   1. the Gram matrix on the small side, G = A A^T (C <= P) or A^T A (P < C), float64, by a
//      tiled kernel (kernels/gemm_f64.cuh) that converts each element on load and accumulates
//      in float64 (tiles on or below the diagonal only, mirrored);
//   2. its eigendecomposition: the batched Jacobi kernel (kernels/jacobi_eigh.cu) for
//      m <= kJacobiMaxSize, torch.linalg.eigh (cuSOLVER) above;
//   3. for P < C the projections A V (B, C, m) by the same tiled kernel, A again in its dtype;
//   4. the shared quadrature (csrc/ci_quadrature.cpp: ATen ops, which run on the GPU as is).
// The host-side steps are kernels/ci_cuda_flow.h, shared with the CPU emulation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>

#include "ci_cuda.h"
#include "ci_cuda_flow.h"
#include "gemm_f64.cuh"

namespace pccfast {
namespace {

// Eigensolver for the Gram matrices: the Jacobi kernel up to this size, cuSOLVER
// (torch.linalg.eigh: one matrix at a time above n = 32) beyond. An estimate from operation
// and traffic counts, not yet a measurement: the kernel's storage spills out of shared memory
// above n = 138 (V^T) and n = 238 (A), and past L2 near n = 512 with one matrix per SM.
// benchmarks/gpu/bench_ci.py measures both; PCCFAST_CI_EIGH=jacobi|torch|auto overrides.
constexpr int64_t kJacobiMaxSize = 256;

using gemm::Operand;

template <typename L, typename R>
__global__ void __launch_bounds__(gemm::kThreads)
    gemm_f64_kernel(Operand left, Operand right, double* __restrict__ out, gemm::Shape shape) {
  const int tile_i = blockIdx.y, tile_j = blockIdx.z;
  if (!gemm::tile_runs(shape, tile_i, tile_j)) return;
  __shared__ double left_tile[gemm::kTileK][gemm::kPad];
  __shared__ double right_tile[gemm::kTileK][gemm::kPad];
  const int64_t b = blockIdx.x;
  const L* lp = static_cast<const L*>(left.data) + b * left.batch;
  const R* rp = static_cast<const R*>(right.data) + b * right.batch;
  const int tid = threadIdx.x;
  const int i0 = tile_i * gemm::kTile, j0 = tile_j * gemm::kTile;
  double acc[4][4] = {};
  for (int k0 = 0; k0 < shape.k_depth; k0 += gemm::kTileK) {
    gemm::load_slice(tid, lp, left, rp, right, shape, i0, j0, k0, left_tile, right_tile);
    __syncthreads();
    gemm::accumulate_slice(tid, left_tile, right_tile, acc);
    __syncthreads();
  }
  gemm::store_tile(tid, acc, out + b * int64_t(shape.m_rows) * shape.n_cols, shape, i0, j0);
}

template <typename L, typename R>
void launch_gemm(const GemmProblem& problem, at::Tensor& out) {
  const gemm::Shape& shape = problem.shape;
  if (problem.batch == 0 || shape.m_rows == 0 || shape.n_cols == 0) return;
  const dim3 grid(static_cast<unsigned>(problem.batch),
                  (shape.m_rows + gemm::kTile - 1) / gemm::kTile,
                  (shape.n_cols + gemm::kTile - 1) / gemm::kTile);
  gemm_f64_kernel<L, R><<<grid, gemm::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      problem.left, problem.right, out.data_ptr<double>(), shape);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// a: (B, C, P) any float dtype, any strides -> (B, m, m) float64: A A^T (C <= P) or A^T A.
at::Tensor small_side_gram_cuda(const at::Tensor& a) {
  check_fmaps(a);
  TORCH_CHECK_VALUE(a.is_cuda(), "fmaps must be a CUDA tensor, got ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  const GemmProblem problem = gram_problem(a);
  const int64_t m = problem.shape.m_rows;
  at::Tensor out = at::empty({problem.batch, m, m}, a.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "ci_gram", [&] {
    launch_gemm<scalar_t, scalar_t>(problem, out);
  });
  return out;
}

// a: (B, C, P) any float dtype, v: (B, P, m) float64 -> A V: (B, C, m) float64.
at::Tensor project_cuda(const at::Tensor& a, const at::Tensor& v) {
  const GemmProblem problem = projection_problem(a, v);
  at::Tensor out = at::empty({problem.batch, problem.shape.m_rows, problem.shape.n_cols},
                             a.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "ci_project", [&] {
    launch_gemm<scalar_t, double>(problem, out);
  });
  return out;
}

bool use_jacobi(int64_t m) {
  const char* env = std::getenv("PCCFAST_CI_EIGH");
  const std::string choice = env == nullptr ? "" : env;
  if (choice == "jacobi") return true;
  if (choice == "torch") return false;
  TORCH_CHECK_VALUE(choice == "auto" || choice.empty(),
                    "PCCFAST_CI_EIGH must be one of auto, jacobi, torch, got '", choice, "'");
  return m <= kJacobiMaxSize;
}

std::tuple<at::Tensor, at::Tensor> jacobi_checked(const at::Tensor& gram) {
  auto [values, vectors, sweeps] = jacobi_eigh_cuda(gram);
  check_jacobi_converged(sweeps, "channel_independence");
  return {values, vectors};
}

std::tuple<at::Tensor, at::Tensor> cusolver_eigh(const at::Tensor& gram) {
  return at::linalg_eigh(gram);
}

at::Tensor channel_independence_cuda(const at::Tensor& fmaps) {
  check_fmaps(fmaps);
  const c10::cuda::CUDAGuard guard(fmaps.device());
  const bool jacobi = use_jacobi(std::min(fmaps.size(1), fmaps.size(2)));
  CiKernels kernels;
  kernels.gram = small_side_gram_cuda;
  kernels.eigh = jacobi ? jacobi_checked : cusolver_eigh;
  kernels.project = project_cuda;
  return ci_with_kernels(fmaps, kernels);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pccfast, m) {
  // fmaps: (B, C, P) any float dtype CUDA -> (B, m, m) float64, m = min(C, P): A A^T if C <= P
  // else A^T A; the Gram kernel of channel_independence (for tests and benchmarks).
  m.def("small_side_gram(Tensor fmaps) -> Tensor");
}

TORCH_LIBRARY_IMPL(pccfast, CUDA, m) {
  m.impl("channel_independence", &channel_independence_cuda);
  m.impl("small_side_gram", &small_side_gram_cuda);
}

}  // namespace pccfast
