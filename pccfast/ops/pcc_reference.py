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
        v = (v / v.shape[0]).sum(dim=0, keepdim=True)  # the sum of x / N cannot overflow
    n, c, h, w = v.shape
    if opts.orientation == "pixel":
        return v.reshape(n, c, h * w).transpose(1, 2)
    if opts.group == "batch":
        return v.transpose(0, 1).reshape(1, c, n * h * w)
    return v.reshape(n, c, h * w)


# Rows whose largest |entry| reaches 2^SCALE_EXPONENT are scaled down by a power of two first
# (exactly, with eps scaled alike), so that the sum of squares cannot overflow anywhere in the
# dtype's range; rows below it are computed exactly as written.
SCALE_EXPONENT = 32


def row_scales(v: torch.Tensor) -> torch.Tensor:
    """(G, M, K) -> (G, M, 1) exponents e >= 0 with max |v_row| / 2^e < 2^SCALE_EXPONENT."""
    with torch.no_grad():
        exponent = torch.frexp(v.abs().amax(dim=-1, keepdim=True)).exponent
        return (exponent - SCALE_EXPONENT).clamp_min(0)


def normalize_rows(v: torch.Tensor, eps: float) -> torch.Tensor:
    """(G, M, K) -> rows with mean 0 and biased variance var/(var+eps); constant rows -> 0.

    Computed as ``(v - mu) / sqrt(var + eps)`` on the row divided by 2^e (:func:`row_scales`)
    with eps divided by 4^e, which is the same number. Dividing by the square root (not
    multiplying by rsqrt, whose derivative is rsqrt^3) keeps the gradient of a constant row 0,
    not NaN, even for eps near the smallest normal float."""
    e = row_scales(v).to(v.dtype)
    scaled = v * torch.exp2(-e)  # exact (torch.ldexp's gradient underflows for float64)
    centered = scaled - scaled.mean(dim=-1, keepdim=True)
    var = centered.square().mean(dim=-1, keepdim=True)
    scaled_eps = eps * torch.exp2(-2 * e)  # 0 where it underflows
    # The floor matters only there, for a constant row (centered = 0) scaled down a long way.
    return centered / torch.sqrt((var + scaled_eps).clamp_min(torch.finfo(var.dtype).tiny))


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
