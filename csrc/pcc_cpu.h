// PCC forward and backward on the CPU (SPEC section 1), chunked over groups so that between
// forward and backward only the per-row statistics (mean, rstd) are kept.
#pragma once

#include <ATen/ATen.h>

#include <string_view>
#include <tuple>

namespace pccfast {

enum class Group { Sample, Batch, BatchMean };

struct PCCConfig {
  bool pixel = false;  // rows are pixel positions (else channels)
  Group group = Group::Sample;
  bool square = false;  // phi(t) = t^2 (else |t|)
  bool include_diagonal = false;
  double eps = 1e-5;
};

PCCConfig parse_pcc_config(std::string_view orientation, std::string_view group,
                           std::string_view penalty, bool include_diagonal, double eps);

// x: (N, C, H, W) -> (score 0-d, mean (G, M), rstd (G, M)), all in the compute dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pcc_forward_cpu(const at::Tensor& x,
                                                               const PCCConfig& cfg);

// -> dx with x's dtype, shape and memory format.
at::Tensor pcc_backward_cpu(const at::Tensor& grad_score, const at::Tensor& x,
                            const at::Tensor& mean, const at::Tensor& rstd, const PCCConfig& cfg);

}  // namespace pccfast
