// Batched symmetric eigensolver for many small float64 matrices: one thread block per matrix,
// parallel-order Jacobi rotations (the algorithm and its host twin: kernels/jacobi_eigh.cuh).
//
// Why: torch.linalg.eigh on CUDA runs cuSOLVER's batched solver only up to n = 32 and loops
// over the matrices one at a time above (pytorch/pytorch#175585; #174674 measures ~1.8 ms per
// 100 x 100 matrix), which leaves the GPU idle for the hundreds of 64..256-sized Gram matrices
// of a CI pass.
//
// Memory: each block keeps its matrix's working storage (packed lower triangle of A, then V^T:
// n(n+1)/2 + n^2 doubles) in shared memory as far as the device's per-block limit allows
// (227 KB on H100/H200: everything up to n = 138, all of A up to n = 238) and the rest in a
// global-memory spill area (L2-resident at these sizes) -- one code path for every n up to
// jacobi::kMaxSize. A round is two phases separated by __syncthreads: the rotations of the
// N/2 disjoint pairs (phase 1), then every off-diagonal 2x2 block and the eigenvector rows
// (phase 2, all independent).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "ci_cuda.h"
#include "ci_cuda_flow.h"
#include "jacobi_eigh.cuh"

namespace pccfast {
namespace {

namespace J = jacobi;
using J::kWarp;

// Sums of (x, y) over the block, returned to every thread; the order that
// jacobi::block_sum_host emulates. `scratch` holds 2 * kWarp doubles.
__device__ void block_sum2(double* x, double* y, double* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  double a = *x, b = *y;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
  }
  if (lane == 0) {
    scratch[warp] = a;
    scratch[kWarp + warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < warps ? scratch[lane] : 0.0;
    b = lane < warps ? scratch[kWarp + lane] : 0.0;
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      a += __shfl_down_sync(0xffffffffu, a, offset);
      b += __shfl_down_sync(0xffffffffu, b, offset);
    }
    if (lane == 0) {
      scratch[0] = a;
      scratch[kWarp] = b;
    }
  }
  __syncthreads();
  *x = scratch[0];
  *y = scratch[kWarp];
  __syncthreads();  // scratch is free again
}

__device__ double block_max(double x, double* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    x = fmax(x, __shfl_down_sync(0xffffffffu, x, offset));
  }
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < warps ? scratch[lane] : 0.0;
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      x = fmax(x, __shfl_down_sync(0xffffffffu, x, offset));
    }
    if (lane == 0) scratch[0] = x;
  }
  __syncthreads();
  x = scratch[0];
  __syncthreads();
  return x;
}

// One matrix per block: the steps of kernels/jacobi_eigh.cuh between barriers.
template <class Store>
__device__ void jacobi_block(const Store& a, const J::SharedLayout& l, const double* gram, int n,
                             double* values, double* vectors_t, int* sweeps_out) {
  const int tid = threadIdx.x, threads = blockDim.x;
  const double largest = J::load_step(tid, threads, gram, n, a);
  const double scale = J::norm_scale(block_max(largest, l.scratch));  // barrier: A loaded
  int sweeps = -1;
  for (int sweep = 0;; ++sweep) {
    double off2, diag2;
    J::norm_step(tid, threads, a, n, scale, &off2, &diag2);
    block_sum2(&off2, &diag2, l.scratch);
    if (J::converged(off2, diag2)) {  // the same decision in every thread
      sweeps = sweep;
      break;
    }
    if (sweep == J::kMaxSweeps) break;
    for (int round = 0; round < J::round_count(n); ++round) {
      J::rotation_step(tid, threads, a, n, round, l);
      __syncthreads();
      J::update_step(tid, threads, a, n, l);
      __syncthreads();
    }
  }
  J::rank_step(tid, threads, a, n, l.ranks);
  __syncthreads();
  J::write_step(tid, threads, a, n, l.ranks, values, vectors_t);
  if (tid == 0) *sweeps_out = sweeps;
}

