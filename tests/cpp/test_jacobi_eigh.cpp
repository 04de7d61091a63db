// Host test of the CUDA Jacobi eigensolver's algorithm (kernels/jacobi_eigh.cuh), without torch
// or a GPU: the round-robin ordering meets every pair once per sweep with disjoint rounds, the
// block enumeration covers every pair of pairs once, and jacobi_eigh_host returns an accurate,
// sorted, orthonormal eigendecomposition for random, degenerate, rank-deficient and graded
// matrices of sizes 1..48. Exit status 0 on success; failures are printed.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "jacobi_eigh.cuh"

namespace {

namespace J = pccfast::jacobi;

int failures = 0;

void expect(bool ok, const char* what, int n, double value = 0.0) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s (n=%d, value=%g)\n", what, n, value);
  }
}

void test_ordering(int n) {
  const int pairs = J::pair_count(n);
  std::set<std::pair<int, int>> met;
  for (int round = 0; round < J::round_count(n); ++round) {
    std::vector<int> seen(J::padded_size(n), 0);
    for (int k = 0; k < pairs; ++k) {
      int p, q;
      J::round_pair(round, k, n, &p, &q);
      expect(p < q && q < J::padded_size(n), "pair indices in range", n);
      seen[p] += 1;
      seen[q] += 1;
      if (q < n) expect(met.insert({p, q}).second, "pair met twice in a sweep", n);
    }
    for (int s : seen) expect(s == 1, "round not a perfect matching", n);
  }
  expect(int(met.size()) == n * (n - 1) / 2, "sweep misses a pair", n);

  std::set<std::pair<int, int>> blocks;
  for (int item = 0; item < J::block_items(n); ++item) {
    int k, l;
    if (!J::block_item(item, pairs, &k, &l)) continue;
    expect(k != l && k < pairs && l < pairs, "block pair in range", n);
    expect(blocks.insert({std::min(k, l), std::max(k, l)}).second, "block listed twice", n);
  }
  expect(int(blocks.size()) == pairs * (pairs - 1) / 2, "block list incomplete", n);
}

// (n x n) row-major symmetric test matrix: Q diag(values) Q^T with Q from Gram-Schmidt.
std::vector<double> with_spectrum(const std::vector<double>& values, std::mt19937_64& rng) {
  const int n = int(values.size());
  std::normal_distribution<double> normal;
  std::vector<double> q(n * n);
  for (double& x : q) x = normal(rng);
  for (int i = 0; i < n; ++i) {  // orthonormalise the rows
    for (int j = 0; j < i; ++j) {
      double dot = 0.0;
      for (int k = 0; k < n; ++k) dot += q[i * n + k] * q[j * n + k];
      for (int k = 0; k < n; ++k) q[i * n + k] -= dot * q[j * n + k];
    }
    double norm = 0.0;
    for (int k = 0; k < n; ++k) norm += q[i * n + k] * q[i * n + k];
    for (int k = 0; k < n; ++k) q[i * n + k] /= std::sqrt(norm);
  }
  std::vector<double> g(n * n, 0.0);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      double s = 0.0;
      for (int k = 0; k < n; ++k) s += q[k * n + i] * values[k] * q[k * n + j];
      g[i * n + j] = s;
    }
  }
  for (int i = 0; i < n; ++i) {  // exactly symmetric
    for (int j = 0; j < i; ++j) g[j * n + i] = g[i * n + j];
  }
  return g;
}

