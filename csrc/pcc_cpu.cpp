// PCC on the CPU (SPEC section 1).
//
// The groups are processed in chunks of a bounded number of floats of temporaries: each chunk's
// rows are normalised, their correlation matrix R (or, for "square" with K < M, the K x K Gram
// matrix of the features) is formed with one batched matrix product, and phi(R) is reduced.
// Rows of few features skip the products: for "square" and "abs" on rows of at most 4
// features, and "abs" on rows of 5-32 features where no signs are kept (below), R is formed
// in registers and used at once (pcc_short_rows.h, pcc_fused_rows.h; whole groups per thread).
// The per-row mean and rstd leave the forward pass, and for "abs" on rows that are neither short
// nor many against their length, the signs of R (2 bits a pair, at most 1/8 of the activation's
// fp32 bytes, see keeps_signs): the backward then needs only D = factor * sign(R), which it
// decodes instead of forming R again. Where those rows are fp32/fp64 channel rows of at least
// 64 features whose means are not large against their spread, both passes work on x itself
// ("raw rows" below: no normalised copy; the backward is one product into dx, from the rows'
// sums of |R| kept with the signs). Otherwise the backward recomputes vhat and R chunk by
// chunk. The one-group "batch" mode streams its N*P-long rows over sample chunks and keeps only
// C x C matrices.
#include "pcc_cpu.h"
#include "pcc_fused_rows.h"
#include "pcc_gemm.h"
#include "pcc_rows.h"
#include "pcc_short_rows.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace pccfast {
namespace {

// Temporaries per chunk: an eighth of the input, within [256 KB, 16 MB] of fp32 each, so the
// memory beyond x and dx stays a small fraction of the activation at every size.
constexpr int64_t kChunkMinElements = int64_t(1) << 16;
constexpr int64_t kChunkMaxElements = int64_t(1) << 22;
constexpr int64_t kChunkInputFraction = 8;

struct Sizes {
  int64_t groups, rows, features;
};

Sizes sizes_of(const at::Tensor& x, const PCCConfig& cfg) {
  const int64_t n = x.size(0), c = x.size(1), p = x.size(2) * x.size(3);
  const int64_t groups = cfg.group == Group::Sample ? n : 1;
  if (cfg.pixel) return {groups, p, c};
  return {groups, c, cfg.group == Group::Batch ? n * p : p};
}

int64_t pair_count(int64_t rows, bool include_diagonal) {
  return include_diagonal ? rows * rows : rows * (rows - 1);
}

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_input(const at::Tensor& x, const PCCConfig& cfg) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must have shape (N, C, H, W), got ", x.sizes());
  TORCH_CHECK_VALUE(x.numel() > 0, "x must not have an empty dimension, got ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be a float tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device());
  const Sizes s = sizes_of(x, cfg);
  TORCH_CHECK_VALUE(s.rows > 1 || cfg.include_diagonal,
                    "x has a single row, so there are no off-diagonal pairs");
}

// The tensor the groups are drawn from: x, or its batch mean (1/N of x) for "batch_mean".
at::Tensor group_source(const at::Tensor& x, const PCCConfig& cfg) {
  if (cfg.group == Group::BatchMean) return at::mean(x, {0}, /*keepdim=*/true, compute_type(x));
  return x;
}

// Rows of samples [n0, n0 + count): (count, M, K) in the compute dtype. May alias src: never
// modify it in place.
at::Tensor sample_rows(const at::Tensor& src, int64_t n0, int64_t count, bool pixel,
                       at::ScalarType type) {
  const at::Tensor s = src.narrow(0, n0, count);
  const int64_t c = s.size(1), p = s.size(2) * s.size(3);
  const at::Tensor v =
      pixel ? s.permute({0, 2, 3, 1}).reshape({count, p, c}) : s.reshape({count, c, p});
  return v.to(type).contiguous();
}

// Writes the row gradient (count, M, K) of samples [n0, n0 + count) into dx (N, C, H, W).
void store_rows(at::Tensor& dx, const at::Tensor& dv, int64_t n0, bool pixel) {
  at::Tensor out = dx.narrow(0, n0, dv.size(0));
  const int64_t c = dx.size(1), h = dx.size(2), w = dx.size(3);
  if (pixel) {
    out.copy_(dv.view({dv.size(0), h, w, c}).permute({0, 3, 1, 2}));
  } else {
    out.copy_(dv.view({dv.size(0), c, h, w}));
  }
}

int64_t chunk_of(const at::Tensor& x, int64_t groups, int64_t per_group) {
  const int64_t budget =
      std::clamp(x.numel() / kChunkInputFraction, kChunkMinElements, kChunkMaxElements);
  return std::clamp<int64_t>(budget / std::max<int64_t>(per_group, 1), 1, groups);
}

at::Tensor renormalize(const at::Tensor& v, const at::Tensor& mean, const at::Tensor& rstd) {
  return (v - mean.unsqueeze(-1)).mul_(rstd.unsqueeze(-1));
}

// sum over groups and pairs of phi(R) for one chunk of normalised rows vhat: (g, M, K).
double phi_sum(const at::Tensor& vhat, const PCCConfig& cfg) {
  const int64_t m = vhat.size(1), k = vhat.size(2);
  if (cfg.square && k < m) {
    // sum_ij R_ij^2 = ||Vhat^T Vhat||_F^2 / K^2: the K x K side.
    const at::Tensor features = at::bmm(vhat.transpose(1, 2), vhat);
    double total = features.square().sum(at::kDouble).item<double>() / double(k * k);
    if (!cfg.include_diagonal) {
      const at::Tensor diagonal = vhat.square().sum(-1) / double(k);
      total -= diagonal.square().sum(at::kDouble).item<double>();
    }
    return total;
  }
  return phi_sum_of_products(at::bmm(vhat, vhat.transpose(1, 2)), 1.0 / double(k), cfg.square,
                             cfg.include_diagonal);
}

// d(sum phi(R)) / dR with the diagonal masked, times `factor`: (…, M, M).
at::Tensor phi_derivative(const at::Tensor& r, const PCCConfig& cfg, double factor) {
  at::Tensor d = cfg.square ? r * (2.0 * factor) : r.sign().mul_(factor);
  if (!cfg.include_diagonal) d.diagonal(0, -2, -1).zero_();
  return d;
}

// ---- per-sample groups ("sample", and "batch_mean" on the mean map) ----

// The group source with a row layout the fused loops can address (a copy only for layouts whose
// H and W cannot be flattened into one pixel index).
std::pair<at::Tensor, RowLayout> addressable(const at::Tensor& src, bool pixel) {
  RowLayout layout;
  if (row_layout(src, pixel, &layout)) return {src, layout};
  const at::Tensor dense = src.contiguous();
  row_layout(dense, pixel, &layout);
  return {dense, layout};
}

// ---- per-sample groups, one parallel region: each thread takes whole groups ----
// One region per call, inside which every product is a single-threaded BLAS call on one
// group's rows. The chunked path below runs ~5 regions (ATen ops, BLAS) per chunk of groups:
// hundreds per call on small layers, each a wake-up and a barrier of the threads, which cost
// more than the arithmetic and collapse when another process holds a core.

// Rows of R formed at a time by one thread: a block of at most 2^16 values (256 KB fp32).
constexpr int64_t kTileElements = int64_t(1) << 16;

int64_t tile_rows(int64_t m) { return std::clamp<int64_t>(kTileElements / m, 1, m); }

// Rows per block of R's upper staircase: at most a tile, and about an eighth of M (so that the
// blocks formed are ~(1 + 1/8) / 2 of R) but not under kStaircaseMinRows, below which BLAS runs
// the thin products slower than the work they save.
constexpr int64_t kStaircaseMinRows = 32;

int64_t staircase_rows(int64_t m) {
  return std::min(tile_rows(m), std::max<int64_t>(kStaircaseMinRows, (m / 8 + 7) / 8 * 8));
}

// Short rows take the pair loops of pcc_short_rows.h ("square" with K < M has the cheaper
// K x K side).
bool short_rows(int64_t m, int64_t k, const PCCConfig& cfg) {
  return k <= kShortRowFeatures && !(cfg.square && k < m);
}

// ---- the signs of R, kept by the forward for the backward ("abs") ----
// For "abs" the backward needs only D = factor * sign(R), one of {-1, 0, +1} a pair (0 occurs:
// a constant row has vhat = 0). The forward forms R's upper staircase anyway, so it keeps each
// product's sign in 2 bits, block by block in the order and shape the backward would form them
// again, and the backward decodes a block into its tile instead of a product. Layout of one
// group: a header byte (1: the codes below are valid; 0: the forward took the chunked path and
// kept none, so the backward recomputes), then for every staircase row of width w (rows
// [i0, i0 + b) of a block have width M - i0) ceil(w / 4) bytes, "planar": byte q holds
// columns q, q + L, q + 2L, q + 3L (L = ceil(w / 4)) in bits 0-1, 2-3, 4-5, 6-7, each as
// 0 (zero), 1 (positive) or 2 (negative), so that both loops below run over contiguous columns.
// Shapes that may take the raw rows (below) add M doubles after the signs (group_code_bytes).

// Bytes of one group's codes, header included.
int64_t sign_code_bytes(int64_t m) {
  const int64_t block_rows = staircase_rows(m);
  int64_t bytes = 1;
  for (int64_t i0 = 0; i0 < m; i0 += block_rows) {
    bytes += std::min(block_rows, m - i0) * ((m - i0 + 3) / 4);
  }
  return bytes;
}

// Whether the forward keeps the signs: "abs" on per-sample (or batch-mean) groups whose rows
// take the staircase products (not the short-row loops), and only where the codes are at most
// an eighth of the group's fp32 activation (bytes <= M K 4 / 8; about M <= 3.5 K, as the
// staircase holds ~(1 + 1/8) / 2 of R's pairs). A rule of shapes and options alone, never of
// the thread count, so the operator's output shapes follow from its input's.
bool keeps_signs(int64_t m, int64_t k, const PCCConfig& cfg) {
  return !cfg.square && cfg.group != Group::Batch && !short_rows(m, k, cfg) &&
         2 * sign_code_bytes(m) <= m * k;
}

// Rows a little longer than the short ones take the register tiles of pcc_fused_rows.h for
// "abs" where the forward keeps no signs (with them the backward's one product D Vhat, M^2 K
// multiply-adds, beats the tiles' 1.5 M^2 K) and the padded rows fit in L1 with room to spare.
bool fused_rows(int64_t m, int64_t k, const PCCConfig& cfg) {
  return !cfg.square && k > kShortRowFeatures && k <= kFusedRowMaxFeatures &&
         fused_rows_padded(m) * fused_features_padded(k) <= kFusedRowMaxValues &&
         !keeps_signs(m, k, cfg);
}

// Writes the sign codes of one staircase row r[0, w) (raw products K R, the sign of R).
template <typename acc_t>
void encode_signs(const acc_t* r, int64_t w, uint8_t* out) {
  const int64_t l = (w + 3) / 4;
  std::fill(out, out + l, uint8_t(0));
  for (int64_t plane = 0; plane < 4; ++plane) {
    const acc_t* col = r + plane * l;
    const int64_t n = std::min(l, w - plane * l);
    const int shift = int(2 * plane);
#pragma omp simd
    for (int64_t q = 0; q < n; ++q) {
      out[q] |= uint8_t((int(col[q] > 0) | (int(col[q] < 0) << 1)) << shift);
    }
  }
}

// r[0, w) <- factor * sign, decoded from encode_signs's bytes: the same values, bit for bit,
// as phi_derivative_row gives for "abs" on the products they were taken from.
template <typename acc_t>
void decode_signs(const uint8_t* in, int64_t w, acc_t factor, acc_t* r) {
  const int64_t l = (w + 3) / 4;
  for (int64_t plane = 0; plane < 4; ++plane) {
    acc_t* col = r + plane * l;
    const int64_t n = std::min(l, w - plane * l);
    const int shift = int(2 * plane);
#pragma omp simd
    for (int64_t q = 0; q < n; ++q) {
      const int c = in[q] >> shift;
      col[q] = factor * acc_t((c & 1) - ((c >> 1) & 1));
    }
  }
}

// Whole groups per thread when they split evenly enough over the threads (otherwise, for one
// group or a few on many threads, the chunked path parallelises inside each product). BLAS
// products called inside the region run on their thread alone (nested regions are serial).
bool groups_per_thread(int64_t groups) {
  const int64_t threads = at::get_num_threads();
  return groups >= threads && (groups % threads == 0 || groups >= 4 * threads);
}

// One thread's buffers: a group's normalised rows (M, K), their gradient (backward), a block
// of R's rows or the (K, K) feature Gram matrix, for short rows their (K, M) transpose, and
// for the fused rows their scratch (the tile then is unused).
struct GroupBuffers {
  at::Tensor vhat, dvhat, tile, transposed;
  GroupBuffers(const Sizes& s, const PCCConfig& cfg, at::TensorOptions options, bool backward) {
    vhat = at::empty({s.rows, s.features}, options);
    if (backward) dvhat = at::empty({s.rows, s.features}, options);
    const int64_t gram = cfg.square && s.features < s.rows ? s.features * s.features : 0;
    tile = at::empty({std::max(gram, tile_rows(s.rows) * s.rows)}, options);
    if (short_rows(s.rows, s.features, cfg)) {
      transposed = at::empty({short_rows_scratch(s.rows, s.features)}, options);
    } else if (fused_rows(s.rows, s.features, cfg)) {
      transposed = at::empty({fused_rows_scratch(s.rows, s.features)}, options);
    }
  }
};

// sum over pairs of phi(R) for one group's normalised rows vhat: (M, K). With `codes` (only
// where keeps_signs), also writes the signs of R's staircase there (after the header byte).
template <typename acc_t>
double group_phi_sum(const at::Tensor& vhat, const GroupBuffers& buf, const PCCConfig& cfg,
                     uint8_t* codes) {
  const int64_t m = vhat.size(0), k = vhat.size(1);
  if (short_rows(m, k, cfg)) {
    return short_rows_phi_sum(vhat.const_data_ptr<acc_t>(), buf.transposed.data_ptr<acc_t>(),
                              m, k, cfg.square, cfg.include_diagonal);
  }
  if (fused_rows(m, k, cfg)) {
    return fused_rows_phi_sum(vhat.const_data_ptr<acc_t>(), buf.transposed.data_ptr<acc_t>(), m,
                              k, cfg.include_diagonal);
  }
  const acc_t inv_k = static_cast<acc_t>(1.0 / double(k));
  if (cfg.square && k < m) {
    // sum_ij R_ij^2 = ||Vhat^T Vhat||_F^2 / K^2: the K x K side.
    const acc_t* v = vhat.const_data_ptr<acc_t>();
    acc_t* features = buf.tile.data_ptr<acc_t>();
    gemm<acc_t>(k, k, m, 1, {v, k, true}, {v, k, false}, 0, features, k);
    double total = phi_row_sum(features, k * k, inv_k, true);
    if (!cfg.include_diagonal) {
      for (int64_t i = 0; i < m; ++i) {
        const double r_ii = backward_sums(v + i * k, v + i * k, k).vv / double(k);
        total -= r_ii * r_ii;
      }
    }
    return total;
  }
  // R is symmetric: only its upper staircase of blocks is formed, rows [i0, i0 + b) against
  // columns [i0, M). The b x b diagonal block holds both orders of its pairs, the rest one.
  double total = 0.0;
  const acc_t* v = vhat.const_data_ptr<acc_t>();
  acc_t* r = buf.tile.data_ptr<acc_t>();
  const int64_t block_rows = staircase_rows(m);
  for (int64_t i0 = 0; i0 < m; i0 += block_rows) {
    const int64_t b = std::min(block_rows, m - i0), width = m - i0;
    const acc_t* vi = v + i0 * k;
    gemm<acc_t>(b, width, k, 1, {vi, k, false}, {vi, k, true}, 0, r, width);  // K R[I, i0:]
    const acc_t* row = r;
    for (int64_t i = 0; i < b; ++i, row += width) {
      if (codes) {
        encode_signs(row, width, codes);
        codes += (width + 3) / 4;
      }
      total += phi_row_sum(row, b, inv_k, cfg.square) +
               2.0 * phi_row_sum(row + b, width - b, inv_k, cfg.square);
      if (!cfg.include_diagonal) {
        const double t = double(row[i] * inv_k);
        total -= cfg.square ? t * t : std::abs(t);
      }
    }
  }
  return total;
}

// dvhat = D vhat for one group, D = factor * phi'(R) with the diagonal masked; for "square"
// with K < M, Vhat (Vhat^T Vhat) instead (the caller's row loop scales it and removes the
// diagonal). With `codes` (the forward's signs of R, after the header byte) D's blocks are
// decoded from them instead of formed again.
template <typename acc_t>
void group_row_gradient(const at::Tensor& vhat, at::Tensor& dvhat, const GroupBuffers& buf,
                        const PCCConfig& cfg, double factor, const uint8_t* codes) {
  const int64_t m = vhat.size(0), k = vhat.size(1);
  if (short_rows(m, k, cfg)) {
    short_rows_gradient(vhat.const_data_ptr<acc_t>(), dvhat.data_ptr<acc_t>(),
                        buf.transposed.data_ptr<acc_t>(), m, k, factor, cfg.square,
                        cfg.include_diagonal);
    return;
  }
  if (fused_rows(m, k, cfg)) {
    fused_rows_gradient(vhat.const_data_ptr<acc_t>(), dvhat.data_ptr<acc_t>(),
                        buf.transposed.data_ptr<acc_t>(), m, k, factor, cfg.include_diagonal);
    return;
  }
  const acc_t* v = vhat.const_data_ptr<acc_t>();
  acc_t* dv = dvhat.data_ptr<acc_t>();
  acc_t* r = buf.tile.data_ptr<acc_t>();
  if (cfg.square && k < m) {
    gemm<acc_t>(k, k, m, 1, {v, k, true}, {v, k, false}, 0, r, k);  // Vhat^T Vhat
    gemm<acc_t>(m, k, k, 1, {v, k, false}, {r, k, false}, 0, dv, k);
    return;
  }
  // D is symmetric: from its upper staircase D[I, i0:], rows I get D[I, i0:] Vhat[i0:] and the
  // rows below the block get D[I, i0 + b:]^T Vhat[I].
  const acc_t inv_k = static_cast<acc_t>(1.0 / double(k));
  const int64_t block_rows = staircase_rows(m);
  std::fill(dv, dv + m * k, acc_t(0));
  for (int64_t i0 = 0; i0 < m; i0 += block_rows) {
    const int64_t b = std::min(block_rows, m - i0), width = m - i0;
    const acc_t* vi = v + i0 * k;
    if (!codes) gemm<acc_t>(b, width, k, 1, {vi, k, false}, {vi, k, true}, 0, r, width);
    acc_t* row = r;
    for (int64_t i = 0; i < b; ++i, row += width) {
      if (codes) {
        decode_signs(codes, width, static_cast<acc_t>(factor), row);
        codes += (width + 3) / 4;
      } else {
        phi_derivative_row(row, width, inv_k, static_cast<acc_t>(factor), cfg.square);
      }
      if (!cfg.include_diagonal) row[i] = 0;
    }
    gemm<acc_t>(b, k, width, 1, {r, width, false}, {vi, k, false}, 1, dv + i0 * k, k);
    gemm<acc_t>(width - b, k, b, 1, {r + b, width, true}, {vi, k, false}, 1, dv + (i0 + b) * k,
                k);
  }
}

// ---- raw rows: R from the rows as they are, no normalised copy ("abs" with kept signs) ----
// For rows of at least kRawRowMinFeatures features, read straight from x (fp32 or fp64 channel
// rows, contiguous features), the forward forms G = X X^T's upper staircase on x itself and
// R_ij = (G_ij / K - mu_i mu_j) rstd_i rstd_j, mu from one pass of row sums and the variance
// from G's diagonal; the backward is one product on x written into dx (below). Neither writes
// or reads a normalised copy. Cancellation: G's rounding, gamma |x_i| |x_j| with
// |x_i|^2 = K (var_i + mu_i^2), reaches R as gamma sqrt((1 + a_i)(1 + a_j)), a_i = mu_i^2
// rstd_i^2, where the normalised rows' products give gamma: a group whose rows all have
// a_i <= raw_row_max_mean_ratio() loses at most a factor 1 + a (16: four of fp32's 24 bits) against
// the present path; any other group (constant rows, large offsets) takes the present path.
// The header byte of its codes says which path the forward took (2: raw rows), and the
// backward follows it (without codes it forms R again from the normalised rows).
// The backward needs no pass over D Vhat for the layer-norm's row sums: sum_k dvhat_ik = 0, as
// every vhat row sums to 0, and sum_k dvhat_ik vhat_ik = K sum_j D_ij R_ij = K factor S_i with
// S_i = sum_j |R_ij| (the pairs D keeps), which the forward adds up as it goes and keeps after
// the signs (one double a row). So dx_i = rstd_i (dvhat_i - vhat_i factor S_i) is one product,
// dx = A X + u 1^T with A = diag(rstd) D diag(rstd) - diag(factor S rstd^2), u = -A mu.
constexpr int64_t kRawRowMinFeatures = 64;
constexpr uint8_t kRawRowsHeader = 2;

template <typename acc_t>
constexpr double raw_row_max_mean_ratio() {
  return std::is_same_v<acc_t, float> ? 15.0 : 1e4;
}

bool raw_rows(int64_t m, int64_t k, const PCCConfig& cfg) {
  return keeps_signs(m, k, cfg) && k >= kRawRowMinFeatures && m * m <= kTileElements &&
         !cfg.pixel;
}

// Bytes of one group's codes: the signs (header included), then for shapes that may take the
// raw rows the M row sums S_i (doubles, unaligned: read and written with memcpy). A rule of
// shapes and options alone, as keeps_signs; unused where a group takes the normalised rows.
int64_t group_code_bytes(int64_t m, int64_t k, const PCCConfig& cfg) {
  return sign_code_bytes(m) + (raw_rows(m, k, cfg) ? m * int64_t(sizeof(double)) : 0);
}

// The kept codes' tensor: (G, group_code_bytes) uint8, or (0,) when none are kept.
at::Tensor sign_codes_for(const Sizes& s, const PCCConfig& cfg, const at::Tensor& x) {
  const at::TensorOptions options = x.options().dtype(at::kByte);
  if (!keeps_signs(s.rows, s.features, cfg)) return at::empty({0}, options);
  return at::empty({s.groups, group_code_bytes(s.rows, s.features, cfg)}, options);
}

// Whether the forward (and so the backward) can read the rows of `layout` in place.
template <typename scalar_t, typename acc_t>
bool raw_rows_addressable(const RowLayout& layout) {
  return std::is_same_v<scalar_t, acc_t> && layout.feature == 1;
}

// The forward of one group on its raw rows x (M, K, row stride ld): writes mean, rstd, the
// signs (after the header, which the caller writes) and the row sums S (at `sums`) and returns
// sum phi(R); or returns a negative value, having written nothing, when a row's mean is too
// large against its spread.
template <typename acc_t>
double raw_rows_phi_sum(const acc_t* x, int64_t ld, int64_t m, int64_t k, double eps,
                        const GroupBuffers& buf, const PCCConfig& cfg, acc_t* mean_out,
                        acc_t* rstd_out, uint8_t* codes, uint8_t* sums) {
  acc_t* g = buf.tile.data_ptr<acc_t>();
  acc_t* mu = buf.vhat.data_ptr<acc_t>();  // (M) row means, then (M) rstd: vhat is unused here
  acc_t* rs = mu + m;
  const double inv_k = 1.0 / double(k);
  for (int64_t i = 0; i < m; ++i) {
    mu[i] = static_cast<acc_t>(row_sum(x + i * ld, k) * inv_k);
  }
  // G = X X^T on R's upper staircase only (as group_phi_sum): rows [i0, i0 + b) against
  // columns [i0, M), written where they sit in the M x M tile
  const int64_t block_rows = staircase_rows(m);
  for (int64_t i0 = 0; i0 < m; i0 += block_rows) {
    const int64_t b = std::min(block_rows, m - i0);
    const acc_t* xi = x + i0 * ld;
    gemm<acc_t>(b, m - i0, k, 1, {xi, ld, false}, {xi, ld, true}, 0, g + i0 * m + i0, m);
  }
  const double bound = raw_row_max_mean_ratio<acc_t>();
  for (int64_t i = 0; i < m; ++i) {
    const double mean = mu[i];
    const double var = std::max(0.0, double(g[i * m + i]) * inv_k - mean * mean);
    rs[i] = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
    const double ratio = mean * double(rs[i]);
    if (ratio * ratio > bound) return -1.0;
  }
  // R in place, row by row over the staircase: (G_ij / K - mu_i mu_j) rstd_i rstd_j. Row i's
  // sum of |R| over the block's columns and beyond goes to S_i; the pairs beyond the block
  // (formed once) also to S_j, through `below` (column sums in acc_t, as R's row sums are).
  const acc_t ik = static_cast<acc_t>(inv_k);
  std::vector<double> row_sums(m, 0.0);
  std::vector<acc_t> below(m, acc_t(0));
  double total = 0.0;
  for (int64_t i0 = 0; i0 < m; i0 += block_rows) {
    const int64_t b = std::min(block_rows, m - i0), width = m - i0;
    for (int64_t i = i0; i < i0 + b; ++i) {
      acc_t* row = g + i * m + i0;
      const acc_t mi = mu[i], ri = rs[i];
      const acc_t* mj = mu + i0;
      const acc_t* rj = rs + i0;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) row[j] = (row[j] * ik - mi * mj[j]) * (ri * rj[j]);
      encode_signs(row, width, codes);
      codes += (width + 3) / 4;
      const double block = phi_row_sum(row, b, acc_t(1), false);
      const double beyond = phi_row_sum(row + b, width - b, acc_t(1), false);
      const double diagonal = cfg.include_diagonal ? 0.0 : std::abs(double(row[i - i0]));
      total += block + 2.0 * beyond - diagonal;
      row_sums[i] += block + beyond - diagonal;
      acc_t* col = below.data() + i0 + b;
      const acc_t* r = row + b;
#pragma omp simd
      for (int64_t j = 0; j < width - b; ++j) col[j] += std::abs(r[j]);
    }
    // the column sums of this block's pairs are complete for the rows of the next block on
    for (int64_t j = i0 + b; j < std::min(m, i0 + b + block_rows); ++j) {
      row_sums[j] += below[j];
    }
  }
  std::memcpy(sums, row_sums.data(), m * sizeof(double));
  std::copy(mu, mu + m, mean_out);
  std::copy(rs, rs + m, rstd_out);
  return total;
}

