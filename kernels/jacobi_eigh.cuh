// The parallel-order Jacobi eigensolver for small symmetric float64 matrices, written once for
// the CUDA kernel (kernels/jacobi_eigh.cu: one thread block per matrix) and for the host
// (jacobi_eigh_host below: the same steps one after another, exposed on the CPU as
// pccfast::jacobi_eigh_emulation and run by tests/cpp/test_jacobi_eigh.cpp).
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
// Every product-sum is an explicit fma and CUDA's division and square root are IEEE-rounded
// (no fast math), so host and device perform the same float64 operations on every element: the
// host run reproduces the kernel's results (only the order of the norm sums differs).
//
// Storage: A as the packed lower triangle (n(n+1)/2 doubles), followed by V^T (n*n doubles),
// addressed through a `Store` (a double* on the host; shared memory plus a global-memory
// spill area on the device).
#pragma once

#include <cmath>
#include <cstdint>

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
  const double tau = (aqq - app) / (2.0 * apq);
  double t;
  if (::fabs(tau) > kHugeTau) {
    t = 0.5 / tau;
  } else {
    t = ::copysign(1.0, tau) / (::fabs(tau) + ::sqrt(::fma(tau, tau, 1.0)));
  }
  r.c = 1.0 / ::sqrt(::fma(t, t, 1.0));
  r.s = t * r.c;
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
  const double x00 = ::fma(ck, b00, -(sk * b10)), x01 = ::fma(ck, b01, -(sk * b11));
  const double x10 = ::fma(sk, b00, ck * b10), x11 = ::fma(sk, b01, ck * b11);
  // Columns: (X J)_.p = c x_.p - s x_.q ; (X J)_.q = s x_.p + c x_.q
  a[i00] = ::fma(cl, x00, -(sl * x01));
  if (col_q) a[i01] = ::fma(sl, x00, cl * x01);
  if (row_q) a[i10] = ::fma(cl, x10, -(sl * x11));
  if (row_q && col_q) a[i11] = ::fma(sl, x10, cl * x11);
}

// Round phase 2, one column j of the eigenvector rows (p, q): V <- V J, stored as V^T.
template <class Store>
PCCFAST_HD void rotate_vectors(const Store& a, int n, int p, int q, double c, double s, int j) {
  const int ip = vector_index(n, p, j), iq = vector_index(n, q, j);
  const double vp = a[ip], vq = a[iq];
  a[ip] = ::fma(c, vp, -(s * vq));
  a[iq] = ::fma(s, vp, c * vq);
}

// A power of two that brings the largest |a_ij| into [1, 2) (1 for a zero or non-finite max).
PCCFAST_HD double norm_scale(double largest) {
  if (!(largest > 0.0) || !(largest < INFINITY)) return 1.0;
  return ::ldexp(1.0, -::ilogb(largest));
}

// Adds entry (i, j), j <= i, to the scaled sums of squares: off-diagonal (both triangles) and
// diagonal.
template <class Store>
PCCFAST_HD void add_norm_terms(const Store& a, int i, int j, double scale, double* off2,
                               double* diag2) {
  const double x = a[packed_index(i, j)] * scale;
  if (i == j) {
    *diag2 = ::fma(x, x, *diag2);
  } else {
    *off2 = ::fma(2.0 * x, x, *off2);
  }
}

// The scaled sums are at most 4 n^2, so an infinite or NaN sum means non-finite input: that
// never converges (and is reported as such).
PCCFAST_HD bool converged(double off2, double diag2) {
  const double total = off2 + diag2;
  return total < INFINITY && off2 <= (kTolerance * kTolerance) * total;
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

#if !defined(__CUDA_ARCH__)
// The whole solver for one matrix on the host, step for step the kernel's order.
// gram: (n, n) row-major (lower triangle read) -> values (n) ascending, vectors_t (n, n) with
// row k the eigenvector of values[k]; returns the sweeps used, or -1 if it did not converge.
// `work` holds storage_size(n) + 4 * pair_count(n) doubles.
inline int jacobi_eigh_host(const double* gram, int n, double* values, double* vectors_t,
                            double* work) {
  const int pairs = pair_count(n), rounds = round_count(n), items = block_items(n);
  double* a = work;
  double* cosines = work + storage_size(n);
  double* sines = cosines + pairs;
  int* firsts = reinterpret_cast<int*>(sines + pairs);
  int* seconds = firsts + pairs;
  double largest = 0.0;
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      if (j <= i) {
        a[packed_index(i, j)] = gram[i * n + j];
        largest = ::fmax(largest, ::fabs(gram[i * n + j]));
      }
      a[vector_index(n, i, j)] = i == j ? 1.0 : 0.0;
    }
  }
  const double scale = norm_scale(largest);
  int sweeps = -1;
  for (int sweep = 0;; ++sweep) {
    double off2 = 0.0, diag2 = 0.0;
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j <= i; ++j) add_norm_terms(a, i, j, scale, &off2, &diag2);
    }
    if (converged(off2, diag2)) {
      sweeps = sweep;
      break;
    }
    if (sweep == kMaxSweeps) break;
    for (int round = 0; round < rounds; ++round) {
      for (int k = 0; k < pairs; ++k) {
        round_pair(round, k, n, &firsts[k], &seconds[k]);
        rotate_pair(a, n, firsts[k], seconds[k], &cosines[k], &sines[k]);
      }
      for (int item = 0; item < items; ++item) {
        int k, l;
        if (block_item(item, pairs, &k, &l)) {
          rotate_block(a, n, firsts[k], seconds[k], cosines[k], sines[k], firsts[l], seconds[l],
                       cosines[l], sines[l]);
        }
      }
      for (int k = 0; k < pairs; ++k) {
        if (seconds[k] >= n) continue;
        for (int j = 0; j < n; ++j) {
          rotate_vectors(a, n, firsts[k], seconds[k], cosines[k], sines[k], j);
        }
      }
    }
  }
  for (int i = 0; i < n; ++i) {
    const int rank = sorted_rank(a, n, i);
    values[rank] = a[packed_index(i, i)];
    for (int j = 0; j < n; ++j) vectors_t[rank * n + j] = a[vector_index(n, i, j)];
  }
  return sweeps;
}

// Doubles of `work` that jacobi_eigh_host needs.
inline int jacobi_host_work_size(int n) { return storage_size(n) + 4 * pair_count(n); }
#endif

}  // namespace jacobi
}  // namespace pccfast