void check_solution(const std::vector<double>& g, int n, const char* kind,
                    const std::vector<double>* exact_values) {
  std::vector<double> values(n), vectors_t(n * n);
  const int sweeps = J::jacobi_eigh_host(g.data(), n, values.data(), vectors_t.data());
  expect(sweeps >= 0 && sweeps <= J::kMaxSweeps, kind, n, sweeps);
  // The same block with a fraction of its storage in shared memory: the same bits.
  std::vector<double> values2(n), vectors_t2(n * n);
  const int small = J::fixed_shared_bytes(n) + 8 * (J::storage_size(n) / 3);
  const int sweeps2 = J::jacobi_eigh_host(g.data(), n, values2.data(), vectors_t2.data(), small);
  expect(sweeps2 == sweeps && values2 == values && vectors_t2 == vectors_t, "spill changes bits",
         n);
  double norm = 0.0;
  for (double x : g) norm = std::fmax(norm, std::fabs(x));
  norm = std::fmax(norm * n, 1e-300);  // >= the spectral norm
  const double tol = 16.0 * std::max(n, 4) * 2.220446049250313e-16;
  for (int i = 1; i < n; ++i) expect(values[i - 1] <= values[i], "ascending", n);
  double residual = 0.0, orthogonality = 0.0;
  for (int k = 0; k < n; ++k) {
    for (int i = 0; i < n; ++i) {  // (G v_k - lam_k v_k)_i
      double s = 0.0;
      for (int j = 0; j < n; ++j) s += g[i * n + j] * vectors_t[k * n + j];
      residual = std::fmax(residual, std::fabs(s - values[k] * vectors_t[k * n + i]));
    }
    for (int l = 0; l < n; ++l) {
      double dot = 0.0;
      for (int j = 0; j < n; ++j) dot += vectors_t[k * n + j] * vectors_t[l * n + j];
      orthogonality = std::fmax(orthogonality, std::fabs(dot - (k == l ? 1.0 : 0.0)));
    }
  }
  expect(residual <= tol * norm, kind, n, residual / norm);
  expect(orthogonality <= tol, kind, n, orthogonality);
  if (exact_values != nullptr) {
    std::vector<double> sorted = *exact_values;
    std::sort(sorted.begin(), sorted.end());
    for (int i = 0; i < n; ++i) {
      expect(std::fabs(values[i] - sorted[i]) <= tol * norm, kind, n, values[i] - sorted[i]);
    }
  }
}

}  // namespace

int main() {
  for (int n = 1; n <= 64; ++n) test_ordering(n);

  std::mt19937_64 rng(20240601);
  std::normal_distribution<double> normal;
  for (int n = 1; n <= 48; ++n) {
    std::vector<double> spread(n), repeated(n), deficient(n, 0.0);
    for (int i = 0; i < n; ++i) {
      spread[i] = normal(rng);
      repeated[i] = double(1 + i / 3);
      if (i < n / 3) deficient[i] = 1.0 + i;
    }
    check_solution(with_spectrum(spread, rng), n, "random spectrum", &spread);
    check_solution(with_spectrum(repeated, rng), n, "repeated eigenvalues", &repeated);
    check_solution(with_spectrum(deficient, rng), n, "rank deficient", &deficient);

    std::vector<double> x(n * (n + 2)), graded(n * n, 0.0), scale(n);
    for (double& v : x) v = normal(rng);
    for (int i = 0; i < n; ++i) scale[i] = std::pow(10.0, -8.0 + 16.0 * i / std::max(n - 1, 1));
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        double s = 0.0;
        for (int k = 0; k < n + 2; ++k) s += x[i * (n + 2) + k] * x[j * (n + 2) + k];
        graded[i * n + j] = scale[i] * s * scale[j];
      }
    }
    check_solution(graded, n, "graded", nullptr);
  }

  // A diagonal matrix is already converged: no sweep, exact sorted values.
  const std::vector<double> diagonal = {3.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 2.0};
  std::vector<double> values(3), vectors_t(9);
  const int sweeps = J::jacobi_eigh_host(diagonal.data(), 3, values.data(), vectors_t.data());
  expect(sweeps == 0 && values[0] == -1.0 && values[1] == 2.0 && values[2] == 3.0, "diagonal", 3);

  // NaN is reported as not converged instead of returned as an answer.
  std::vector<double> bad = {1.0, NAN, NAN, 1.0};
  expect(J::jacobi_eigh_host(bad.data(), 2, values.data(), vectors_t.data()) == -1,
         "NaN input not reported", 2);
  std::vector<double> inf_diagonal = {1.0, 0.5, 0.5, INFINITY};
  expect(J::jacobi_eigh_host(inf_diagonal.data(), 2, values.data(), vectors_t.data()) == -1,
         "Inf input not reported", 2);

  // The shared-memory layout: arrays in order, no overlap, storage 8-byte aligned after them.
  for (int n = 1; n <= 600; n += 37) {
    alignas(16) static unsigned char base[1 << 16];
    const J::SharedLayout l = J::shared_layout(base, n);
    const int pairs = J::pair_count(n);
    const unsigned char* end_ints = reinterpret_cast<unsigned char*>(l.ranks + n);
    expect(reinterpret_cast<unsigned char*>(l.firsts) ==
               reinterpret_cast<unsigned char*>(l.cosines + 2 * pairs + 2 * J::kWarp),
           "layout: ints after doubles", n);
    expect(end_ints <= reinterpret_cast<unsigned char*>(l.storage), "layout: overlap", n);
    expect(reinterpret_cast<unsigned char*>(l.storage) - base == J::fixed_shared_bytes(n) &&
               J::fixed_shared_bytes(n) % 16 == 0,
           "layout: storage offset", n);
  }

  if (failures == 0) std::printf("jacobi_eigh host tests passed\n");
  return failures == 0 ? 0 : 1;
}