// dx of one group from its raw rows x (M, K, row stride ld), the forward's signs (after the
// header) and row sums S (at `sums`): D = factor sign(R) with the diagonal masked, then (see
// above) A = diag(rstd) D diag(rstd) - diag(factor S rstd^2) and dx = A X - (A mu) 1^T,
// written straight into dx.
template <typename acc_t>
void raw_rows_gradient(const acc_t* x, int64_t ld, int64_t m, int64_t k, const acc_t* mu,
                       const acc_t* rs, const uint8_t* codes, const uint8_t* sums, double factor,
                       bool include_diagonal, const GroupBuffers& buf, acc_t* dx,
                       int64_t dx_ld) {
  acc_t* a = buf.tile.data_ptr<acc_t>();
  const int64_t block_rows = staircase_rows(m);
  for (int64_t i0 = 0; i0 < m; i0 += block_rows) {
    const int64_t b = std::min(block_rows, m - i0), width = m - i0;
    for (int64_t i = i0; i < i0 + b; ++i) {
      acc_t* row = a + i * m + i0;
      decode_signs(codes, width, static_cast<acc_t>(factor), row);
      codes += (width + 3) / 4;
      if (!include_diagonal) row[i - i0] = 0;
      for (int64_t j = i0 + b; j < m; ++j) a[j * m + i] = row[j - i0];  // the lower side
    }
  }
  acc_t* u = buf.vhat.data_ptr<acc_t>();  // (M): vhat is unused here
  for (int64_t i = 0; i < m; ++i) {
    acc_t* row = a + i * m;
    const acc_t ri = rs[i];
    double s_i;
    std::memcpy(&s_i, sums + i * sizeof(double), sizeof(double));
    row[i] = static_cast<acc_t>(double(row[i]) - factor * s_i);  // rstd_i^2 once scaled
    double ui = 0.0;
#pragma omp simd reduction(+ : ui)
    for (int64_t j = 0; j < m; ++j) {
      row[j] *= ri * rs[j];
      ui += double(row[j]) * mu[j];
    }
    u[i] = static_cast<acc_t>(-ui);
  }
  gemm<acc_t>(m, k, m, 1, {a, m, false}, {x, ld, false}, 0, dx, dx_ld);  // A X
  for (int64_t i = 0; i < m; ++i) add_to_row(dx + i * dx_ld, k, u[i]);
}

