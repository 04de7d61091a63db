// The device-agnostic half of the fast CI algorithm (SPEC section 2), written with ATen ops so
// that the CPU and CUDA kernels share it: spectral weights from an eigendecomposition of the
// small-side Gram matrix, then the quadrature for every channel as two batched matrix products.
// pccfast/ops/ci_reference.py is the readable specification of the same steps.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace pccfast {

// Trapezoid step in x = log(t)/2 (error ~ exp(-pi^2 / step)).
constexpr double kQuadratureStep = 0.35;
// Matrix-product nodes run this far past the spectrum; asymptotic forms cover the rest.
constexpr double kQuadratureMargin = 10.0;
// Per-channel lower extension beyond the matrix-product nodes.
constexpr double kLowerExtension = 20.0;

// a: (B, C, P) float64; (eigenvalues (B, m), eigenvectors (B, m, m)) of A A^T when C <= P, else
// of A^T A. -> lam (B, m) with deflated eigenvalues exactly 0, W (B, C, m), null weight (B, C).
std::tuple<at::Tensor, at::Tensor, at::Tensor> spectral_weights(const at::Tensor& a,
                                                                const at::Tensor& eigenvalues,
                                                                const at::Tensor& eigenvectors);

// -> CI (B, C) float64 from the output of spectral_weights. CPU tensors take a fused loop for
// the elementwise part after the two matrix products (`fused_cpu_tail`), other devices ATen ops.
at::Tensor ci_quadrature(const at::Tensor& lam, const at::Tensor& weights, const at::Tensor& null,
                         bool fused_cpu_tail = true);

// The small-side Gram matrix of each image: A A^T (C <= P) or A^T A (C > P), float64.
at::Tensor small_side_gram(const at::Tensor& a);

// How many images to process at once so the quadrature intermediates stay near 64 MB.
int64_t ci_chunk(int64_t channels, int64_t pixels);

}  // namespace pccfast
