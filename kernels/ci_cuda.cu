// CI on CUDA (SPEC section 2): pccfast::channel_independence for CUDA tensors.
//
// Per chunk of images, straight from the activations as given (fp16/bf16/fp32/fp64, any
// strides; nothing converted or copied):
//   1. the Gram matrix on the small side, G = A A^T (C <= P) or A^T A (P < C), float64, by a
//      tiled kernel that converts each element on load and accumulates in float64 (lower tiles
//      only, mirrored);
//   2. its eigendecomposition: the batched Jacobi kernel (kernels/jacobi_eigh.cu) for
//      m <= kJacobiMaxSize, torch.linalg.eigh (cuSOLVER) above;
//   3. for P < C the projections A V (B, C, m) by the same tiled kernel, again reading A in its
//      own dtype;
//   4. the shared quadrature (csrc/ci_quadrature.cpp, ATen ops that run on the GPU as they are).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>

#include "ci_cuda.h"
#include "ci_quadrature.h"

namespace pccfast {
namespace {

// Eigensolver choice for the Gram matrices: the Jacobi kernel up to this size, cuSOLVER
// (torch.linalg.eigh, one matrix at a time above n = 32) beyond. An estimate from operation
// and traffic counts (the kernel's storage spills past shared memory above n ~ 96 and past
// L2 for n ~ 512 at 132 resident matrices); benchmarks/gpu/bench_ci.py measures both, and
// PCCFAST_CI_EIGH=jacobi|torch|auto overrides the choice.
constexpr int64_t kJacobiMaxSize = 256;
// Elements of float64 intermediates per chunk (quadrature (B, C, nodes) tensors, weights,
// Gram and eigenvector matrices): 512 MB, so a chunk holds enough images to fill the GPU.
constexpr int64_t kChunkElements = int64_t(64) << 20;
// Upper estimate of the quadrature nodes per image (body + lower extension).
constexpr int64_t kNodesEstimate = 256;

// ---- Tiled float64 GEMM with operands read in their own dtype --------------------------------

constexpr int kTile = 64;      // output tile (kTile x kTile)
constexpr int kTileK = 16;     // reduction slice held in shared memory
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
constexpr int kSub = 16;

// Element (b, i, k) of a batched matrix at data[b * batch + i * row + k * col].
struct Operand {
  const void* data;
  int64_t batch, row, col;
};

template <typename T>
__device__ __forceinline__ double to_double(T x) {
  return static_cast<double>(static_cast<float>(x));  // c10::Half, c10::BFloat16
}
__device__ __forceinline__ double to_double(float x) { return static_cast<double>(x); }
__device__ __forceinline__ double to_double(double x) { return x; }

// out[b] (M x N, contiguous) = left[b] (M x K) @ right[b] (K x N), float64 accumulation.
// symmetric: right[b] = left[b]^T; only tiles on or below the diagonal run, mirrored on store.
// grid: (B, tiles of M, tiles of N).
template <typename L, typename R>
__global__ void __launch_bounds__(kThreads)
    gemm_f64_kernel(Operand left, Operand right, double* __restrict__ out, int m_rows, int n_cols,
                    int k_depth, bool symmetric) {
  const int tile_i = blockIdx.y, tile_j = blockIdx.z;
  if (symmetric && tile_j > tile_i) return;
  __shared__ double left_tile[kTileK][kTile + 1];  // +1: conflict-free stores along k
  __shared__ double right_tile[kTileK][kTile + 1];
  const int64_t b = blockIdx.x;
  const L* lp = static_cast<const L*>(left.data) + b * left.batch;
  const R* rp = static_cast<const R*>(right.data) + b * right.batch;
  const int tid = threadIdx.x, tx = tid % kSub, ty = tid / kSub;
  const int i0 = tile_i * kTile, j0 = tile_j * kTile;
  // Consecutive threads walk the operand's unit-stride dimension when it has one.
  const bool left_along_k = left.col == 1 && left.row != 1;
  const bool right_along_j = right.col == 1 || right.row != 1;
  double acc[4][4] = {};
  for (int k0 = 0; k0 < k_depth; k0 += kTileK) {
#pragma unroll
    for (int r = 0; r < kTile * kTileK / kThreads; ++r) {
      const int e = tid + r * kThreads;
      const int li = left_along_k ? e / kTileK : e % kTile;
      const int lk = left_along_k ? e % kTileK : e / kTile;
      const int gi = i0 + li, gk = k0 + lk;
      left_tile[lk][li] = gi < m_rows && gk < k_depth
                              ? to_double(lp[int64_t(gi) * left.row + int64_t(gk) * left.col])
                              : 0.0;
      const int rj = right_along_j ? e % kTile : e / kTileK;
      const int rk = right_along_j ? e / kTile : e % kTileK;
      const int gj = j0 + rj, gr = k0 + rk;
      right_tile[rk][rj] = gj < n_cols && gr < k_depth
                               ? to_double(rp[int64_t(gr) * right.row + int64_t(gj) * right.col])
                               : 0.0;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      double lv[4], rv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        lv[u] = left_tile[k][ty + kSub * u];
        rv[u] = right_tile[k][tx + kSub * u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] = fma(lv[u], rv[v], acc[u][v]);
      }
    }
    __syncthreads();
  }
  double* o = out + b * int64_t(m_rows) * n_cols;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int gi = i0 + ty + kSub * u, gj = j0 + tx + kSub * v;
      if (gi < m_rows && gj < n_cols) {
        o[int64_t(gi) * n_cols + gj] = acc[u][v];
        // Diagonal tiles: (i, j) and (j, i) are the same products summed in the same order.
        if (symmetric) o[int64_t(gj) * n_cols + gi] = acc[u][v];
      }
    }
  }
}

