"""The options of the PCC score (SPEC section 1), checked once and shared by every backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_choice, check_float_tensor, check_positive_float

ORIENTATIONS = ("channel", "pixel")
GROUPS = ("sample", "batch", "batch_mean")
PENALTIES = ("abs", "square")
DEFAULT_EPS = 1e-5


@dataclass(frozen=True)
class PCCOptions:
    """orientation: rows are channels ("channel") or pixel positions ("pixel").
    group: one group per sample, one for the whole batch, or one for the batch-mean map.
    penalty: phi(t) = |t| ("abs") or t^2 ("square").
    include_diagonal: also sum the M diagonal terms R[i, i].
    eps: added to each row's biased variance before the square root."""

    orientation: str = "channel"
    group: str = "sample"
    penalty: str = "abs"
    include_diagonal: bool = False
    eps: float = DEFAULT_EPS

    def __post_init__(self):
        check_choice("orientation", self.orientation, ORIENTATIONS)
        check_choice("group", self.group, GROUPS)
        check_choice("penalty", self.penalty, PENALTIES)
        if not isinstance(self.include_diagonal, bool):
            raise TypeError(
                f"include_diagonal must be a bool, got {type(self.include_diagonal).__name__}"
            )
        object.__setattr__(self, "eps", check_positive_float("eps", self.eps))
        if self.orientation == "pixel" and self.group == "batch":
            raise ValueError(
                'group="batch" needs orientation="channel" (pixel rows of different samples '
                'are different rows); use group="sample" or "batch_mean" with orientation="pixel"'
            )

    def op_args(self) -> tuple:
        """The options as the compiled ops' schema takes them (a custom op takes no dataclass),
        in field order, so ``PCCOptions(*opts.op_args())`` is ``opts`` again."""
        return (self.orientation, self.group, self.penalty, self.include_diagonal, self.eps)


@dataclass(frozen=True)
class PCCShape:
    """Sizes of the problem: G groups of M rows, each row a vector of K features."""

    groups: int
    rows: int
    features: int


def pair_count(rows: int, include_diagonal: bool) -> int:
    """Q, the number of ordered (i, j) pairs each group sums over."""
    return rows * rows if include_diagonal else rows * (rows - 1)


def pcc_shape(x_shape, opts: PCCOptions) -> PCCShape:
    n, c, h, w = x_shape
    p = h * w
    groups = 1 if opts.group in ("batch", "batch_mean") else n
    if opts.orientation == "channel":
        features = n * p if opts.group == "batch" else p
        return PCCShape(groups, c, features)
    return PCCShape(groups, p, c)


def check_pcc_input(x, opts: PCCOptions, name: str = "x") -> PCCShape:
    """Checks x: (N, C, H, W) and the option combination; returns the problem sizes."""
    check_float_tensor(name, x, (4,))
    check_eps(opts.eps, compute_dtype(x.dtype))
    shape = pcc_shape(x.shape, opts)
    if shape.rows == 1 and not opts.include_diagonal:
        what = "channel (C=1)" if opts.orientation == "channel" else "pixel (H*W=1)"
        raise ValueError(
            f"{name} has a single {what} row, so there are no off-diagonal pairs; "
            "pass include_diagonal=True or use the other orientation"
        )
    return shape


def check_eps(eps: float, dtype: torch.dtype) -> None:
    """eps must be a normal number of the compute dtype: a subnormal or underflowing eps would
    make a constant row 0/0 (NaN) or leave its gradient NaN, a huge one would round to inf."""
    info = torch.finfo(dtype)
    if not info.tiny <= eps <= info.max:
        raise ValueError(
            f"eps must be a normal positive {str(dtype).replace('torch.', '')} number (the "
            f"arithmetic's dtype here), between {info.tiny:.4g} and {info.max:.4g}; got {eps:g}"
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic is fp32, fp64 for fp64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32
