// PCC "abs" of one group whose rows have few features (5 to 32: 3x3 and 4x4 maps). There each
// entry of R = Vhat Vhat^T takes only K multiply-adds, and BLAS's thin products plus the passes
// over R that "abs" needs (|R| summed; sign(R) formed, then multiplied back into D Vhat) cost
// about what the multiply-adds do. These loops form R in registers, a tile of 4 rows against
// 2 vectors of columns, and use it at once: the forward adds up |R| over the tiles of the upper
// triangle; the backward turns each upper tile into D = factor * sign(R) and multiplies it into
// both sides of D Vhat (its rows' block through a (4, M) strip of D in L1, its columns' into a
// transposed accumulator), 1.5 M^2 K multiply-adds against 1.56 for the BLAS staircase. Nothing
// of size M x M is stored; the backward forms R again (no sign codes are kept for these rows).
//
// Rows and columns are padded with zero rows (R = 0 there, so |R| = sign(R) = 0) and features
// with zeros (which add nothing to a product), so every tile is whole.
#pragma once

#include "pcc_short_rows.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace pccfast {

// Rows of (kShortRowFeatures, kFusedRowMaxFeatures] features take these loops for "abs",
// where the padded rows (Mp, Kp) are at most kFusedRowMaxValues values (16 KB of fp32: with
// their transpose and the transposed gradient, within L1) and the forward keeps no signs of R
// (pcc_cpu.cpp, fused_rows). Measured at batch 128, 1 thread, forward + backward against the
// BLAS staircase: (M, K) = (128, 16) 4.2 vs 4.9 ms, (256, 16) 12.1 vs 14.2; (512, 16) even;
// (256, 64) 1.6x slower (the rows spill from L1); (64, 64) 2.6 vs 1.7 ms for the backward
// alone against the kept signs' one product. With both limits no K past 32 qualifies.
constexpr int64_t kFusedRowMaxFeatures = 32;
constexpr int64_t kFusedRowMaxValues = 4096;

constexpr int64_t kFusedBlockRows = 4;  // rows of a register tile
constexpr int64_t kFusedRowPad = 16;    // rows padded to whole tiles (2 fp32 vectors)
constexpr int64_t kFusedFeaturePad = 8;  // features padded to whole fp32 vectors

inline int64_t fused_rows_padded(int64_t m) {
  return (m + kFusedRowPad - 1) / kFusedRowPad * kFusedRowPad;
}
inline int64_t fused_features_padded(int64_t k) {
  return (k + kFusedFeaturePad - 1) / kFusedFeaturePad * kFusedFeaturePad;
}

// Values of scratch for one group: the padded rows (Mp, Kp), their transpose (Kp, Mp), a block
// of D's rows (4, Mp) and the padded D Vhat (Mp, Kp).
inline int64_t fused_rows_scratch(int64_t m, int64_t k) {
  const int64_t mp = fused_rows_padded(m), kp = fused_features_padded(k);
  return 4 * mp * kp + kFusedBlockRows * mp;
}

// vp (Mp, Kp) and vt (Kp, Mp) from v (M, K), zero-padded.
template <typename acc_t>
void fused_pad_rows(const acc_t* v, int64_t m, int64_t k, acc_t* vp, acc_t* vt) {
  const int64_t mp = fused_rows_padded(m), kp = fused_features_padded(k);
  std::fill(vp, vp + mp * kp, acc_t(0));
  std::fill(vt, vt + mp * kp, acc_t(0));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t f = 0; f < k; ++f) {
      vp[i * kp + f] = v[i * k + f];
      vt[f * mp + i] = v[i * k + f];
    }
  }
}

// a[r][h] = K R[i0 + r, c + h W + lane] (raw products) for r < 4, h < 2.
template <typename acc_t, typename vec>
PCCFAST_INLINE void fused_tile(const acc_t* vp, const acc_t* vt, int64_t mp, int64_t kp,
                               int64_t i0, int64_t c, vec (&a)[kFusedBlockRows][2]) {
  constexpr int64_t W = ShortVec<acc_t>::lanes, RB = kFusedBlockRows;
  for (int64_t r = 0; r < RB; ++r) a[r][0] = a[r][1] = vec{};
  const acc_t* rows = vp + i0 * kp;
  const acc_t* cols = vt + c;
#pragma GCC unroll 2
  for (int64_t f = 0; f < kp; ++f, cols += mp) {
    vec c0, c1;
    load_vec(c0, cols);
    load_vec(c1, cols + W);
#pragma GCC unroll 4
    for (int64_t r = 0; r < RB; ++r) {
      const vec b = rows[r * kp + f] - vec{};  // a broadcast (x - 0 is x)
      a[r][0] += b * c0;
      a[r][1] += b * c1;
    }
  }
}

