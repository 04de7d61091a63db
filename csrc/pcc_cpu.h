// PCC forward and backward on the CPU (SPEC section 1). Between forward and backward only the
// per-row statistics (mean, rstd) are kept, and for "abs" where they are small (at most 1/8 of
// the activation's fp32 bytes) the 2-bit signs of R, which spare the backward forming R again.
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

// score (0-d), mean and rstd ((G, M)) in the compute dtype, and the signs of R kept for the
// backward: uint8 (G, bytes per group), or (0,) where none are kept (see pcc_cpu.cpp).
using PCCOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Bytes per group of the sign codes pcc_forward keeps for groups of `rows` rows of `features`
// features (header included), 0 where it keeps none: a rule of shapes and options alone, so
// the fake implementation (pccfast/ops/pcc_cpu.py) gives the real shape by calling it.
int64_t pcc_sign_code_bytes(int64_t rows, int64_t features, const PCCConfig& cfg);

// x: (N, C, H, W) -> PCCOutputs.
PCCOutputs pcc_forward_cpu(const at::Tensor& x, const PCCConfig& cfg);

// -> dx with x's dtype, shape and memory format. sign_codes: the forward's 4th output, or an
// empty (0,) uint8 tensor (then R is formed again).
at::Tensor pcc_backward_cpu(const at::Tensor& grad_score, const at::Tensor& x,
                            const at::Tensor& mean, const at::Tensor& rstd,
                            const at::Tensor& sign_codes, const PCCConfig& cfg);

}  // namespace pccfast
