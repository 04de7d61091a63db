"""Channel independence as users call it: ``channel_independence`` (SPEC section 2)."""

from __future__ import annotations

import torch

from ._checks import check_choice, check_finite_tensor, check_float_tensor
from .ops import backends, ci_compiled
from .ops.ci_reference import ci_bruteforce, ci_fast

METHODS = ("fast", "bruteforce")


def _ci_rows(name: str, rows: torch.Tensor) -> torch.Tensor:
    """rows: (B, C, P) -> (B, C) float64 on the named backend, cleaned of rounding noise."""
    if name == "torch":
        ci = ci_fast(rows.to(torch.float64))
    else:
        ci = ci_compiled.channel_independence(rows)
    return clean_scores(ci, rows)


def snap_threshold(rows: torch.Tensor) -> torch.Tensor:
    """rows: (B, C, P) -> (B,) float64: ``m * eps * ||A||_F`` per image (``m = min(C, P)``,
    ``eps = 2^-52``), the level below which a CI is rounding noise. It lies far below the
    accuracy bar ``1e-7 * ||A||_*`` (``||A||_F <= ||A||_*``), so no score that the bar resolves
    is touched."""
    m = min(rows.shape[1], rows.shape[2])
    norm = torch.linalg.vector_norm(rows, dim=(1, 2), dtype=torch.float64)
    return m * torch.finfo(torch.float64).eps * norm


def clean_scores(ci: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """CI (B, C) clamped to its bounds ``0 <= CI_c <= ||a_c||_2`` and set to exactly 0 below
    :func:`snap_threshold`. An exactly zero row (a dead channel) then scores exactly 0, where
    the fast paths leave rounding noise (1e-21 and up, more next to near-null directions of
    the map), so dead channels tie and pruning keeps the lower index among them, as documented,
    instead of a noise winner."""
    row_norms = torch.linalg.vector_norm(rows, dim=2, dtype=torch.float64)
    ci = torch.minimum(ci.clamp_min(0.0), row_norms)
    return torch.where(ci < snap_threshold(rows)[:, None], torch.zeros_like(ci), ci)


# fp64 maps whose largest entry lies beyond 2^(+-256) would give Gram entries that overflow or
# fall into subnormals (where the eigensolvers lose their accuracy or fail). CI is positively
# homogeneous, CI(sA) = s CI(A), so such images are scaled by exact powers of two and their
# scores scaled back. Narrower dtypes cannot reach that range.
SAFE_EXPONENT = 256


def _power_of_two_shifts(rows: torch.Tensor) -> torch.Tensor | None:
    """rows: (B, C, P) float64 -> per-image exponents s with max |2^s rows| in [0.5, 1) for the
    images outside the safe range (0 elsewhere), or None when no image is."""
    if rows.dtype != torch.float64:
        return None
    largest = rows.abs().amax(dim=(1, 2))
    exponent = torch.frexp(largest).exponent
    extreme = (largest > 0) & (exponent.abs() > SAFE_EXPONENT)
    if not bool(extreme.any()):
        return None
    return torch.where(extreme, -exponent, torch.zeros_like(exponent))


def _scale_by_powers_of_two(t: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """t * 2^shifts per image (leading dim), in two exact steps: 2^1074 alone would overflow."""
    half = shifts // 2
    view = (-1,) + (1,) * (t.dim() - 1)
    for part in (half, shifts - half):
        t = t * torch.pow(2.0, part.to(torch.float64)).view(view)
    return t


def channel_independence(
    fmap: torch.Tensor, backend: str = "auto", method: str = "fast"
) -> torch.Tensor:
    """CI of every channel of a feature map: how much the nuclear norm drops without it.

    fmap: (C, H, W) -> (C,), or (N, C, H, W) -> (N, C), always float64 (any float input).
    ``method="bruteforce"`` computes one nuclear norm per channel (C+1 SVDs per image, the CHIP
    way) on the reference backend; it exists to check the fast path.

    The result is a score, not a training signal: it is detached (no gradient) on every
    backend. On every backend and method the scores are clamped to ``0 <= CI_c <= ||a_c||_2``
    and those below ``m * eps * ||A||_F`` of their image (``m = min(C, H*W)``, ``eps = 2^-52``;
    :func:`snap_threshold`) are rounding noise, returned as exactly 0: a dead channel scores
    exactly 0, and dead channels tie (pruning keeps the lower index among them).
    """
    check_float_tensor("fmap", fmap, (3, 4))
    fmap = fmap.detach()
    check_choice("method", method, METHODS)
    name = backends.resolve("ci", backend, fmap.device)
    check_finite_tensor("fmap", fmap)
    single = fmap.dim() == 3
    maps = fmap.unsqueeze(0) if single else fmap
    n, c, h, w = maps.shape
    rows = maps.reshape(n, c, h * w)
    if method == "bruteforce":
        if name != "torch" and backend != "auto":
            raise ValueError(
                f'method="bruteforce" runs on the "torch" backend only, got backend="{backend}"'
            )
        rows = rows.to(torch.float64)
        out = clean_scores(ci_bruteforce(rows), rows)
    else:
        shifts = _power_of_two_shifts(rows)
        if shifts is None:
            out = _ci_rows(name, rows)
        else:
            out = _ci_rows(name, _scale_by_powers_of_two(rows, shifts))
            out = _scale_by_powers_of_two(out, -shifts)
    return out[0] if single else out