double forward_groups_per_thread(const at::Tensor& src, const RowLayout& layout, const Sizes& s,
                                 const PCCConfig& cfg, at::Tensor& mean, at::Tensor& rstd,
                                 at::Tensor& codes) {
  uint8_t* codes_all = codes.numel() ? codes.data_ptr<uint8_t>() : nullptr;
  const int64_t code_bytes = codes_all ? codes.size(1) : 0;
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(),
                                         "pcc_forward_groups", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* x = src.const_data_ptr<scalar_t>();
    acc_t* mean_all = mean.data_ptr<acc_t>();
    acc_t* rstd_all = rstd.data_ptr<acc_t>();
    const bool raw = codes_all && raw_rows(s.rows, s.features, cfg) &&
                     raw_rows_addressable<scalar_t, acc_t>(layout);
    return at::parallel_reduce(
        0, s.groups, 1, 0.0,
        [&](int64_t begin, int64_t end, double partial) {
          const GroupBuffers buf(s, cfg, mean.options(), /*backward=*/false);
          for (int64_t g = begin; g < end; ++g) {
            uint8_t* group_codes = codes_all ? codes_all + g * code_bytes : nullptr;
            if (raw) {
              const double sum = raw_rows_phi_sum<acc_t>(
                  reinterpret_cast<const acc_t*>(x + g * layout.group), layout.row, s.rows,
                  s.features, cfg.eps, buf, cfg, mean_all + g * s.rows, rstd_all + g * s.rows,
                  group_codes + 1, group_codes + sign_code_bytes(s.rows));
              if (sum >= 0) {  // else a row's mean is too large against its spread
                group_codes[0] = kRawRowsHeader;
                partial += sum;
                continue;
              }
            }
            normalize_row_range(x + g * layout.group, layout, s.rows, s.features, 0, s.rows,
                                cfg.eps, /*compute_stats=*/true, buf.vhat.data_ptr<acc_t>(),
                                mean_all + g * s.rows, rstd_all + g * s.rows);
            if (group_codes) *group_codes++ = 1;  // the header: valid
            partial += group_phi_sum<acc_t>(buf.vhat, buf, cfg, group_codes);
          }
          return partial;
        },
        std::plus<double>());
  });
}

