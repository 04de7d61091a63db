// Batched float64 GEMM whose operands are read in their own dtype (fp16/bf16/fp32/fp64) with
// arbitrary strides: out[b] (M x N) = left[b] (M x K) @ right[b] (K x N). It forms the Gram
// matrices of CI straight from the activations (no converted copy) and the projections A V.
//
// One block of kThreads threads per kTile x kTile output tile; per reduction slice of kTileK,
// every thread loads its elements of both operand slices into shared memory (converting to
// float64), then accumulates its 4 x 4 outputs. The per-thread steps below are shared by the
// CUDA kernel (kernels/ci_cuda.cu) and its host emulation (csrc/ci_cuda_emulation.cpp), which
// runs them for every thread in the kernel's order, so the CPU tests check this index math.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "jacobi_eigh.cuh"  // PCCFAST_HD

namespace pccfast {
namespace gemm {

constexpr int kTile = 64;      // output tile (kTile x kTile)
constexpr int kTileK = 16;     // reduction slice held in shared memory
constexpr int kThreads = 256;  // kSub x kSub threads, 4 x 4 outputs each
constexpr int kSub = 16;
constexpr int kPad = kTile + 1;  // shared rows padded by one: conflict-free stores along k

// Element (b, i, k) of a batched matrix at data[b * batch + i * row + k * col].
struct Operand {
  const void* data;
  int64_t batch, row, col;
};

struct Shape {
  int m_rows, n_cols, k_depth;
  bool symmetric;  // right = left^T: only tiles on or below the diagonal, mirrored on store
};

template <typename T>
PCCFAST_HD double to_double(T x) {
  return static_cast<double>(static_cast<float>(x));  // c10::Half, c10::BFloat16: exact
}
PCCFAST_HD double to_double(float x) { return static_cast<double>(x); }
PCCFAST_HD double to_double(double x) { return x; }

PCCFAST_HD bool tile_runs(const Shape& shape, int tile_i, int tile_j) {
  return !(shape.symmetric && tile_j > tile_i);
}

// Load step of thread `tid` for the slice at k0: its elements of left[i0.., k0..] into
// left_tile[k][i] and of right[k0.., j0..] into right_tile[k][j] (zero outside the matrix).
// Consecutive threads walk an operand's unit-stride dimension when it has one (coalescing).
template <typename L, typename R>
PCCFAST_HD void load_slice(int tid, const L* lp, const Operand& left, const R* rp,
                           const Operand& right, const Shape& shape, int i0, int j0, int k0,
                           double (*left_tile)[kPad], double (*right_tile)[kPad]) {
  const bool left_along_k = left.col == 1 && left.row != 1;
  const bool right_along_j = right.col == 1 || right.row != 1;
  for (int r = 0; r < kTile * kTileK / kThreads; ++r) {
    const int e = tid + r * kThreads;
    const int li = left_along_k ? e / kTileK : e % kTile;
    const int lk = left_along_k ? e % kTileK : e / kTile;
    const int gi = i0 + li, gk = k0 + lk;
    left_tile[lk][li] = gi < shape.m_rows && gk < shape.k_depth
                            ? to_double(lp[int64_t(gi) * left.row + int64_t(gk) * left.col])
                            : 0.0;
    const int rj = right_along_j ? e % kTile : e / kTileK;
    const int rk = right_along_j ? e / kTile : e % kTileK;
    const int gj = j0 + rj, gr = k0 + rk;
    right_tile[rk][rj] = gj < shape.n_cols && gr < shape.k_depth
                             ? to_double(rp[int64_t(gr) * right.row + int64_t(gj) * right.col])
                             : 0.0;
  }
}

// Accumulate step of thread `tid`: acc[u][v] += sum_k left(ty + kSub u, k) right(k, tx + kSub v)
// over the slice, in k order, one fma each.
PCCFAST_HD void accumulate_slice(int tid, const double (*left_tile)[kPad],
                                 const double (*right_tile)[kPad], double (*acc)[4]) {
  const int tx = tid % kSub, ty = tid / kSub;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < kTileK; ++k) {
    double lv[4], rv[4];
    for (int u = 0; u < 4; ++u) {
      lv[u] = left_tile[k][ty + kSub * u];
      rv[u] = right_tile[k][tx + kSub * u];
    }
    for (int u = 0; u < 4; ++u) {
      for (int v = 0; v < 4; ++v) acc[u][v] = ::fma(lv[u], rv[v], acc[u][v]);
    }
  }
}

// Store step of thread `tid`: its outputs of tile (i0, j0) into o (M x N, contiguous); for
// symmetric products also the mirrored entry. On diagonal tiles (i, j) and (j, i) are the same
// products summed in the same order, so both writes carry the same bits.
PCCFAST_HD void store_tile(int tid, const double (*acc)[4], double* o, const Shape& shape, int i0,
                           int j0) {
  const int tx = tid % kSub, ty = tid / kSub;
  for (int u = 0; u < 4; ++u) {
    for (int v = 0; v < 4; ++v) {
      const int gi = i0 + ty + kSub * u, gj = j0 + tx + kSub * v;
      if (gi < shape.m_rows && gj < shape.n_cols) {
        o[int64_t(gi) * shape.n_cols + gj] = acc[u][v];
        if (shape.symmetric) o[int64_t(gj) * shape.n_cols + gi] = acc[u][v];
      }
    }
  }
}

}  // namespace gemm
}  // namespace pccfast
