"""PCC, the definition (SPEC section 1), in plain PyTorch.

This is the backend every other one is tested against: it materialises the normalised rows
``vhat`` and the correlation matrices ``R`` and lets autograd differentiate through them, so it
is as readable as the maths and as memory-hungry as it sounds (``G*M*M`` floats for ``R``).
"""

from __future__ import annotations

import torch

from .pcc_options import PCCOptions, compute_dtype, pair_count


def pcc_rows(x: torch.Tensor, opts: PCCOptions) -> torch.Tensor:
    """x: (N, C, H, W) -> V: (G, M, K) in the compute dtype (a view where possible)."""
    v = x.to(compute_dtype(x.dtype))
    if opts.group == "batch_mean":
        v = v.mean(dim=0, keepdim=True)
    n, c, h, w = v.shape
    if opts.orientation == "pixel":
        return v.reshape(n, c, h * w).transpose(1, 2)
    if opts.group == "batch":
        return v.transpose(0, 1).reshape(1, c, n * h * w)
    return v.reshape(n, c, h * w)


def normalize_rows(v: torch.Tensor, eps: float) -> torch.Tensor:
    """(G, M, K) -> rows with mean 0 and biased variance var/(var+eps); constant rows -> 0."""
    centered = v - v.mean(dim=-1, keepdim=True)
    var = centered.square().mean(dim=-1, keepdim=True)
    return centered * torch.rsqrt(var + eps)


def pcc_matrix_reference(x: torch.Tensor, opts: PCCOptions) -> torch.Tensor:
    """x: (N, C, H, W) -> R: (G, M, M), R[g, i, j] = <vhat_i, vhat_j> / K.

    The arithmetic is fp32 (fp64) by definition, also inside an autocast region."""
    with torch.autocast(x.device.type, enabled=False):
        vhat = normalize_rows(pcc_rows(x, opts), opts.eps)
        return vhat @ vhat.transpose(1, 2) / vhat.shape[-1]


def pcc_reference(x: torch.Tensor, opts: PCCOptions) -> torch.Tensor:
    """x: (N, C, H, W) -> S, a 0-d tensor: mean of phi(R[g, i, j]) over groups and pairs."""
    r = pcc_matrix_reference(x, opts)
    g, m, _ = r.shape
    phi = r.abs() if opts.penalty == "abs" else r.square()
    if not opts.include_diagonal:
        off_diagonal = ~torch.eye(m, dtype=torch.bool, device=r.device)
        phi = phi * off_diagonal
    return phi.sum() / (g * pair_count(m, opts.include_diagonal))


def pcc_input_gradient(grad_score: torch.Tensor, x: torch.Tensor, opts: PCCOptions) -> torch.Tensor:
    """``grad_score * dS/dx`` as a differentiable function of ``x`` and ``grad_score``, through
    this reference: the fused backends' backward under ``create_graph=True`` (double backward,
    gradient penalties), where their own kernels are not differentiable. Materialises ``R``."""
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        score = pcc_reference(x, opts)
        (grad_x,) = torch.autograd.grad(score, x, grad_score, create_graph=True)
    return grad_x