void backward_groups_per_thread(const at::Tensor& src, const RowLayout& layout, const Sizes& s,
                                const PCCConfig& cfg, double scale, const at::Tensor& mean,
                                const at::Tensor& rstd, const at::Tensor& codes, at::Tensor& dst,
                                const RowLayout& dst_layout) {
  const uint8_t* codes_all = codes.numel() ? codes.const_data_ptr<uint8_t>() : nullptr;
  const int64_t code_bytes = codes_all ? codes.size(1) : 0;
  TORCH_INTERNAL_ASSERT(dst.scalar_type() == src.scalar_type());
  const double k = double(s.features);
  const double factor = 2.0 * scale / k;  // d R_ij / d vhat_i = vhat_j / K, R symmetric: twice
  const bool small_side = cfg.square && s.features < s.rows;
  const double row_scale = small_side ? 2.0 * factor / k : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(),
                                  "pcc_backward_groups", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* x = src.const_data_ptr<scalar_t>();
    scalar_t* dx = dst.data_ptr<scalar_t>();
    // const_cast: with compute_stats=false the statistics are only read
    acc_t* mean_all = const_cast<acc_t*>(mean.const_data_ptr<acc_t>());
    acc_t* rstd_all = const_cast<acc_t*>(rstd.const_data_ptr<acc_t>());
    const bool direct = writes_directly<scalar_t, acc_t>(dst_layout);
    // raw-row codes (header 2) on rows that cannot be read in place: decoded as any others
    const bool raw = codes_all && direct && raw_rows_addressable<scalar_t, acc_t>(layout);
    at::parallel_for(0, s.groups, 1, [&](int64_t begin, int64_t end) {
      GroupBuffers buf(s, cfg, mean.options(), /*backward=*/true);
      std::vector<acc_t> staging(direct ? 0 : s.features);
      for (int64_t g = begin; g < end; ++g) {
        if (raw && codes_all[g * code_bytes] == kRawRowsHeader) {
          raw_rows_gradient<acc_t>(reinterpret_cast<const acc_t*>(x + g * layout.group),
                                   layout.row, s.rows, s.features, mean_all + g * s.rows,
                                   rstd_all + g * s.rows, codes_all + g * code_bytes + 1,
                                   codes_all + g * code_bytes + sign_code_bytes(s.rows), factor,
                                   cfg.include_diagonal, buf,
                                   reinterpret_cast<acc_t*>(dx + g * dst_layout.group),
                                   dst_layout.row);
          continue;
        }
        normalize_row_range(x + g * layout.group, layout, s.rows, s.features, 0, s.rows, cfg.eps,
                            /*compute_stats=*/false, buf.vhat.data_ptr<acc_t>(),
                            mean_all + g * s.rows, rstd_all + g * s.rows);
        // the forward's signs where it kept them (header byte 1), else R formed again
        const uint8_t* group_codes = codes_all ? codes_all + g * code_bytes : nullptr;
        const bool kept = group_codes && group_codes[0] != 0;
        group_row_gradient<acc_t>(buf.vhat, buf.dvhat, buf, cfg, factor,
                                  kept ? group_codes + 1 : nullptr);
        row_backward_range(buf.dvhat.const_data_ptr<acc_t>(), buf.vhat.const_data_ptr<acc_t>(),
                           rstd_all + g * s.rows, row_scale,
                           /*subtract_diagonal=*/small_side && !cfg.include_diagonal,
                           dx + g * dst_layout.group, dst_layout, s.rows, s.features, 0, s.rows,
                           direct ? nullptr : staging.data());
      }
    });
  });
}