// sum over i < j of |K R[i, j]| (raw products; padded rows add 0).
template <typename acc_t>
PCCFAST_INLINE double fused_phi_impl(const acc_t* vp, const acc_t* vt, int64_t mp, int64_t kp) {
  using V = ShortVec<acc_t>;
  using vec = typename V::vec;
  using bits = typename V::bits;
  using lane_int = std::remove_reference_t<decltype(bits{}[0])>;
  constexpr int64_t W = V::lanes, RB = kFusedBlockRows, T = 2 * W;
  const bits magnitude = bits{} + std::numeric_limits<lane_int>::max();  // all but the sign
  bits lane{};
  for (int64_t l = 0; l < W; ++l) lane[l] = lane_int(l);
  double total = 0.0;
  for (int64_t i0 = 0; i0 < mp; i0 += RB) {
    vec sum[2] = {vec{}, vec{}};
    vec a[RB][2];
    // The first tile holds the block's diagonal (4 | i0, 4 | T): only its columns j > i.
    int64_t c = i0 / T * T;
    fused_tile(vp, vt, mp, kp, i0, c, a);
    for (int64_t r = 0; r < RB; ++r) {
      for (int64_t h = 0; h < 2; ++h) {
        const bits upper = lane + lane_int(c + h * W) > lane_int(i0 + r);
        sum[h] += (vec)((bits)a[r][h] & magnitude & upper);
      }
    }
    for (c += T; c < mp; c += T) {
      fused_tile(vp, vt, mp, kp, i0, c, a);
      for (int64_t r = 0; r < RB; ++r) {
        sum[0] += (vec)((bits)a[r][0] & magnitude);
        sum[1] += (vec)((bits)a[r][1] & magnitude);
      }
    }
    total += lane_sum(sum[0]) + lane_sum(sum[1]);
  }
  return total;
}

