// The parallel-order Jacobi eigensolver for small symmetric float64 matrices, written once for
// the CUDA kernel (kernels/jacobi_eigh.cu: one thread block per matrix) and for the host
// (jacobi_eigh_host below: the kernel's block with its threads run one after another, exposed
// on the CPU as pccfast::jacobi_eigh_emulation and run by tests/cpp/test_jacobi_eigh.cpp).
//
// The algorithm, for G (n x n), n padded to even N2 = n + (n & 1) with a padding index that is
// never rotated:
// * a sweep is N2 - 1 rounds; round r pairs every index with one partner by the circle method
//   (pair 0 = (r, N2 - 1), pair k = ((r + k) mod (N2 - 1), (r - k) mod (N2 - 1))), so the N2/2
//   rotations of a round are disjoint and over one sweep every pair (p, q) meets exactly once;
// * each rotation is the symmetric Schur rotation (Golub & Van Loan 8.5.1) that zeroes a_pq;
//   the round applies all of them at once, A <- J^T A J: the diagonal 2x2 blocks get
//   a_pp - t a_pq, a_qq + t a_pq and 0; every other 2x2 block (rows of pair k, columns of pair l)
//   gets R_k^T B R_l; V^T (the eigenvectors as rows) gets R_k^T on its rows (p, q);
// * a sweep starts with the convergence test off(A) <= eps * ||A||_F (off = the Frobenius norm
//   of the off-diagonal part; both scaled by a power of two against overflow); at most
//   kMaxSweeps sweeps, else the matrix is reported as not converged (NaN/Inf input);
// * eigenvalues are the diagonal, sorted ascending (ties by index), like torch.linalg.eigh.
//
// Every product-sum is an explicit fma and every other product or sum an explicit rounded
// operation (mul_rn/add_rn: never fused), CUDA's float64 division and square root are
// IEEE-rounded, and the host emulates the kernel's reduction order, so host and device perform
// the same float64 operations: the host run reproduces the kernel's bits.
//
// Storage: A as the packed lower triangle (n(n+1)/2 doubles), followed by V^T (n*n doubles),
// addressed through a SplitStorage: as much as fits in shared memory, the rest in a
// global-memory spill area.
#pragma once

#include <cmath>
#include <cstdint>

#if !defined(__CUDA_ARCH__)
#include <vector>
#endif

#if defined(__CUDACC__)
#define PCCFAST_HD __host__ __device__ __forceinline__
#else
#define PCCFAST_HD inline
#endif