PCCOutputs forward_grouped(const at::Tensor& x, const PCCConfig& cfg) {
  const at::ScalarType type = compute_type(x);
  const auto [src, layout] = addressable(group_source(x, cfg), cfg.pixel);
  const Sizes s = sizes_of(src, cfg);
  at::Tensor mean = at::empty({s.groups, s.rows}, x.options().dtype(type));
  at::Tensor rstd = at::empty_like(mean);
  at::Tensor codes = sign_codes_for(s, cfg, x);
  const double pairs = double(s.groups) * double(pair_count(s.rows, cfg.include_diagonal));
  if (groups_per_thread(s.groups)) {
    const double total = forward_groups_per_thread(src, layout, s, cfg, mean, rstd, codes);
    return {at::scalar_tensor(total / pairs, x.options().dtype(type)), mean, rstd, codes};
  }
  // The chunked products keep no signs: every header (and byte) 0, so the backward recomputes.
  codes.zero_();
  const int64_t side = cfg.square ? std::min(s.rows, s.features) : s.rows;
  const int64_t chunk = chunk_of(x, s.groups, 2 * s.rows * s.features + 2 * side * side);
  at::Tensor buffer = at::empty({chunk, s.rows, s.features}, x.options().dtype(type));
  double total = 0.0;
  for (int64_t g0 = 0; g0 < s.groups; g0 += chunk) {
    const int64_t count = std::min(chunk, s.groups - g0);
    at::Tensor vhat = buffer.narrow(0, 0, count);
    at::Tensor mean_chunk = mean.narrow(0, g0, count), rstd_chunk = rstd.narrow(0, g0, count);
    normalize_rows(src, layout, g0, count, s.rows, s.features, cfg.eps, /*compute_stats=*/true,
                   vhat, mean_chunk, rstd_chunk);
    total += phi_sum(vhat, cfg);
  }
  return {at::scalar_tensor(total / pairs, x.options().dtype(type)), mean, rstd, codes};
}

