"""The CUDA CI solver's own ops: the batched Jacobi eigensolver and its host emulation.

``channel_independence`` on CUDA tensors runs kernels/ci_cuda.cu (through
:mod:`pccfast.ops.ci_compiled`); this module exposes the eigensolver inside it for tests and
benchmarks:

* :func:`batched_eigh` -- ``torch.ops.pccfast.batched_eigh``, one thread block per matrix,
  parallel-order Jacobi rotations in float64 (CUDA builds only);
* :func:`jacobi_eigh_reference` -- ``torch.ops.pccfast.jacobi_eigh_reference``, the same
  algorithm (same rotations, ordering, convergence test, kernels/jacobi_eigh.cuh) run on the
  CPU, so its numerics are testable without a GPU and a GPU run can be compared with it.
"""

from __future__ import annotations

import torch

from . import _C

_registered = False


def _fake_eigh(gram):
    b, n, _ = gram.shape
    return gram.new_empty((b, n)), gram.new_empty((b, n, n))


def _fake_reference(gram):
    b, n, _ = gram.shape
    return gram.new_empty((b, n)), gram.new_empty((b, n, n)), gram.new_empty((b,), dtype=torch.int32)


def register() -> bool:
    """Adds fake implementations (for torch.compile) once; False without the extension."""
    global _registered
    if _registered:
        return True
    if _C.extension() is None:
        return False
    if has_batched_eigh():
        torch.library.register_fake("pccfast::batched_eigh")(_fake_eigh)
    torch.library.register_fake("pccfast::jacobi_eigh_reference")(_fake_reference)
    _registered = True
    return True


def has_batched_eigh() -> bool:
    """True when the extension was built with the CUDA kernels (the op then exists)."""
    return _C.extension() is not None and hasattr(torch.ops.pccfast, "batched_eigh")


def _check_gram(gram) -> None:
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.dtype != torch.float64:
        raise TypeError(f"gram must be float64, got {gram.dtype}")
    if gram.dim() != 3 or gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram must have shape (B, n, n), got {tuple(gram.shape)}")


def batched_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gram: (B, n, n) float64 CUDA, symmetric -> (eigenvalues (B, n) ascending,
    eigenvectors (B, n, n) as columns), like ``torch.linalg.eigh`` (lower triangle read)."""
    _check_gram(gram)
    if not has_batched_eigh():
        reason = _C.unavailable_reason() or "pccfast._C was built without CUDA kernels"
        raise ValueError(f"batched_eigh is unavailable: {reason}")
    if gram.device.type != "cuda":
        raise ValueError(f"gram must be a CUDA tensor, got {gram.device}")
    register()
    return torch.ops.pccfast.batched_eigh(gram)


def jacobi_eigh_reference(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gram: (B, n, n) float64 CPU -> (eigenvalues (B, n), eigenvectors (B, n, n), sweeps (B,)
    int32, -1 where it did not converge): the CUDA kernel's algorithm on the host."""
    _check_gram(gram)
    if _C.extension() is None:
        raise ValueError(f"jacobi_eigh_reference is unavailable: {_C.unavailable_reason()}")
    if gram.device.type != "cpu":
        raise ValueError(f"gram must be a CPU tensor, got {gram.device}")
    register()
    return torch.ops.pccfast.jacobi_eigh_reference(gram)