namespace pccfast {
namespace jacobi {

// Sweeps before giving up: Jacobi converges quadratically, typically in 6-12 sweeps for n <= 512.
constexpr int kMaxSweeps = 40;
// Stop when off(A) <= kTolerance * ||A||_F. Rotations only mix off-diagonal entries among
// themselves (and set a_pq to exactly 0), so off(A) has no rounding floor and reaches this.
constexpr double kTolerance = 2.220446049250313e-16;  // float64 machine epsilon
// |tau| above this: 1 + tau^2 would overflow; t = 1 / (2 tau) to full precision instead.
constexpr double kHugeTau = 1e150;
// Largest n the solver accepts (storage indices are 32-bit).
constexpr int kMaxSize = 8192;

// A product or sum rounded on its own. On the device the intrinsics forbid the compiler (nvcc
// or ptxas) to fuse it into an fma with a neighbouring operation; on the host there is no fma
// to fuse with (every other product-sum is an explicit fma). Host and device agree bit for bit.
PCCFAST_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
PCCFAST_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
PCCFAST_HD double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

PCCFAST_HD int padded_size(int n) { return n + (n & 1); }
PCCFAST_HD int pair_count(int n) { return padded_size(n) / 2; }
PCCFAST_HD int round_count(int n) { return padded_size(n) - 1; }
PCCFAST_HD int packed_size(int n) { return n * (n + 1) / 2; }
// Doubles per matrix: packed A, then V^T (row k = eigenvector k).
PCCFAST_HD int storage_size(int n) { return packed_size(n) + n * n; }
PCCFAST_HD int packed_index(int i, int j) {
  const int r = i > j ? i : j, c = i > j ? j : i;
  return r * (r + 1) / 2 + c;
}
PCCFAST_HD int vector_index(int n, int row, int col) { return packed_size(n) + row * n + col; }

// The two indices (p < q) of pair k in round `round`; q == n is the padding index of odd n.
PCCFAST_HD void round_pair(int round, int k, int n, int* p, int* q) {
  const int last = padded_size(n) - 1;  // odd
  int u, v;
  if (k == 0) {
    u = round;
    v = last;
  } else {
    u = (round + k) % last;
    v = (round + last - k) % last;
  }
  *p = u < v ? u : v;
  *q = u < v ? v : u;
}

// Off-diagonal 2x2 blocks per round, listed by cyclic distance d = 1..N/2 between pairs
// (k, (k + d) mod N); distance N/2 (N even) lists each block twice, so only k < N/2 counts.
PCCFAST_HD int block_items(int n) {
  const int pairs = pair_count(n);
  return pairs * (pairs / 2);
}
PCCFAST_HD bool block_item(int item, int pairs, int* k, int* l) {
  const int d = item / pairs + 1, kk = item - (d - 1) * pairs;
  if (2 * d == pairs && kk >= d) return false;
  *k = kk;
  *l = (kk + d) % pairs;
  return true;
}

struct Rotation {
  double c, s, t;  // cos, sin, tan of the angle
};

// The rotation J (J_pp = J_qq = c, J_pq = s, J_qp = -s) with (J^T A J)_pq = 0, smaller angle.
PCCFAST_HD Rotation schur_rotation(double app, double aqq, double apq) {
  Rotation r{1.0, 0.0, 0.0};
  if (apq == 0.0) return r;
  const double tau = sub_rn(aqq, app) / mul_rn(2.0, apq);
  double t;
  if (::fabs(tau) > kHugeTau) {
    t = 0.5 / tau;
  } else {
    t = ::copysign(1.0, tau) / add_rn(::fabs(tau), ::sqrt(::fma(tau, tau, 1.0)));
  }
  r.c = 1.0 / ::sqrt(::fma(t, t, 1.0));
  r.s = mul_rn(t, r.c);
  r.t = t;
  return r;
}

// Round phase 1, pair (p, q): the rotation, and its diagonal block updated in place.
template <class Store>
PCCFAST_HD void rotate_pair(const Store& a, int n, int p, int q, double* c, double* s) {
  if (q >= n) {  // the padding index: nothing to rotate
    *c = 1.0;
    *s = 0.0;
    return;
  }
  const int ip = packed_index(p, p), iq = packed_index(q, q), ipq = packed_index(q, p);
  const double app = a[ip], aqq = a[iq], apq = a[ipq];
  const Rotation r = schur_rotation(app, aqq, apq);
  a[ip] = ::fma(-r.t, apq, app);
  a[iq] = ::fma(r.t, apq, aqq);
  a[ipq] = 0.0;
  *c = r.c;
  *s = r.s;
}

// Round phase 2, one off-diagonal block: rows (pk, qk), columns (pl, ql) <- R_k^T B R_l.
// Entries in the padding row or column are zero and are neither read nor written.
template <class Store>
PCCFAST_HD void rotate_block(const Store& a, int n, int pk, int qk, double ck, double sk, int pl,
                             int ql, double cl, double sl) {
  const bool row_q = qk < n, col_q = ql < n;
  const int i00 = packed_index(pk, pl);
  const int i01 = col_q ? packed_index(pk, ql) : 0;
  const int i10 = row_q ? packed_index(qk, pl) : 0;
  const int i11 = row_q && col_q ? packed_index(qk, ql) : 0;
  const double b00 = a[i00];
  const double b01 = col_q ? a[i01] : 0.0;
  const double b10 = row_q ? a[i10] : 0.0;
  const double b11 = row_q && col_q ? a[i11] : 0.0;
  // Rows: (J^T B)_p. = c b_p. - s b_q. ; (J^T B)_q. = s b_p. + c b_q.
  const double x00 = ::fma(ck, b00, -mul_rn(sk, b10)), x01 = ::fma(ck, b01, -mul_rn(sk, b11));
  const double x10 = ::fma(sk, b00, mul_rn(ck, b10)), x11 = ::fma(sk, b01, mul_rn(ck, b11));
  // Columns: (X J)_.p = c x_.p - s x_.q ; (X J)_.q = s x_.p + c x_.q
  a[i00] = ::fma(cl, x00, -mul_rn(sl, x01));
  if (col_q) a[i01] = ::fma(sl, x00, mul_rn(cl, x01));
  if (row_q) a[i10] = ::fma(cl, x10, -mul_rn(sl, x11));
  if (row_q && col_q) a[i11] = ::fma(sl, x10, mul_rn(cl, x11));
}

// Round phase 2, one column j of the eigenvector rows (p, q): V <- V J, stored as V^T.
template <class Store>
PCCFAST_HD void rotate_vectors(const Store& a, int n, int p, int q, double c, double s, int j) {
  const int ip = vector_index(n, p, j), iq = vector_index(n, q, j);
  const double vp = a[ip], vq = a[iq];
  a[ip] = ::fma(c, vp, -mul_rn(s, vq));
  a[iq] = ::fma(s, vp, mul_rn(c, vq));
}

// A power of two that brings the largest |a_ij| into [1, 2) (1 for a zero or non-finite max;
// at most 2^1022 for a subnormal max, whose exact reciprocal power would overflow).
PCCFAST_HD double norm_scale(double largest) {
  if (!(largest > 0.0) || !(largest < INFINITY)) return 1.0;
  const int exponent = -::ilogb(largest);
  return ::ldexp(1.0, exponent < 1022 ? exponent : 1022);
}

// Adds entry (i, j), j <= i, to the scaled sums of squares: off-diagonal (both triangles) and
// diagonal.
template <class Store>
PCCFAST_HD void add_norm_terms(const Store& a, int i, int j, double scale, double* off2,
                               double* diag2) {
  const double x = mul_rn(a[packed_index(i, j)], scale);
  if (i == j) {
    *diag2 = ::fma(x, x, *diag2);
  } else {
    *off2 = ::fma(mul_rn(2.0, x), x, *off2);
  }
}

// The scaled sums are at most 4 n^2, so an infinite or NaN sum means non-finite input: that
// never converges (and is reported as such).
PCCFAST_HD bool converged(double off2, double diag2) {
  const double total = add_rn(off2, diag2);
  return total < INFINITY && off2 <= mul_rn(kTolerance * kTolerance, total);
}

// Position of eigenvalue i in ascending order (ties by index).
template <class Store>
PCCFAST_HD int sorted_rank(const Store& a, int n, int i) {
  const double di = a[packed_index(i, i)];
  int rank = 0;
  for (int j = 0; j < n; ++j) {
    const double dj = a[packed_index(j, j)];
    rank += (dj < di || (dj == di && j < i)) ? 1 : 0;
  }
  return rank;
}

// ---- The kernel's block: layout and per-thread steps ----------------------------------------
// One thread block per matrix. The steps below are what thread `tid` of `threads` does between
// two block barriers; kernels/jacobi_eigh.cu calls them with __syncthreads() in between, and
// jacobi_eigh_host below calls them for every tid in turn, so the host run is the kernel's run.

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;
// The largest per-block shared memory of the H100/H200 (227 KB): the host emulation's default.
constexpr int kHopperSharedBytes = 232448;

// Threads per block: enough for the ~n^2/8 blocks and n^2/2 vector entries of a round.
PCCFAST_HD int threads_for(int n) {
  return n <= 16 ? 64 : n <= 32 ? 128 : n <= 64 ? 256 : kMaxThreads;
}

// Bytes of the fixed shared arrays: cos, sin (pairs doubles each), the reduction scratch
// (2 * kWarp doubles), pair indices (2 * pairs ints) and ranks (n ints), padded to 16 bytes.
PCCFAST_HD int fixed_shared_bytes(int n) {
  const int pairs = pair_count(n);
  const int doubles = 2 * pairs + 2 * kWarp;
  const int ints = 2 * pairs + n;
  return doubles * int(sizeof(double)) + ((ints * int(sizeof(int)) + 15) / 16) * 16;
}

// Doubles of a matrix's storage that live in shared memory, given the block's budget in bytes
// (the rest spills to global memory); -1 if the budget does not even hold the fixed arrays.
PCCFAST_HD int shared_capacity(int n, int shared_bytes) {
  const int room = shared_bytes - fixed_shared_bytes(n);
  if (room < 0) return -1;
  const int cap = room / int(sizeof(double));
  return cap < storage_size(n) ? cap : storage_size(n);
}

// A matrix's storage: the first `cap` doubles in shared memory, the rest in `spill`.
struct SplitStorage {
  double* shared;
  double* spill;
  int cap;
  PCCFAST_HD double& operator[](int i) const { return i < cap ? shared[i] : spill[i - cap]; }
};

// A matrix's storage when all of it fits in shared memory (n <= 138 on an H100): plain shared
// loads and stores instead of the generic ones a SplitStorage needs.
struct SharedStorage {
  double* shared;
  PCCFAST_HD double& operator[](int i) const { return shared[i]; }
};

// The block's shared memory, carved out of `base` (fixed_shared_bytes(n) + cap doubles).
struct SharedLayout {
  double* cosines;
  double* sines;
  double* scratch;  // 2 * kWarp doubles for block reductions
  int* firsts;
  int* seconds;
  int* ranks;
  double* storage;  // the shared part of SplitStorage
};

PCCFAST_HD SharedLayout shared_layout(unsigned char* base, int n) {
  const int pairs = pair_count(n);
  SharedLayout l;
  l.cosines = reinterpret_cast<double*>(base);
  l.sines = l.cosines + pairs;
  l.scratch = l.sines + pairs;
  l.firsts = reinterpret_cast<int*>(l.scratch + 2 * kWarp);
  l.seconds = l.firsts + pairs;
  l.ranks = l.seconds + pairs;
  l.storage = reinterpret_cast<double*>(base + fixed_shared_bytes(n));
  return l;
}

// Load: the lower triangle of gram (n x n, row-major) into A, V^T = I. -> this thread's max |a_ij|.
template <class Store>
PCCFAST_HD double load_step(int tid, int threads, const double* g, int n, const Store& a) {
  double largest = 0.0;
  for (int e = tid; e < n * n; e += threads) {
    const int i = e / n, j = e - i * n;
    if (j <= i) {
      const double x = g[e];
      a[packed_index(i, j)] = x;
      largest = ::fmax(largest, ::fabs(x));
    }
    a[vector_index(n, i, j)] = i == j ? 1.0 : 0.0;
  }
  return largest;
}

// Convergence test terms: this thread's scaled sums of squares, off-diagonal and diagonal.
template <class Store>
PCCFAST_HD void norm_step(int tid, int threads, const Store& a, int n, double scale,
                          double* off2, double* diag2) {
  *off2 = 0.0;
  *diag2 = 0.0;
  for (int e = tid; e < n * n; e += threads) {
    const int i = e / n, j = e - i * n;
    if (j <= i) add_norm_terms(a, i, j, scale, off2, diag2);
  }
}

// Round phase 1: the rotations of this thread's pairs, their diagonal blocks updated.
template <class Store>
PCCFAST_HD void rotation_step(int tid, int threads, const Store& a, int n, int round,
                              const SharedLayout& l) {
  for (int k = tid; k < pair_count(n); k += threads) {
    int p, q;
    round_pair(round, k, n, &p, &q);
    l.firsts[k] = p;
    l.seconds[k] = q;
    rotate_pair(a, n, p, q, &l.cosines[k], &l.sines[k]);
  }
}

// Round phase 2: this thread's off-diagonal blocks, then a warp per pair on the eigenvector
// rows (coalesced along V^T's rows).
template <class Store>
PCCFAST_HD void update_step(int tid, int threads, const Store& a, int n,
                            const SharedLayout& l) {
  const int pairs = pair_count(n), items = block_items(n);
  for (int item = tid; item < items; item += threads) {
    int k, m;
    if (block_item(item, pairs, &k, &m)) {
      rotate_block(a, n, l.firsts[k], l.seconds[k], l.cosines[k], l.sines[k], l.firsts[m],
                   l.seconds[m], l.cosines[m], l.sines[m]);
    }
  }
  const int lane = tid % kWarp, warp = tid / kWarp, warps = threads / kWarp;
  for (int k = warp; k < pairs; k += warps) {
    const int p = l.firsts[k], q = l.seconds[k];
    if (q >= n) continue;
    const double c = l.cosines[k], s = l.sines[k];
    for (int j = lane; j < n; j += kWarp) rotate_vectors(a, n, p, q, c, s, j);
  }
}

template <class Store>
PCCFAST_HD void rank_step(int tid, int threads, const Store& a, int n, int* ranks) {
  for (int i = tid; i < n; i += threads) ranks[i] = sorted_rank(a, n, i);
}

// Output: eigenvalue i at its rank, its eigenvector as row `rank` of vectors_t.
template <class Store>
PCCFAST_HD void write_step(int tid, int threads, const Store& a, int n, const int* ranks,
                           double* values, double* vectors_t) {
  for (int i = tid; i < n; i += threads) values[ranks[i]] = a[packed_index(i, i)];
  const int lane = tid % kWarp, warp = tid / kWarp, warps = threads / kWarp;
  for (int i = warp; i < n; i += warps) {
    const int row = ranks[i];
    for (int j = lane; j < n; j += kWarp) vectors_t[row * n + j] = a[vector_index(n, i, j)];
  }
}

#if !defined(__CUDA_ARCH__)
// The kernel's block sum: a shuffle-down tree in each warp (lane += lane + offset, offsets
// 16..1; lanes past the warp add their own value), then the same tree over the warp sums.
inline double block_sum_host(const double* partial, int threads) {
  auto warp_tree = [](double* v) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      double next[kWarp];
      for (int lane = 0; lane < kWarp; ++lane) {
        next[lane] = v[lane] + (lane + offset < kWarp ? v[lane + offset] : v[lane]);
      }
      for (int lane = 0; lane < kWarp; ++lane) v[lane] = next[lane];
    }
    return v[0];
  };
  const int warps = (threads + kWarp - 1) / kWarp;
  double sums[kWarp];
  for (int w = 0; w < warps; ++w) {
    double v[kWarp];
    for (int lane = 0; lane < kWarp; ++lane) v[lane] = partial[w * kWarp + lane];
    sums[w] = warp_tree(v);
  }
  double v[kWarp];
  for (int lane = 0; lane < kWarp; ++lane) v[lane] = lane < warps ? sums[lane] : 0.0;
  return warp_tree(v);
}