at::Tensor backward_grouped(double scale, const at::Tensor& x, const at::Tensor& mean,
                            const at::Tensor& rstd, const at::Tensor& codes,
                            const PCCConfig& cfg) {
  const at::ScalarType type = compute_type(x);
  const auto [src, layout] = addressable(group_source(x, cfg), cfg.pixel);
  const Sizes s = sizes_of(src, cfg);
  // Sample groups write straight into dx; batch_mean produces the mean map's gradient first.
  const bool mean_map = cfg.group == Group::BatchMean;
  at::Tensor dx = at::empty_like(x);
  at::Tensor dsrc = mean_map ? at::empty(src.sizes(), src.options().dtype(type)) : dx;
  const auto [dst, dst_layout] = addressable(dsrc, cfg.pixel);
  TORCH_INTERNAL_ASSERT(dst.is_same(dsrc), "gradient buffers are always addressable");
  if (groups_per_thread(s.groups)) {
    backward_groups_per_thread(src, layout, s, cfg, scale, mean, rstd, codes, dsrc, dst_layout);
    if (mean_map) dx.copy_((dsrc / double(x.size(0))).expand_as(x));
    return dx;
  }
  const double k = double(s.features);
  const double factor = 2.0 * scale / k;  // d R_ij / d vhat_i = vhat_j / K, R symmetric: twice
  const bool small_side = cfg.square && s.features < s.rows;
  const int64_t side = small_side ? s.features : s.rows;
  const int64_t chunk = chunk_of(x, s.groups, 3 * s.rows * s.features + 2 * side * side);
  at::Tensor buffer = at::empty({chunk, s.rows, s.features}, x.options().dtype(type));
  for (int64_t g0 = 0; g0 < s.groups; g0 += chunk) {
    const int64_t count = std::min(chunk, s.groups - g0);
    at::Tensor vhat = buffer.narrow(0, 0, count);
    at::Tensor mean_chunk = mean.narrow(0, g0, count), rstd_chunk = rstd.narrow(0, g0, count);
    normalize_rows(src, layout, g0, count, s.rows, s.features, cfg.eps, /*compute_stats=*/false,
                   vhat, mean_chunk, rstd_chunk);
    at::Tensor dvhat;
    double row_scale = 1.0;
    if (small_side) {
      // R Vhat = Vhat (Vhat^T Vhat) / K; the row loop removes diag(R) Vhat = |vhat_i|^2 vhat_i / K.
      dvhat = at::bmm(vhat, at::bmm(vhat.transpose(1, 2), vhat));
      row_scale = 2.0 * factor / k;
    } else {
      at::Tensor d = at::bmm(vhat, vhat.transpose(1, 2));  // K R, turned into D in place
      phi_derivative_of_products(d, 1.0 / k, factor, cfg.square, cfg.include_diagonal);
      dvhat = at::bmm(d, vhat);
    }
    row_backward(dvhat, vhat, rstd_chunk, row_scale,
                 /*subtract_diagonal=*/small_side && !cfg.include_diagonal, dsrc, dst_layout, g0,
                 count, s.rows, s.features);
  }
  if (mean_map) dx.copy_((dsrc / double(x.size(0))).expand_as(x));
  return dx;
}

