"""CI on the compiled kernels: ``torch.ops.pccfast.channel_independence``.

One operator, two kernels: csrc/ci_cpu.cpp (CPU: batched LAPACK eigendecompositions, parallel
over images) and kernels/ci_cuda.cu (CUDA: fused Gram matrices and a batched Jacobi
eigensolver). Both finish with the same quadrature (csrc/ci_quadrature.cpp). The result is a
score, not a training signal, so the operator has no autograd formula.
"""

from __future__ import annotations

import torch

from . import _C

def _fake(fmaps):
    b, c, _ = fmaps.shape
    return fmaps.new_empty((b, c), dtype=torch.float64)


@_C.registration
def register() -> None:
    """Registers the fake implementation (at import; only with the extension)."""
    torch.library.register_fake("pccfast::channel_independence")(_fake)


def channel_independence(rows: torch.Tensor) -> torch.Tensor:
    """rows: (B, C, P), any float dtype, CPU or CUDA -> CI: (B, C) float64."""
    return torch.ops.pccfast.channel_independence(rows)
