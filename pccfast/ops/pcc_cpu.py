"""PCC on the compiled CPU kernels: ``torch.ops.pccfast.pcc_forward`` / ``pcc_backward``.

The operators are defined in csrc/ (TORCH_LIBRARY). This module gives them what the
dispatcher needs from Python: fake (meta) implementations, so ``torch.compile`` can trace them,
and a registered autograd formula. Forward returns the score plus per-row statistics
``(mean, rstd)`` of shape (G, M) and, for penalty "abs" where they are small, the signs of the
correlations at 2 bits a pair (``sign_codes``, uint8 (G, bytes), at most 1/8 of the activation's
fp32 bytes, and for long channel rows each row's sum of |R|; else shape (0,)): the backward of
"abs" needs only sign(R) (and those sums), so with them it skips forming R again. Everything
else the backward recomputes from ``x`` chunk by chunk, so nothing activation- or Gram-sized is
kept in between. Under ``create_graph=True`` the backward runs
through the reference instead, so higher derivatives are exact (and cost the reference's
memory).
"""

from __future__ import annotations

import math

import torch

from .._checks import is_compiling
from . import _C
from .pcc_options import PCCOptions, compute_dtype, pcc_shape
from .pcc_reference import pcc_input_gradient, pcc_reference

def sign_code_bytes(rows: int, features: int, opts: PCCOptions) -> int:
    """Bytes per group of the sign codes pcc_forward keeps for groups of rows x features
    (a header byte, then 2 bits a pair of R's staircase, then for long channel rows a double a
    row; 0: none kept), by the kernels' own rule (csrc/pcc_cpu.cpp, keeps_signs and
    group_code_bytes): from shapes and options alone, so fake tensors get the
    real shape whatever the thread count."""
    return _C.extension().pcc_sign_code_bytes(int(rows), int(features), *opts.op_args())


def _fake_forward(x, orientation, group, penalty, include_diagonal, eps):
    opts = PCCOptions(orientation, group, penalty, include_diagonal, eps)
    shape = pcc_shape(x.shape, opts)
    dtype = compute_dtype(x.dtype)
    stats = (shape.groups, shape.rows)
    code_bytes = sign_code_bytes(shape.rows, shape.features, opts)
    codes = (shape.groups, code_bytes) if code_bytes else (0,)
    return (x.new_empty((), dtype=dtype), x.new_empty(stats, dtype=dtype),
            x.new_empty(stats, dtype=dtype), x.new_empty(codes, dtype=torch.uint8))


def _fake_backward(grad, x, mean, rstd, sign_codes, orientation, group, penalty,
                   include_diagonal, eps):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, orientation, group, penalty, include_diagonal, eps = inputs
    _, mean, rstd, sign_codes = output
    ctx.save_for_backward(x, mean, rstd, sign_codes)
    ctx.options = (orientation, group, penalty, include_diagonal, eps)


def _backward(ctx, grad_score, grad_mean, grad_rstd, grad_codes):
    x, mean, rstd, sign_codes = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the backward must be differentiable itself
        grad_x = pcc_input_gradient(grad_score, x, PCCOptions(*ctx.options))
    else:
        grad_x = torch.ops.pccfast.pcc_backward(grad_score, x, mean, rstd, sign_codes,
                                                *ctx.options)
    return grad_x, None, None, None, None, None


@_C.registration
def register() -> None:
    """Registers the fake and autograd implementations (at import; only with the extension)."""
    torch.library.register_fake("pccfast::pcc_forward")(_fake_forward)
    torch.library.register_fake("pccfast::pcc_backward")(_fake_backward)
    torch.library.register_autograd(
        "pccfast::pcc_forward", _backward, setup_context=_setup_context
    )


def pcc_cpu(x: torch.Tensor, opts: PCCOptions) -> torch.Tensor:
    """x: (N, C, H, W) on the CPU -> S (0-d, fp32 or fp64), differentiable.

    The kernels sum squares in fp64, which covers every fp32/16-bit value, but fp64 input near
    the top of its range (|x| ~ 1e154) or fp32 input with group="batch" (an fp32 Gram matrix)
    can overflow a variance: that shows as rstd = 0 (1/sqrt(inf)) or a non-finite score, and
    such inputs are computed by the reference instead, which scales its rows (outside
    torch.compile, where the check would break the graph)."""
    score, _, rstd, _ = torch.ops.pccfast.pcc_forward(x, *opts.op_args())
    # rstd >= 0, so its least value tells rstd == 0 apart: one reduction and two reads (an
    # elementwise == and any() cost ~10x as much, per layer and step of a regulariser)
    if not is_compiling() and (not math.isfinite(score.item()) or rstd.min().item() == 0):
        return pcc_reference(x, opts)
    return score
