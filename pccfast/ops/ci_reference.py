"""Channel independence (SPEC section 2), in plain PyTorch and float64.

``CI_c(A) = ||A||_* - ||A with row c zeroed||_*`` for a feature map ``A: (C, P)``.

Two ways to compute it:

* :func:`ci_bruteforce` is the definition, CHIP style: one nuclear norm per channel, ``C + 1``
  SVDs per image. It is the yardstick of the tests and benchmarks.
* :func:`ci_fast` is the fast algorithm: one symmetric eigendecomposition of the Gram matrix on
  the small side, then, for every channel at once, a trapezoid rule over
  ``CI_c = (2/pi) int exp(x) N_c(t) / h_c(t) dx`` with ``t = exp(2x)``, evaluated as two batched
  matrix products. The compiled backends implement the same steps; this module is their
  readable specification.
"""

from __future__ import annotations

import math

import torch

# Trapezoid step in x = log(t)/2. The integrand is analytic in the strip |Im x| < pi/2 (its
# poles sit at t = -lam), so the error of the (infinite) trapezoid rule falls like
# exp(-pi^2 / step): about 1e-12 at 0.35.
QUADRATURE_STEP = 0.35
# The nodes that need the spectrum (the two matrix products) run this far past it in x. Beyond,
# the integrand follows its asymptotic forms to a relative exp(-2 * margin) and is summed from
# them: exactly (a geometric series) above, with cheap per-channel terms below.
QUADRATURE_MARGIN = 10.0
# How far the per-channel lower extension runs past the matrix-product nodes (exp(-20) ~ 2e-9,
# and it is followed by its own geometric remainder).
LOWER_EXTENSION = 20.0
# Images per chunk, so the (images, C, nodes) intermediates stay near 64 MB.
_CHUNK_ELEMENTS = 8 * 1024 * 1024


def spectral_weights(a: torch.Tensor):
    """The eigen-quantities of G = A A^T, from the Gram matrix on the small side.

    a: (B, C, P) float64 -> lam: (B, m) eigenvalues, deflated ones set to exactly 0;
    weights: (B, C, m), W[c, k] = U[c, k]^2 (0 in deflated columns); null: (B, C), the weight of
    e_c in the null space of G (nonzero only for linearly dependent rows).
    """
    b, c, p = a.shape
    m = min(c, p)
    if c <= p:
        lam, u = torch.linalg.eigh(a @ a.transpose(1, 2))
        weights = u.square()
    else:
        lam, v = torch.linalg.eigh(a.transpose(1, 2) @ a)
    kept = lam > m * torch.finfo(torch.float64).eps * lam[:, -1:].clamp_min(0)
    lam = torch.where(kept, lam, torch.zeros_like(lam))
    if c <= p:
        # Summing the deflated columns directly keeps a small null weight exact (no 1 - sum).
        null = (weights * ~kept[:, None, :]).sum(-1)
        weights = weights * kept[:, None, :]
    else:
        safe_lam = torch.where(kept, lam, torch.ones_like(lam))
        weights = (a @ v).square() / safe_lam[:, None, :] * kept[:, None, :]
        null = (1.0 - weights.sum(-1)).clamp_min(0.0)
    return lam, weights, null


