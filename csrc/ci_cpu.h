// CI on the CPU (SPEC section 2): fmaps (B, C, P), any float dtype -> (B, C) float64.
#pragma once

#include <ATen/ATen.h>

namespace pccfast {

at::Tensor channel_independence_cpu(const at::Tensor& fmaps);

}  // namespace pccfast