// grid: one block of threads_for(n) threads per matrix; dynamic shared memory:
// fixed_shared_bytes(n) + cap doubles, the rest of each matrix's storage in `spill` (kSpill).
// gram (B, n, n) contiguous; values (B, n); vectors_t (B, n, n) with row k = eigenvector of
// values[k]; sweeps (B,), -1 = did not converge.
template <bool kSpill>
__global__ void __launch_bounds__(J::kMaxThreads)
    jacobi_eigh_kernel(const double* __restrict__ gram, int n, int cap, double* spill,
                       int64_t spill_stride, double* __restrict__ values,
                       double* __restrict__ vectors_t, int* __restrict__ sweeps) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t b = blockIdx.x, nn = int64_t(n) * n;
  const J::SharedLayout l = J::shared_layout(shared_bytes, n);
  if constexpr (kSpill) {
    const J::SplitStorage a{l.storage, spill + b * spill_stride, cap};
    jacobi_block(a, l, gram + b * nn, n, values + b * n, vectors_t + b * nn, sweeps + b);
  } else {
    const J::SharedStorage a{l.storage};
    jacobi_block(a, l, gram + b * nn, n, values + b * n, vectors_t + b * nn, sweeps + b);
  }
}

std::tuple<at::Tensor, at::Tensor> batched_eigh_cuda(const at::Tensor& gram) {
  auto [values, vectors, sweeps] = jacobi_eigh_cuda(gram);
  check_jacobi_converged(sweeps, "batched_eigh");
  return {values, vectors};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_eigh_cuda(const at::Tensor& gram) {
  TORCH_CHECK_VALUE(gram.dim() == 3 && gram.size(1) == gram.size(2),
                    "gram must have shape (B, n, n), got ", gram.sizes());
  TORCH_CHECK_TYPE(gram.scalar_type() == at::kDouble, "gram must be float64, got ",
                   gram.scalar_type());
  TORCH_CHECK_VALUE(gram.is_cuda(), "gram must be a CUDA tensor, got ", gram.device());
  TORCH_CHECK_VALUE(gram.size(1) <= jacobi::kMaxSize, "gram: n must be at most ",
                    jacobi::kMaxSize, ", got ", gram.size(1));
  TORCH_CHECK_VALUE(gram.size(0) <= std::numeric_limits<int32_t>::max(),
                    "gram: at most 2^31 - 1 matrices per call, got ", gram.size(0));
  const c10::cuda::CUDAGuard guard(gram.device());
  const int64_t b = gram.size(0);
  const int n = static_cast<int>(gram.size(1));
  const at::Tensor g = gram.contiguous();
  at::Tensor values = at::empty({b, n}, g.options());
  at::Tensor vectors_t = at::empty({b, n, n}, g.options());
  at::Tensor sweeps = at::zeros({b}, g.options().dtype(at::kInt));
  if (b == 0 || n == 0) return {values, vectors_t.transpose(1, 2), sweeps};

  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int cap = J::shared_capacity(n, optin);
  TORCH_CHECK(cap >= 0, "batched Jacobi: n = ", n, " needs more shared memory than this device's ",
              optin, " bytes per block");
  const int64_t spill_stride = J::storage_size(n) - cap;
  at::Tensor spill = at::empty({spill_stride > 0 ? b * spill_stride : 1}, g.options());
  const int shared = J::fixed_shared_bytes(n) + cap * int(sizeof(double));
  const auto kernel = spill_stride > 0 ? jacobi_eigh_kernel<true> : jacobi_eigh_kernel<false>;
  // The device's maximum, not this call's size: a smaller value set by one host thread could
  // otherwise land between another thread's setting and its launch.
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  kernel<<<static_cast<unsigned>(b), J::threads_for(n), shared,
           c10::cuda::getCurrentCUDAStream()>>>(
      g.data_ptr<double>(), n, cap, spill.data_ptr<double>(), spill_stride,
      values.data_ptr<double>(), vectors_t.data_ptr<double>(), sweeps.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {values, vectors_t.transpose(1, 2), sweeps};
}

TORCH_LIBRARY_FRAGMENT(pccfast, m) {
  // gram: (B, n, n) float64 CUDA, symmetric -> (eigenvalues (B, n) ascending, eigenvectors
  // (B, n, n) as columns), like torch.linalg.eigh; the batched Jacobi kernel for every n.
  m.def("batched_eigh(Tensor gram) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pccfast, CUDA, m) { m.impl("batched_eigh", &batched_eigh_cuda); }

}  // namespace pccfast