template <typename L, typename R>
void launch_gemm(const Operand& left, const Operand& right, at::Tensor& out, int64_t k_depth,
                 bool symmetric) {
  const int64_t b = out.size(0), m_rows = out.size(1), n_cols = out.size(2);
  if (b == 0 || m_rows == 0 || n_cols == 0) return;
  const dim3 grid(static_cast<unsigned>(b), static_cast<unsigned>((m_rows + kTile - 1) / kTile),
                  static_cast<unsigned>((n_cols + kTile - 1) / kTile));
  gemm_f64_kernel<L, R><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      left, right, out.data_ptr<double>(), static_cast<int>(m_rows), static_cast<int>(n_cols),
      static_cast<int>(k_depth), symmetric);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Operand operand(const at::Tensor& t, int64_t row_dim, int64_t col_dim) {
  return {t.data_ptr(), t.stride(0), t.stride(row_dim), t.stride(col_dim)};
}

void check_gemm_sizes(int64_t m_rows, int64_t n_cols, int64_t k_depth, int64_t b) {
  TORCH_CHECK_VALUE(m_rows <= std::numeric_limits<int>::max() / 2 &&
                        n_cols <= std::numeric_limits<int>::max() / 2 &&
                        k_depth <= std::numeric_limits<int>::max() / 2,
                    "fmaps: dimensions too large for the CI kernels");
  TORCH_CHECK_VALUE(b <= std::numeric_limits<int>::max(), "fmaps: too many images in one call");
  TORCH_CHECK_VALUE((m_rows + kTile - 1) / kTile <= 65535 && (n_cols + kTile - 1) / kTile <= 65535,
                    "fmaps: dimensions too large for the CI kernels");
}

// a: (B, C, P) any float dtype, any strides -> (B, m, m) float64: A A^T (C <= P) or A^T A.
at::Tensor small_side_gram_cuda(const at::Tensor& a) {
  const int64_t b = a.size(0), c = a.size(1), p = a.size(2);
  const bool rows = c <= p;  // Gram of the rows (channels) or of the columns (pixels)
  const int64_t m = rows ? c : p, depth = rows ? p : c;
  check_gemm_sizes(m, m, depth, b);
  at::Tensor out = at::empty({b, m, m}, a.options().dtype(at::kDouble));
  // X (B, m, depth) with G = X X^T; right = X^T as (B, depth, m).
  const Operand left = rows ? operand(a, 1, 2) : operand(a, 2, 1);
  const Operand right = rows ? operand(a, 2, 1) : operand(a, 1, 2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "ci_gram", [&] {
    launch_gemm<scalar_t, scalar_t>(left, right, out, depth, /*symmetric=*/true);
  });
  return out;
}