// ---- one group over the whole batch ("batch", channel rows of length N*P) ----

int64_t batch_chunk(const at::Tensor& x) {
  return chunk_of(x, x.size(0), 4 * x.size(1) * x.size(2) * x.size(3));
}

// Centered (by `mu`) or normalised (by `mu`, `rstd`) Gram matrix of the channel rows over the
// batch, accumulated in double over sample chunks; also the row sums of the rows used.
std::pair<at::Tensor, at::Tensor> batch_gram(const at::Tensor& x, const at::Tensor& mu,
                                             const at::Tensor& rstd) {
  const at::ScalarType type = compute_type(x);
  const int64_t n = x.size(0), c = x.size(1), chunk = batch_chunk(x);
  at::Tensor gram = at::zeros({c, c}, x.options().dtype(at::kDouble));
  at::Tensor sums = at::zeros({c}, x.options().dtype(at::kDouble));
  for (int64_t n0 = 0; n0 < n; n0 += chunk) {
    const int64_t count = std::min(chunk, n - n0);
    at::Tensor v = sample_rows(x, n0, count, /*pixel=*/false, type) - mu.view({1, c, 1});
    if (rstd.defined()) v.mul_(rstd.view({1, c, 1}));
    const at::Tensor rows = v.transpose(0, 1).reshape({c, -1});
    gram.add_(at::mm(rows, rows.t()));
    sums.add_(rows.sum(1, /*keepdim=*/false, at::kDouble));
  }
  return {gram, sums};
}

PCCOutputs forward_batch(const at::Tensor& x, const PCCConfig& cfg) {
  const at::ScalarType type = compute_type(x);
  const int64_t n = x.size(0), c = x.size(1), chunk = batch_chunk(x);
  const double k = double(n) * double(x.size(2) * x.size(3));
  at::Tensor sums = at::zeros({c}, x.options().dtype(at::kDouble));
  for (int64_t n0 = 0; n0 < n; n0 += chunk) {
    const int64_t count = std::min(chunk, n - n0);
    sums.add_(sample_rows(x, n0, count, false, type).sum(at::IntArrayRef{0, 2}, false, at::kDouble));
  }
  const at::Tensor mu = (sums / k).to(type);
  const at::Tensor centered_gram = batch_gram(x, mu, at::Tensor()).first;
  const at::Tensor var = centered_gram.diagonal() / k;
  const at::Tensor r = (var + cfg.eps).rsqrt();
  at::Tensor corr = centered_gram * r.unsqueeze(1) * r.unsqueeze(0) / k;
  if (!cfg.include_diagonal) corr.diagonal().zero_();
  const double total = (cfg.square ? corr.square() : corr.abs()).sum().item<double>();
  const double pairs = double(pair_count(c, cfg.include_diagonal));
  return {at::scalar_tensor(total / pairs, x.options().dtype(type)), mu.view({1, c}),
          r.to(type).view({1, c}), at::empty({0}, x.options().dtype(at::kByte))};
}

