"""The CUDA CI solver's parts as ops of their own, and their host emulations.

``channel_independence`` on CUDA tensors runs kernels/ci_cuda.cu (through
:mod:`pccfast.ops.ci_compiled`). For tests and benchmarks this module exposes its pieces:

* CUDA builds only: :func:`batched_eigh` (``torch.ops.pccfast.batched_eigh``: one thread block
  per matrix, parallel-order Jacobi rotations in float64) and :func:`small_side_gram` (the
  fused Gram kernel: A A^T or A^T A in float64 from activations of any float dtype).
* Every build: the same kernels emulated on the CPU -- the kernels' own per-thread steps
  (kernels/jacobi_eigh.cuh, kernels/gemm_f64.cuh) run in their order, and the CUDA operator's
  host flow (kernels/ci_cuda_flow.h) on top: :func:`jacobi_eigh_emulation`,
  :func:`small_side_gram_emulation`, :func:`channel_independence_emulation`. Their results
  are what the GPU computes (the Jacobi and Gram steps bit for bit: every product-sum is an
  explicit fma), so the CPU test suite checks the CUDA numerics; slow, not a fast path.
"""

from __future__ import annotations

import torch

from . import _C

HOPPER_SHARED_BYTES = 232448  # per-block shared memory of an H100/H200


def _fake_eigh(gram):
    b, n, _ = gram.shape
    return gram.new_empty((b, n)), gram.new_empty((b, n, n))


def _fake_eigh_emulation(gram, shared_bytes=HOPPER_SHARED_BYTES):
    b, n, _ = gram.shape
    sweeps = gram.new_empty((b,), dtype=torch.int32)
    return gram.new_empty((b, n)), gram.new_empty((b, n, n)), sweeps


def _fake_gram(fmaps):
    b, c, p = fmaps.shape
    m = min(c, p)
    return fmaps.new_empty((b, m, m), dtype=torch.float64)


def _fake_ci(fmaps, chunk=0):
    b, c, _ = fmaps.shape
    return fmaps.new_empty((b, c), dtype=torch.float64)


def has_cuda_ops() -> bool:
    """True when the extension was built with the CUDA kernels (the CUDA-only ops exist)."""
    return _C.extension() is not None and hasattr(torch.ops.pccfast, "batched_eigh")


@_C.registration
def register() -> None:
    """Adds fake implementations (for torch.compile) at import; only with the extension."""
    if has_cuda_ops():
        torch.library.register_fake("pccfast::batched_eigh")(_fake_eigh)
        torch.library.register_fake("pccfast::small_side_gram")(_fake_gram)
    torch.library.register_fake("pccfast::jacobi_eigh_emulation")(_fake_eigh_emulation)
    torch.library.register_fake("pccfast::small_side_gram_emulation")(_fake_gram)
    torch.library.register_fake("pccfast::channel_independence_emulation")(_fake_ci)


def _check_tensor(name: str, x, ndim: int, device_type: str, float64: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if float64 and x.dtype != torch.float64:
        raise TypeError(f"{name} must be float64, got {x.dtype}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.device.type != device_type:
        raise ValueError(f"{name} must be a {device_type.upper()} tensor, got {x.device}")


def _check_gram(gram, device_type: str) -> None:
    _check_tensor("gram", gram, 3, device_type, float64=True)
    if gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram must have shape (B, n, n), got {tuple(gram.shape)}")


def _need_extension(what: str, cuda: bool) -> None:
    reason = _C.unavailable_reason()
    if reason is None and cuda and not has_cuda_ops():
        reason = "pccfast._C was built without CUDA kernels (PCCFAST_CUDA=1 builds them)"
    if reason is not None:
        raise ValueError(f"{what} is unavailable: {reason}")


def batched_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gram: (B, n, n) float64 CUDA, symmetric -> (eigenvalues (B, n) ascending,
    eigenvectors (B, n, n) as columns), like ``torch.linalg.eigh`` (lower triangle read).
    Raises ValueError where the iteration does not converge (NaN/Inf input)."""
    _need_extension("batched_eigh", cuda=True)
    _check_gram(gram, "cuda")
    return torch.ops.pccfast.batched_eigh(gram)


def small_side_gram(fmaps: torch.Tensor) -> torch.Tensor:
    """fmaps: (B, C, P) any float dtype CUDA -> (B, m, m) float64, m = min(C, P):
    A A^T when C <= P, else A^T A (the first kernel of the CUDA CI)."""
    _need_extension("small_side_gram", cuda=True)
    _check_tensor("fmaps", fmaps, 3, "cuda", float64=False)
    return torch.ops.pccfast.small_side_gram(fmaps)


def jacobi_eigh_emulation(
    gram: torch.Tensor, shared_bytes: int = HOPPER_SHARED_BYTES
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gram: (B, n, n) float64 CPU -> (eigenvalues (B, n), eigenvectors (B, n, n), sweeps (B,)
    int32, -1 where it did not converge): the batched_eigh kernel's block run on the host.
    ``shared_bytes`` is the emulated shared memory; less spills more of each matrix's storage
    to global memory (the results must not change)."""
    _need_extension("jacobi_eigh_emulation", cuda=False)
    _check_gram(gram, "cpu")
    return torch.ops.pccfast.jacobi_eigh_emulation(gram, shared_bytes)


def small_side_gram_emulation(fmaps: torch.Tensor) -> torch.Tensor:
    """fmaps: (B, C, P) any float dtype CPU -> (B, m, m) float64: the Gram kernel on the host."""
    _need_extension("small_side_gram_emulation", cuda=False)
    _check_tensor("fmaps", fmaps, 3, "cpu", float64=False)
    return torch.ops.pccfast.small_side_gram_emulation(fmaps)


def channel_independence_emulation(fmaps: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """fmaps: (B, C, P) any float dtype CPU -> CI (B, C) float64: the CUDA operator (with its
    Jacobi eigensolver) with every kernel replaced by its host emulation. ``chunk``: images per
    step (0: the operator's own choice)."""
    _need_extension("channel_independence_emulation", cuda=False)
    _check_tensor("fmaps", fmaps, 3, "cpu", float64=False)
    return torch.ops.pccfast.channel_independence_emulation(fmaps, chunk)
