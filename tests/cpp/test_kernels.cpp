// C++ unit tests of the CPU kernels (run by ctest; `make cpp-test`). Each kernel is compared with
// the definition written with plain ATen ops (and libtorch autograd for gradients).
#include <torch/torch.h>

#include <cstdio>
#include <string>
#include <vector>

#include "ci_cpu.h"
#include "ci_quadrature.h"
#include "pcc_cpu.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// CI_c = ||A||_* - ||A with row c zeroed||_*, one SVD per channel.
torch::Tensor ci_bruteforce(const torch::Tensor& a) {
  const int64_t c = a.size(0);
  auto out = torch::empty({c}, a.options());
  const double full = torch::linalg_svdvals(a).sum().item<double>();
  for (int64_t i = 0; i < c; ++i) {
    auto masked = a.clone();
    masked[i].zero_();
    out[i] = full - torch::linalg_svdvals(masked).sum().item<double>();
  }
  return out;
}

void test_ci_against_bruteforce() {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 5}, {5, 1}, {6, 6}, {9, 20}, {20, 9}, {33, 64}};
  for (auto [c, p] : shapes) {
    auto a = torch::randn({3, c, p}, torch::kFloat64).relu();
    if (c > 3) {
      a.select(1, 0).zero_();                       // dead channel
      a.select(1, 2).copy_(a.select(1, 1));         // duplicated channel
      a.select(1, 3).mul_(1e-6);                    // tiny channel
    }
    const auto got = pccfast::channel_independence_cpu(a);
    for (int64_t i = 0; i < 3; ++i) {
      const double nuc = torch::linalg_svdvals(a[i]).sum().item<double>();
      const double err = (got[i] - ci_bruteforce(a[i])).abs().max().item<double>();
      check(err <= 1e-7 * nuc, "CI accuracy bar at C=" + std::to_string(c) + " P=" + std::to_string(p));
      check((got[i] >= 0).all().item<bool>(), "CI >= 0");
    }
    if (c > 3) check((got.select(1, 0) == 0).all().item<bool>(), "dead channel has CI 0");
  }
}

// The fused CPU tail of the quadrature against the ATen version the CUDA kernel uses.
void test_quadrature_tails_agree() {
  for (auto [c, p] : std::vector<std::pair<int64_t, int64_t>>{{12, 40}, {40, 12}, {7, 7}}) {
    auto a = torch::randn({5, c, p}, torch::kFloat64).relu();
    a.select(1, 0).zero_();
    auto [values, vectors] = torch::linalg_eigh(pccfast::small_side_gram(a));
    auto [lam, weights, null] = pccfast::spectral_weights(a, values, vectors);
    const auto fused = pccfast::ci_quadrature(lam, weights, null, /*fused_cpu_tail=*/true);
    const auto generic = pccfast::ci_quadrature(lam, weights, null, /*fused_cpu_tail=*/false);
    const double scale = generic.abs().max().item<double>();
    check((fused - generic).abs().max().item<double>() <= 1e-13 * scale,
          "fused and ATen quadrature tails agree at C=" + std::to_string(c));
  }
}

// The PCC score by its definition, differentiable by libtorch autograd.
torch::Tensor pcc_definition(const torch::Tensor& x, const pccfast::PCCConfig& cfg) {
  auto v = x.to(torch::kFloat64);
  if (cfg.group == pccfast::Group::BatchMean) v = v.mean(0, true);
  const int64_t n = v.size(0), c = v.size(1), p = v.size(2) * v.size(3);
  torch::Tensor rows;
  if (cfg.pixel) {
    rows = v.reshape({n, c, p}).transpose(1, 2);
  } else if (cfg.group == pccfast::Group::Batch) {
    rows = v.transpose(0, 1).reshape({1, c, n * p});
  } else {
    rows = v.reshape({n, c, p});
  }
  auto centered = rows - rows.mean(-1, true);
  auto vhat = centered * (centered.square().mean(-1, true) + cfg.eps).rsqrt();
  auto r = torch::matmul(vhat, vhat.transpose(1, 2)) / double(vhat.size(2));
  auto phi = cfg.square ? r.square() : r.abs();
  const int64_t m = r.size(1);
  if (!cfg.include_diagonal) phi = phi * (1 - torch::eye(m, torch::kFloat64));
  const double pairs = cfg.include_diagonal ? m * m : m * (m - 1);
  return phi.sum() / (double(r.size(0)) * pairs);
}

void test_pcc_against_definition() {
  const char* orientations[] = {"channel", "pixel"};
  const char* groups[] = {"sample", "batch", "batch_mean"};
  const char* penalties[] = {"abs", "square"};
  for (auto o : orientations)
    for (auto g : groups)
      for (auto pen : penalties)
        for (bool diag : {false, true}) {
          if (std::string(o) == "pixel" && std::string(g) == "batch") continue;
          const auto cfg = pccfast::parse_pcc_config(o, g, pen, diag, 1e-5);
          const std::string name = std::string(o) + "/" + g + "/" + pen + (diag ? "/diag" : "");
          auto x = torch::randn({3, 5, 2, 3}, torch::kFloat64).requires_grad_(true);
          auto want = pcc_definition(x, cfg);
          auto grad_want = torch::autograd::grad({want}, {x})[0];
          auto [score, mean, rstd, codes] = pccfast::pcc_forward_cpu(x.detach(), cfg);
          check(std::abs(score.item<double>() - want.item<double>()) <= 1e-12, "PCC forward " + name);
          auto grad = pccfast::pcc_backward_cpu(torch::ones({}, torch::kFloat64), x.detach(), mean, rstd, codes, cfg);
          const double scale = grad_want.abs().max().item<double>() + 1e-30;
          check((grad - grad_want).abs().max().item<double>() <= 1e-9 * scale, "PCC backward " + name);
        }
}

}  // namespace

int main() {
  torch::manual_seed(0);
  test_ci_against_bruteforce();
  test_quadrature_tails_agree();
  test_pcc_against_definition();
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