at::Tensor backward_batch(double scale, const at::Tensor& x, const at::Tensor& mean,
                          const at::Tensor& rstd, const PCCConfig& cfg) {
  const at::ScalarType type = compute_type(x);
  const int64_t n = x.size(0), c = x.size(1), chunk = batch_chunk(x);
  const double k = double(n) * double(x.size(2) * x.size(3));
  const at::Tensor mu = mean.view({c}), r = rstd.view({c});
  auto [gram, sums] = batch_gram(x, mu, r);
  const at::Tensor corr = gram / k;                          // R, recomputed
  const at::Tensor d = phi_derivative(corr, cfg, 2.0 * scale / k);  // dvhat = D vhat
  // The row means over all N*P features of dvhat and of dvhat * vhat, from C x C quantities.
  const at::Tensor mean_d = at::mv(d, sums / k).to(type).view({1, c, 1});
  const at::Tensor mean_dv = (d * corr).sum(1).to(type).view({1, c, 1});
  const at::Tensor d_t = d.to(type);
  at::Tensor dx = at::empty_like(x);
  for (int64_t n0 = 0; n0 < n; n0 += chunk) {
    const int64_t count = std::min(chunk, n - n0);
    const at::Tensor vhat =
        renormalize(sample_rows(x, n0, count, false, type), mu.view({1, c}).expand({count, c}),
                    r.view({1, c}).expand({count, c}));
    const at::Tensor dvhat = at::matmul(d_t, vhat);
    at::Tensor dv = (dvhat - mean_d - vhat * mean_dv).mul_(r.view({1, c, 1}));
    store_rows(dx, dv, n0, /*pixel=*/false);
  }
  return dx;
}

// ---- operator entry points ----

PCCOutputs pcc_forward_op(const at::Tensor& x, c10::string_view orientation,
                          c10::string_view group, c10::string_view penalty,
                          bool include_diagonal, double eps) {
  return pcc_forward_cpu(x, parse_pcc_config(orientation, group, penalty, include_diagonal, eps));
}

at::Tensor pcc_backward_op(const at::Tensor& grad_score, const at::Tensor& x,
                           const at::Tensor& mean, const at::Tensor& rstd,
                           const at::Tensor& sign_codes, c10::string_view orientation,
                           c10::string_view group, c10::string_view penalty,
                           bool include_diagonal, double eps) {
  return pcc_backward_cpu(grad_score, x, mean, rstd, sign_codes,
                          parse_pcc_config(orientation, group, penalty, include_diagonal, eps));
}

}  // namespace

PCCConfig parse_pcc_config(std::string_view orientation, std::string_view group,
                           std::string_view penalty, bool include_diagonal, double eps) {
  PCCConfig cfg;
  TORCH_CHECK_VALUE(orientation == "channel" || orientation == "pixel",
                    "orientation must be 'channel' or 'pixel', got '", orientation, "'");
  cfg.pixel = orientation == "pixel";
  if (group == "sample") {
    cfg.group = Group::Sample;
  } else if (group == "batch") {
    cfg.group = Group::Batch;
  } else if (group == "batch_mean") {
    cfg.group = Group::BatchMean;
  } else {
    TORCH_CHECK_VALUE(false, "group must be 'sample', 'batch' or 'batch_mean', got '", group, "'");
  }
  TORCH_CHECK_VALUE(!(cfg.pixel && cfg.group == Group::Batch),
                    "group='batch' needs orientation='channel'");
  TORCH_CHECK_VALUE(penalty == "abs" || penalty == "square",
                    "penalty must be 'abs' or 'square', got '", penalty, "'");
  cfg.square = penalty == "square";
  TORCH_CHECK_VALUE(eps > 0, "eps must be positive, got ", eps);
  cfg.include_diagonal = include_diagonal;
  cfg.eps = eps;
  return cfg;
}

int64_t pcc_sign_code_bytes(int64_t rows, int64_t features, const PCCConfig& cfg) {
  TORCH_CHECK_VALUE(rows >= 1 && features >= 1, "rows and features must be positive, got ", rows,
                    " and ", features);
  return keeps_signs(rows, features, cfg) ? group_code_bytes(rows, features, cfg) : 0;
}

PCCOutputs pcc_forward_cpu(const at::Tensor& x, const PCCConfig& cfg) {
  check_input(x, cfg);
  // The arithmetic is fp32 (fp64) by definition: the ATen ops inside must not be autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return cfg.group == Group::Batch ? forward_batch(x, cfg) : forward_grouped(x, cfg);
}

at::Tensor pcc_backward_cpu(const at::Tensor& grad_score, const at::Tensor& x,
                            const at::Tensor& mean, const at::Tensor& rstd,
                            const at::Tensor& sign_codes, const PCCConfig& cfg) {
  check_input(x, cfg);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Sizes s = sizes_of(x, cfg);
  const int64_t groups = s.groups, rows = s.rows;
  TORCH_CHECK_VALUE(mean.sizes() == at::IntArrayRef({groups, rows}) &&
                        rstd.sizes() == mean.sizes(),
                    "mean and rstd must have shape (", groups, ", ", rows, "), got ",
                    mean.sizes(), " and ", rstd.sizes());
  // The forward's sign codes, or none (shape (0,)): then the backward recomputes R.
  const bool kept = keeps_signs(s.rows, s.features, cfg);
  const int64_t code_bytes = kept ? group_code_bytes(s.rows, s.features, cfg) : 0;
  TORCH_CHECK_TYPE(sign_codes.scalar_type() == at::kByte, "sign_codes must be a uint8 tensor, got ",
                   sign_codes.scalar_type());
  TORCH_CHECK_VALUE(sign_codes.sizes() == at::IntArrayRef({0}) ||
                        (kept && sign_codes.sizes() == at::IntArrayRef({groups, code_bytes})),
                    "sign_codes must have shape (0,)", kept ? " or (" : "",
                    kept ? std::to_string(groups) + ", " + std::to_string(code_bytes) + ")" : "",
                    " (pcc_forward's 4th output), got ", sign_codes.sizes());
  const double pairs = double(groups) * double(pair_count(rows, cfg.include_diagonal));
  const double scale = grad_score.item<double>() / pairs;
  return cfg.group == Group::Batch ? backward_batch(scale, x, mean, rstd, cfg)
                                   : backward_grouped(scale, x, mean, rstd,
                                                      sign_codes.contiguous(), cfg);
}

TORCH_LIBRARY_IMPL(pccfast, CPU, m) {
  m.impl("pcc_forward", &pcc_forward_op);
  m.impl("pcc_backward", &pcc_backward_op);
}

}  // namespace pccfast