template <class Store>
int jacobi_block_host(const Store& a, const SharedLayout& l, const double* gram, int n,
                      double* values, double* vectors_t) {
  const int threads = threads_for(n);
  std::vector<double> off(threads), diag(threads);
  double largest = 0.0;
  for (int tid = 0; tid < threads; ++tid) {
    largest = ::fmax(largest, load_step(tid, threads, gram, n, a));
  }
  const double scale = norm_scale(largest);
  int sweeps = -1;
  for (int sweep = 0;; ++sweep) {
    for (int tid = 0; tid < threads; ++tid) {
      norm_step(tid, threads, a, n, scale, &off[tid], &diag[tid]);
    }
    if (converged(block_sum_host(off.data(), threads), block_sum_host(diag.data(), threads))) {
      sweeps = sweep;
      break;
    }
    if (sweep == kMaxSweeps) break;
    for (int round = 0; round < round_count(n); ++round) {
      for (int tid = 0; tid < threads; ++tid) rotation_step(tid, threads, a, n, round, l);
      for (int tid = 0; tid < threads; ++tid) update_step(tid, threads, a, n, l);
    }
  }
  for (int tid = 0; tid < threads; ++tid) rank_step(tid, threads, a, n, l.ranks);
  for (int tid = 0; tid < threads; ++tid) {
    write_step(tid, threads, a, n, l.ranks, values, vectors_t);
  }
  return sweeps;
}

// The kernel's block for one matrix, run on the host: the same layout (shared_bytes of
// "shared memory", the rest of the storage spilled), the same steps for every thread between
// the same barriers, the same reduction order. gram: (n, n) row-major (lower triangle read)
// -> values (n) ascending, vectors_t (n, n) with row k the eigenvector of values[k]; returns
// the sweeps used, or -1 if it did not converge (non-finite input).
inline int jacobi_eigh_host(const double* gram, int n, double* values, double* vectors_t,
                            int shared_bytes = kHopperSharedBytes) {
  const int cap = shared_capacity(n, shared_bytes);
  if (cap < 0) return -1;
  std::vector<double> shared((fixed_shared_bytes(n) + 7) / 8 + cap);
  std::vector<double> spill(storage_size(n) - cap);
  const SharedLayout l = shared_layout(reinterpret_cast<unsigned char*>(shared.data()), n);
  if (spill.empty()) {
    return jacobi_block_host(SharedStorage{l.storage}, l, gram, n, values, vectors_t);
  }
  return jacobi_block_host(SplitStorage{l.storage, spill.data(), cap}, l, gram, n, values,
                           vectors_t);
}
#endif

}  // namespace jacobi
}  // namespace pccfast
