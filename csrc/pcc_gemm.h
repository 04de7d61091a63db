// Row-major C = alpha A B + beta C on raw pointers, for the per-group products of the CPU PCC
// kernels: thousands of small products per call, where at::cpu::mm_out's per-call overhead
// (tensor checks and dispatch, microseconds) costs as much as the arithmetic. Calls the
// Fortran BLAS that libtorch_cpu exports (MKL's sgemm_ / dgemm_) when the process has it, and
// at::cpu::addmm_out on views of the same memory otherwise (a torch built with another BLAS).
#pragma once

#include <ATen/ATen.h>
#include <cstdlib>
#include <string>
#include <ATen/ops/addmm_cpu_dispatch.h>

extern "C" {
// Weak: resolved at load time when libtorch_cpu exports them, null otherwise.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace pccfast {

// PCCFAST_PCC_GEMM=aten takes the at::cpu::addmm_out path even where the exported BLAS exists,
// so that the path a torch built with another BLAS takes is tested too (read once).
inline bool exported_blas_allowed() {
  static const bool allowed = [] {
    const char* choice = std::getenv("PCCFAST_PCC_GEMM");
    return choice == nullptr || std::string(choice) != "aten";
  }();
  return allowed;
}

// One operand: rows x cols, row-major with leading dimension ld, or its transpose.
template <typename acc_t>
struct Operand {
  const acc_t* data;
  int64_t ld;
  bool transposed;
};

template <typename acc_t>
at::Tensor operand_view(const Operand<acc_t>& op, int64_t rows, int64_t cols) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  auto* data = const_cast<acc_t*>(op.data);
  if (op.transposed) return at::from_blob(data, {rows, cols}, {1, op.ld}, options);
  return at::from_blob(data, {rows, cols}, {op.ld, 1}, options);
}

// C (m x n, leading dimension ldc) = alpha * A (m x k) B (k x n) + beta * C.
template <typename acc_t>
void gemm(int64_t m, int64_t n, int64_t k, acc_t alpha, Operand<acc_t> a, Operand<acc_t> b,
          acc_t beta, acc_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // Row-major C = A B is column-major C^T = B^T A^T: B first, its transpose flag as it is.
  const char ta = b.transposed ? 'T' : 'N', tb = a.transposed ? 'T' : 'N';
  const int im = int(n), in = int(m), ik = int(k), lda = int(b.ld), ldb = int(a.ld),
            ic = int(ldc);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (sgemm_ && exported_blas_allowed()) {
      sgemm_(&ta, &tb, &im, &in, &ik, &alpha, b.data, &lda, a.data, &ldb, &beta, c, &ic);
      return;
    }
  } else {
    if (dgemm_ && exported_blas_allowed()) {
      dgemm_(&ta, &tb, &im, &in, &ik, &alpha, b.data, &lda, a.data, &ldb, &beta, c, &ic);
      return;
    }
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  at::cpu::addmm_out(out, out, operand_view(a, m, k), operand_view(b, k, n), beta, alpha);
}

}  // namespace pccfast