// D Vhat with D = coef * sign(K R), its diagonal zero unless `diagonal`, as dvp (Mp, Kp) plus
// dvt (Kp, Mp) transposed (dvt zero on entry). D is symmetric: row block I of 4 rows forms the
// tiles of R from its own diagonal on, keeps D[I, j >= i0] in d (4, Mp) for dvp[I] = D[I, i0:]
// Vhat[i0:], and adds D[I, j]^T Vhat[I] for the columns j past the block into dvt right away.
// Rows of dvp past m are left as they were.
template <typename acc_t>
PCCFAST_INLINE void fused_gradient_impl(const acc_t* vp, const acc_t* vt, int64_t m, int64_t mp,
                                        int64_t kp, acc_t coef, bool diagonal, acc_t* d,
                                        acc_t* dvp, acc_t* dvt) {
  using V = ShortVec<acc_t>;
  using vec = typename V::vec;
  using bits = typename V::bits;
  using lane_int = std::remove_reference_t<decltype(bits{}[0])>;
  constexpr int64_t W = V::lanes, RB = kFusedBlockRows, T = 2 * W;
  const bits sign_bit = bits{} + std::numeric_limits<lane_int>::min();
  const bits one = (bits)(vec{} + acc_t(1));
  bits lane{};
  for (int64_t l = 0; l < W; ++l) lane[l] = lane_int(l);
  for (int64_t i0 = 0; i0 < m; i0 += RB) {
    const int64_t first = i0 / T * T;  // the tile holding the block's diagonal (4 | i0, 4 | T)
    const acc_t* rows = vp + i0 * kp;
    vec a[RB][2];
    for (int64_t c = first; c < mp; c += T) {
      fused_tile(vp, vt, mp, kp, i0, c, a);
      vec s[RB][2];
      for (int64_t r = 0; r < RB; ++r) {
        for (int64_t h = 0; h < 2; ++h) {
          s[r][h] = (vec)((((bits)a[r][h] & sign_bit) | one) & (a[r][h] != 0)) * coef;
          if (c == first) {
            // D[I, j] for j >= i0 (the diagonal out unless `diagonal`) into d; only the
            // columns past the block (j >= i0 + 4) are scattered into dvt.
            const bits j = lane + lane_int(c + h * W);
            const bits upper = j >= lane_int(i0);
            const bits keep = diagonal ? upper : upper & (j != lane_int(i0 + r));
            vec kept = (vec)((bits)s[r][h] & keep);
            std::memcpy(d + r * mp + c + h * W, &kept, sizeof(vec));
            s[r][h] = (vec)((bits)s[r][h] & (j >= lane_int(i0 + RB)));
          } else {
            std::memcpy(d + r * mp + c + h * W, &s[r][h], sizeof(vec));
          }
        }
      }
      // dvt[:, c : c + T] += D[I, c : c + T]^T Vhat[I]
      acc_t* out = dvt + c;
#pragma GCC unroll 2
      for (int64_t f = 0; f < kp; ++f, out += mp) {
        vec u0, u1;
        load_vec(u0, out);
        load_vec(u1, out + W);
#pragma GCC unroll 4
        for (int64_t r = 0; r < RB; ++r) {
          const vec b = rows[r * kp + f] - vec{};  // a broadcast (x - 0 is x)
          u0 += b * s[r][0];
          u1 += b * s[r][1];
        }
        std::memcpy(out, &u0, sizeof(vec));
        std::memcpy(out + W, &u1, sizeof(vec));
      }
    }
    // dvp[i0 : i0 + 4, :] = D[I, first:] Vhat[first:], two vectors of features at a time
    // (then one).
    int64_t f = 0;
    for (; f + T <= kp; f += T) {
      vec acc[RB][2];
      for (int64_t r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = vec{};
      const acc_t* row = vp + first * kp + f;
#pragma GCC unroll 2
      for (int64_t j = first; j < m; ++j, row += kp) {
        vec w0, w1;
        load_vec(w0, row);
        load_vec(w1, row + W);
#pragma GCC unroll 4
        for (int64_t r = 0; r < RB; ++r) {
          const vec b = d[r * mp + j] - vec{};
          acc[r][0] += b * w0;
          acc[r][1] += b * w1;
        }
      }
      for (int64_t r = 0; r < RB; ++r) {
        std::memcpy(dvp + (i0 + r) * kp + f, &acc[r][0], sizeof(vec));
        std::memcpy(dvp + (i0 + r) * kp + f + W, &acc[r][1], sizeof(vec));
      }
    }
    for (; f < kp; f += W) {
      vec acc[RB];
      for (int64_t r = 0; r < RB; ++r) acc[r] = vec{};
      const acc_t* row = vp + first * kp + f;
      for (int64_t j = first; j < m; ++j, row += kp) {
        vec w;
        load_vec(w, row);
        for (int64_t r = 0; r < RB; ++r) acc[r] += (d[r * mp + j] - vec{}) * w;
      }
      for (int64_t r = 0; r < RB; ++r) std::memcpy(dvp + (i0 + r) * kp + f, &acc[r], sizeof(vec));
    }
  }
}

PCCFAST_FMA_CLONES inline double fused_phi(const float* vp, const float* vt, int64_t mp,
                                           int64_t kp) {
  return fused_phi_impl(vp, vt, mp, kp);
}
PCCFAST_FMA_CLONES inline double fused_phi(const double* vp, const double* vt, int64_t mp,
                                           int64_t kp) {
  return fused_phi_impl(vp, vt, mp, kp);
}
PCCFAST_FMA_CLONES inline void fused_gradient(const float* vp, const float* vt, int64_t m,
                                              int64_t mp, int64_t kp, float coef, bool diagonal,
                                              float* d, float* dvp, float* dvt) {
  fused_gradient_impl(vp, vt, m, mp, kp, coef, diagonal, d, dvp, dvt);
}
PCCFAST_FMA_CLONES inline void fused_gradient(const double* vp, const double* vt, int64_t m,
                                              int64_t mp, int64_t kp, double coef,
                                              bool diagonal, double* d, double* dvp,
                                              double* dvt) {
  fused_gradient_impl(vp, vt, m, mp, kp, coef, diagonal, d, dvp, dvt);
}

// sum over the pairs of |R| for one group: v (M, K) normalised rows, scratch of
// fused_rows_scratch(M, K) values.
template <typename acc_t>
double fused_rows_phi_sum(const acc_t* v, acc_t* scratch, int64_t m, int64_t k,
                          bool include_diagonal) {
  const int64_t mp = fused_rows_padded(m), kp = fused_features_padded(k);
  acc_t* vp = scratch;
  acc_t* vt = vp + mp * kp;
  fused_pad_rows(v, m, k, vp, vt);
  const double inv_k = 1.0 / double(k);
  double diagonal = 0.0;
  if (include_diagonal) {
    for (int64_t i = 0; i < m; ++i) {
      diagonal += std::abs(double(backward_sums(v + i * k, v + i * k, k).vv) * inv_k);
    }
  }
  return 2.0 * fused_phi(vp, vt, mp, kp) * inv_k + diagonal;
}

// dvhat (M, K) = D Vhat for one group, D = factor * sign(R), its diagonal zero unless
// `include_diagonal`. Scratch: fused_rows_scratch(M, K) values.
template <typename acc_t>
void fused_rows_gradient(const acc_t* v, acc_t* dvhat, acc_t* scratch, int64_t m, int64_t k,
                         double factor, bool include_diagonal) {
  const int64_t mp = fused_rows_padded(m), kp = fused_features_padded(k);
  acc_t* vp = scratch;
  acc_t* vt = vp + mp * kp;
  acc_t* dvp = vt + mp * kp;
  acc_t* dvt = dvp + mp * kp;
  acc_t* d = dvt + mp * kp;
  fused_pad_rows(v, m, k, vp, vt);
  std::fill(dvt, dvt + mp * kp, acc_t(0));
  fused_gradient(vp, vt, m, mp, kp, static_cast<acc_t>(factor), include_diagonal, d, dvp, dvt);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t f = 0; f < k; ++f) dvhat[i * k + f] = dvp[i * kp + f] + dvt[f * mp + i];
  }
}

}  // namespace pccfast