// a: (B, C, P) any float dtype, v: (B, P, m) float64 -> A V: (B, C, m) float64.
at::Tensor project_cuda(const at::Tensor& a, const at::Tensor& v) {
  const int64_t b = a.size(0), c = a.size(1), p = a.size(2), m = v.size(2);
  check_gemm_sizes(c, m, p, b);
  at::Tensor out = at::empty({b, c, m}, a.options().dtype(at::kDouble));
  const Operand left = operand(a, 1, 2);
  const Operand right = operand(v, 1, 2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "ci_project", [&] {
    launch_gemm<scalar_t, double>(left, right, out, p, /*symmetric=*/false);
  });
  return out;
}

// ---- The operator ---------------------------------------------------------------------------

bool use_jacobi(int64_t m) {
  const char* env = std::getenv("PCCFAST_CI_EIGH");
  const std::string choice = env == nullptr ? "auto" : env;
  if (choice == "jacobi") return true;
  if (choice == "torch") return false;
  TORCH_CHECK_VALUE(choice == "auto" || choice.empty(),
                    "PCCFAST_CI_EIGH must be one of auto, jacobi, torch, got '", choice, "'");
  return m <= kJacobiMaxSize;
}

int64_t gpu_chunk(int64_t c, int64_t p) {
  const int64_t m = std::min(c, p);
  const int64_t per_image = (2 * c + m) * kNodesEstimate + c * m + 4 * m * m;
  return std::max<int64_t>(1, kChunkElements / std::max<int64_t>(per_image, 1));
}

// The P < C branch of spectral_weights (csrc/ci_quadrature.cpp) with A V from project_cuda:
// the same deflation, weights (A V)^2 / lam and null weight.
std::tuple<at::Tensor, at::Tensor, at::Tensor> wide_spectral_weights(
    const at::Tensor& eigenvalues, const at::Tensor& projections) {
  const int64_t m = eigenvalues.size(1);
  const double tolerance = double(m) * std::numeric_limits<double>::epsilon();
  const at::Tensor largest = eigenvalues.amax(-1, /*keepdim=*/true).clamp_min(0.0);
  const at::Tensor kept = eigenvalues > largest * tolerance;
  const at::Tensor lam = at::where(kept, eigenvalues, at::zeros_like(eigenvalues));
  const at::Tensor kept_columns = kept.unsqueeze(1).to(at::kDouble);
  const at::Tensor safe = at::where(kept, eigenvalues, at::ones_like(eigenvalues));
  const at::Tensor weights =
      projections.square().div_(safe.unsqueeze(1)).mul_(kept_columns);
  const at::Tensor null = (1.0 - weights.sum(-1)).clamp_min(0.0);
  return {lam, weights, null};
}

at::Tensor channel_independence_cuda(const at::Tensor& fmaps) {
  TORCH_CHECK_VALUE(fmaps.dim() == 3, "fmaps must have shape (B, C, P), got ", fmaps.sizes());
  TORCH_CHECK_VALUE(fmaps.numel() > 0, "fmaps must not be empty, got ", fmaps.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(fmaps.scalar_type()), "fmaps must be a float tensor, got ",
                   fmaps.scalar_type());
  const c10::cuda::CUDAGuard guard(fmaps.device());
  const int64_t b = fmaps.size(0), c = fmaps.size(1), p = fmaps.size(2), m = std::min(c, p);
  const bool jacobi = use_jacobi(m);
  at::Tensor out = at::empty({b, c}, fmaps.options().dtype(at::kDouble));
  const int64_t chunk = gpu_chunk(c, p);
  for (int64_t i0 = 0; i0 < b; i0 += chunk) {
    const int64_t count = std::min(chunk, b - i0);
    const at::Tensor a = fmaps.narrow(0, i0, count);
    const at::Tensor gram = small_side_gram_cuda(a);
    at::Tensor values, vectors;
    if (jacobi) {
      at::Tensor sweeps;
      std::tie(values, vectors, sweeps) = jacobi_eigh_cuda(gram);
      check_jacobi_converged(sweeps, "channel_independence");
    } else {
      std::tie(values, vectors) = at::linalg_eigh(gram);
    }
    at::Tensor lam, weights, null;
    if (c <= p) {
      // Uses only the sizes of `a` on this branch: W = U^2.
      std::tie(lam, weights, null) = spectral_weights(a, values, vectors);
    } else {
      std::tie(lam, weights, null) = wide_spectral_weights(values, project_cuda(a, vectors));
    }
    out.narrow(0, i0, count).copy_(ci_quadrature(lam, weights, null));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pccfast, CUDA, m) {
  m.impl("channel_independence", &channel_independence_cuda);
}

}  // namespace pccfast
