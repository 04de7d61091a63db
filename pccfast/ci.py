"""Channel independence as users call it: ``channel_independence`` (SPEC section 2)."""

from __future__ import annotations

import torch

from ._checks import check_choice, check_finite_tensor, check_float_tensor
from .ops import backends
from .ops.ci_reference import ci_bruteforce, ci_fast

METHODS = ("fast", "bruteforce")


def _ci_rows(name: str, rows: torch.Tensor) -> torch.Tensor:
    """rows: (B, C, P) -> (B, C) float64 on the named backend."""
    if name == "torch":
        return ci_fast(rows.to(torch.float64))
    from .ops import ci_compiled

    return ci_compiled.channel_independence(rows)


def channel_independence(
    fmap: torch.Tensor, backend: str = "auto", method: str = "fast"
) -> torch.Tensor:
    """CI of every channel of a feature map: how much the nuclear norm drops without it.

    fmap: (C, H, W) -> (C,), or (N, C, H, W) -> (N, C), always float64 (any float input).
    ``method="bruteforce"`` computes one nuclear norm per channel (C+1 SVDs per image, the CHIP
    way) on the reference backend; it exists to check the fast path.
    """
    check_float_tensor("fmap", fmap, (3, 4))
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
        out = ci_bruteforce(rows.to(torch.float64))
    else:
        out = _ci_rows(name, rows)
    return out[0] if single else out