def ci_quadrature(lam: torch.Tensor, weights: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """CI for every channel from the spectral weights (see :func:`spectral_weights`) -> (B, C).

    ``CI_c = (2/pi) * int f_c(x) dx`` with ``f_c(x) = exp(x) * N_c(t) / h_c(t)``, ``t = exp(2x)``,
    by the trapezoid rule on the whole real line, in three parts:

    * nodes within ``QUADRATURE_MARGIN`` of the spectrum: ``N`` and ``h`` for all channels as
      ``(W * lam) @ R1^2`` and ``W @ R1 + r / t`` with ``R1[k, q] = 1 / (lam_k + t_q)``;
    * above: ``N/h -> G_cc / t``, so the nodes sum to a geometric series;
    * below: ``N/h -> N0 t / (N0 t + r)`` with ``N0 = sum_k W/lam`` (1 without linear dependency),
      summed per channel over ``LOWER_EXTENSION`` more, then a geometric remainder.
    """
    dtype, device = lam.dtype, lam.device
    kept = lam > 0
    any_kept = kept.any(-1)
    lam_max = torch.where(any_kept, lam.amax(-1), torch.ones_like(lam[:, 0]))
    lam_min = torch.where(kept, lam, torch.full_like(lam, math.inf)).amin(-1)
    lam_min = torch.where(any_kept, lam_min, lam_max)
    x_lo = 0.5 * torch.log(lam_min) - QUADRATURE_MARGIN
    # A fixed step and per-image node counts (the batch is padded to its longest, padding
    # masked), so an image's score does not depend on the other images of its batch.
    count = torch.ceil((0.5 * torch.log(lam_max) + QUADRATURE_MARGIN - x_lo) / QUADRATURE_STEP) + 1
    nodes = int(count.max())
    q = torch.arange(nodes, dtype=dtype, device=device)
    x = x_lo[:, None] + QUADRATURE_STEP * q
    valid = (q[None, :] < count[:, None]).to(dtype)  # (B, Q)
    x_hi = x_lo + QUADRATURE_STEP * (count - 1)
    t = torch.exp(2.0 * x)  # (B, Q)

    resolvent = 1.0 / (lam[:, :, None] + t[:, None, :])  # R1[k, q] = 1 / (lam_k + t_q)
    h = weights @ resolvent + null[:, :, None] / t[:, None, :]
    numerator = (weights * lam[:, None, :]) @ resolvent.square()
    body = (numerator / h * (torch.exp(x) * valid)[:, None, :]).sum(-1)

    ratio = math.exp(-QUADRATURE_STEP)  # node-to-node factor of exp(-|x|)
    geometric = ratio / (1.0 - ratio)  # sum_{j>=1} ratio^j
    gram_diagonal = (weights * lam[:, None, :]).sum(-1)
    upper = gram_diagonal * torch.exp(-x_hi)[:, None] * geometric

    safe_lam = torch.where(kept, lam, torch.ones_like(lam))
    n0 = (weights / safe_lam[:, None, :]).sum(-1)  # N_c(0) = h_c(0) without the null part
    extra = int(math.ceil(LOWER_EXTENSION / QUADRATURE_STEP))
    j = torch.arange(1, extra + 1, dtype=dtype, device=device)
    x_ext = x_lo[:, None] - QUADRATURE_STEP * j  # (B, J)
    t_ext = torch.exp(2.0 * x_ext)[:, None, :]
    ratio_ext = n0[:, :, None] * t_ext / (n0[:, :, None] * t_ext + null[:, :, None])
    lower = (torch.exp(x_ext)[:, None, :] * ratio_ext).sum(-1)
    lower = lower + (null == 0) * torch.exp(x_ext[:, -1:]) * geometric

    ci = (2.0 / math.pi) * QUADRATURE_STEP * (body + upper + lower)
    return torch.where(any_kept[:, None], ci, torch.zeros_like(ci))


def ci_fast(a: torch.Tensor) -> torch.Tensor:
    """a: (B, C, P) float64 -> CI: (B, C) float64, by eigendecomposition and quadrature."""
    b, c, p = a.shape
    per_image = (2 * c + min(c, p)) * 256 + c * (min(c, p) + p)
    chunk = max(1, _CHUNK_ELEMENTS // per_image)
    out = [ci_quadrature(*spectral_weights(part)) for part in a.split(chunk)]
    return torch.cat(out).clamp_min(0.0)


def ci_bruteforce(a: torch.Tensor) -> torch.Tensor:
    """a: (B, C, P) float64 -> CI: (B, C): one nuclear norm per channel, as CHIP computes it."""
    b, c, p = a.shape
    out = torch.empty(b, c, dtype=torch.float64, device=a.device)
    drop_row = 1.0 - torch.eye(c, dtype=a.dtype, device=a.device)  # row c of copy c zeroed
    for i in range(b):
        full = torch.linalg.svdvals(a[i]).sum()
        deleted = torch.linalg.svdvals(a[i].unsqueeze(0) * drop_row[:, :, None]).sum(-1)
        out[i] = full - deleted
    return out
