"""The PCC score as users call it: ``pcc``, ``pcc_matrix`` and the ``PCCLoss`` module."""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_choice, is_compiling
from .ops import backends, pcc_cpu
from .ops.pcc_options import DEFAULT_EPS, PCCOptions, check_pcc_input
from .ops.pcc_reference import pcc_matrix_reference, pcc_reference


def _run_backend(name: str, x: torch.Tensor, opts: PCCOptions) -> torch.Tensor:
    if name == "torch":
        return pcc_reference(x, opts)
    if name == "cpu":
        return pcc_cpu.pcc_cpu(x, opts)
    from .ops import pcc_triton  # imported (and its ops registered) with pccfast.ops

    return pcc_triton.pcc_triton(x, opts)


def pcc(
    x: torch.Tensor,
    orientation: str = "channel",
    group: str = "sample",
    penalty: str = "abs",
    include_diagonal: bool = False,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
    check_finite: bool = True,
) -> torch.Tensor:
    """Pixel-level cross-correlation score of a feature map (SPEC section 1).

    x: (N, C, H, W), fp16/bf16/fp32/fp64, any strides -> S, a differentiable 0-d tensor (fp32;
    fp64 for fp64 input): the mean of phi(R) over the groups and the off-diagonal (or all) pairs
    of rows, R being the correlation matrix of the normalised rows.

    ``check_finite`` raises ValueError when the score is NaN/Inf, which happens exactly when x
    holds NaN/Inf; it costs one host sync on CUDA, so a training loop may turn it off (the
    :class:`PCCRegularizer` checks its total once instead).
    """
    opts = PCCOptions(orientation, group, penalty, include_diagonal, eps)
    return pcc_with_options(x, opts, backend, check_finite)


def pcc_with_options(x: torch.Tensor, options: PCCOptions, backend: str = "auto",
                     check_finite: bool = True) -> torch.Tensor:
    """:func:`pcc` with its options as one checked :class:`PCCOptions` value (what
    :class:`PCCLoss` and :class:`~pccfast.PCCRegularizer` hold), not unpacked and rebuilt."""
    check_pcc_input(x, options)
    name = backends.resolve("pcc", backend, x.device, x.dtype)
    score = _run_backend(name, x, options)
    if check_finite and not is_compiling() and not bool(torch.isfinite(score.detach())):
        raise not_finite_error(x, "score", name)
    return score


def not_finite_error(x: torch.Tensor, what: str, backend: str) -> ValueError:
    """Why a PCC result is NaN/Inf: NaN/Inf in x, or finite values that overflow a backend
    (every backend takes the dtype's whole range, but "triton" sums the products of 16-bit
    inputs in fp32 accumulators, which bf16 values around 1e19 overflow)."""
    if not bool(torch.isfinite(x).all()):
        return ValueError(f"x contains NaN or Inf (the PCC {what} is not finite)")
    largest = float(x.detach().abs().max())
    return ValueError(
        f'x is finite but its PCC {what} is not: its values (|x| up to {largest:.3g}) overflow '
        f'the arithmetic of backend "{backend}"; scale x down or use backend="torch"'
    )


def pcc_matrix(
    x: torch.Tensor,
    orientation: str = "channel",
    group: str = "sample",
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """The correlation matrices themselves: x: (N, C, H, W) -> R: (G, M, M) (fp32; fp64 for fp64).

    Materialises R (G*M*M floats), so it is meant for small inputs, inspection and tests.
    """
    opts = PCCOptions(orientation, group, "abs", True, eps)
    check_pcc_input(x, opts)
    r = pcc_matrix_reference(x, opts)
    if not is_compiling() and not bool(torch.isfinite(r).all()):
        raise not_finite_error(x, "matrix", "torch")
    return r


class PCCLoss(nn.Module):
    """``PCCLoss(**options)(x)`` is ``pcc(x, **options)``: a module for losses built from layers."""

    def __init__(
        self,
        orientation: str = "channel",
        group: str = "sample",
        penalty: str = "abs",
        include_diagonal: bool = False,
        eps: float = DEFAULT_EPS,
        backend: str = "auto",
        check_finite: bool = True,
    ):
        super().__init__()
        self.options = PCCOptions(orientation, group, penalty, include_diagonal, eps)
        self.backend = check_choice("backend", backend, backends.BACKENDS)
        self.check_finite = check_finite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pcc_with_options(x, self.options, self.backend, self.check_finite)

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"orientation={o.orientation!r}, group={o.group!r}, penalty={o.penalty!r}, "
            f"include_diagonal={o.include_diagonal}, eps={o.eps}, backend={self.backend!r}"
        )
