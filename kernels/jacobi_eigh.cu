// Batched symmetric eigensolver for many small float64 matrices: one thread block per matrix,
// parallel-order Jacobi rotations (the algorithm and its host twin: kernels/jacobi_eigh.cuh).
//
// Why: torch.linalg.eigh on CUDA runs cuSOLVER's batched Jacobi only up to n = 32 and loops
// over the matrices one at a time above, which leaves the GPU idle for the hundreds of
// 64..256-sized Gram matrices a CI pass produces.
//
// Memory: each block keeps its matrix's working storage (packed lower triangle of A, then V^T:
// n(n+1)/2 + n^2 doubles) in shared memory as far as the device's per-block limit allows
// (227 KB on H100/H200: everything up to n = 96, all of A up to n = 236) and the rest in a
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

constexpr int kMaxThreads = 512;
constexpr int kWarp = 32;

// The first `cap` doubles of a matrix's storage live in shared memory, the rest in `spill`.
struct SplitStorage {
  double* shared;
  double* spill;
  int cap;
  __device__ __forceinline__ double& operator[](int i) const {
    return i < cap ? shared[i] : spill[i - cap];
  }
};

// Threads per block: enough for the ~n^2/8 blocks and n^2/2 vector entries of a round.
int jacobi_threads(int n) { return n <= 16 ? 64 : n <= 32 ? 128 : n <= 64 ? 256 : kMaxThreads; }

// Bytes of the fixed shared arrays: cos, sin (pairs doubles each), two reduction rows
// (2 * kWarp doubles), then pair indices (2 * pairs ints) and ranks (n ints).
__host__ __device__ __forceinline__ int fixed_shared_bytes(int n) {
  const int pairs = jacobi::pair_count(n);
  const int doubles = 2 * pairs + 2 * kWarp;
  const int ints = 2 * pairs + n;
  return doubles * int(sizeof(double)) + ((ints * int(sizeof(int)) + 15) / 16) * 16;
}

// Sums of (x, y) over the block, returned to every thread. `scratch` holds 2 * kWarp doubles.
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

// grid: one block per matrix. gram (B, n, n) contiguous; values (B, n); vectors_t (B, n, n)
// with row k = eigenvector of values[k]; sweeps (B,).
__global__ void __launch_bounds__(kMaxThreads)
    jacobi_eigh_kernel(const double* __restrict__ gram, int n, int cap, double* spill,
                       int64_t spill_stride, double* __restrict__ values,
                       double* __restrict__ vectors_t, int* __restrict__ sweeps_out) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  namespace J = jacobi;
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, threads = blockDim.x;
  const int lane = tid % kWarp, warp = tid / kWarp, warps = threads / kWarp;
  const int pairs = J::pair_count(n), rounds = J::round_count(n), items = J::block_items(n);

  double* cosines = reinterpret_cast<double*>(shared_bytes);
  double* sines = cosines + pairs;
  double* scratch = sines + pairs;
  int* firsts = reinterpret_cast<int*>(scratch + 2 * kWarp);
  int* seconds = firsts + pairs;
  int* ranks = seconds + pairs;
  double* storage = reinterpret_cast<double*>(shared_bytes + fixed_shared_bytes(n));
  const SplitStorage a{storage, spill + b * spill_stride, cap};

  // Load the lower triangle; V^T = I.
  const double* g = gram + b * int64_t(n) * n;
  double largest = 0.0;
  for (int e = tid; e < n * n; e += threads) {
    const int i = e / n, j = e - i * n;
    if (j <= i) {
      const double x = g[e];
      a[J::packed_index(i, j)] = x;
      largest = fmax(largest, fabs(x));
    }
    a[J::vector_index(n, i, j)] = i == j ? 1.0 : 0.0;
  }
  const double scale = J::norm_scale(block_max(largest, scratch));  // syncs: A is loaded

  int sweeps = -1;
  for (int sweep = 0;; ++sweep) {
    double off2 = 0.0, diag2 = 0.0;
    for (int e = tid; e < n * n; e += threads) {
      const int i = e / n, j = e - i * n;
      if (j <= i) J::add_norm_terms(a, i, j, scale, &off2, &diag2);
    }
    block_sum2(&off2, &diag2, scratch);
    if (J::converged(off2, diag2)) {
      sweeps = sweep;
      break;
    }
    if (sweep == J::kMaxSweeps) break;
    for (int round = 0; round < rounds; ++round) {
      for (int k = tid; k < pairs; k += threads) {
        int p, q;
        J::round_pair(round, k, n, &p, &q);
        firsts[k] = p;
        seconds[k] = q;
        J::rotate_pair(a, n, p, q, &cosines[k], &sines[k]);
      }
      __syncthreads();
      for (int item = tid; item < items; item += threads) {
        int k, l;
        if (J::block_item(item, pairs, &k, &l)) {
          J::rotate_block(a, n, firsts[k], seconds[k], cosines[k], sines[k], firsts[l],
                          seconds[l], cosines[l], sines[l]);
        }
      }
      for (int k = warp; k < pairs; k += warps) {  // a warp per pair: coalesced V^T rows
        const int p = firsts[k], q = seconds[k];
        if (q >= n) continue;
        const double c = cosines[k], s = sines[k];
        for (int j = lane; j < n; j += kWarp) J::rotate_vectors(a, n, p, q, c, s, j);
      }
      __syncthreads();
    }
  }

  // Ascending order, ties by index.
  for (int i = tid; i < n; i += threads) ranks[i] = J::sorted_rank(a, n, i);
  __syncthreads();
  for (int i = tid; i < n; i += threads) values[b * n + ranks[i]] = a[J::packed_index(i, i)];
  double* out = vectors_t + b * int64_t(n) * n;
  for (int i = warp; i < n; i += warps) {
    const int row = ranks[i];
    for (int j = lane; j < n; j += kWarp) out[row * n + j] = a[J::vector_index(n, i, j)];
  }
  if (tid == 0) sweeps_out[b] = sweeps;
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
  const size_t fixed = size_t(fixed_shared_bytes(n));
  TORCH_CHECK(size_t(optin) > fixed + 1024, "batched Jacobi: n = ", n,
              " needs more shared memory than this device has");
  const int total = jacobi::storage_size(n);
  const int cap = static_cast<int>(std::min<size_t>(total, (size_t(optin) - fixed) / sizeof(double)));
  const int64_t spill_stride = total - cap;
  at::Tensor spill = at::empty({spill_stride > 0 ? b * spill_stride : 1}, g.options());
  const size_t shared = fixed + size_t(cap) * sizeof(double);
  C10_CUDA_CHECK(cudaFuncSetAttribute(jacobi_eigh_kernel,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(shared)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  jacobi_eigh_kernel<<<static_cast<unsigned>(b), jacobi_threads(n), shared, stream>>>(
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
