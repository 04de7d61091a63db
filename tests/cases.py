"""The awkward inputs, in one place, that every backend is run over (PyTorch OpInfo style).

Each case is built fresh from its own seed (a new random tensor every test run would make
failures unreproducible; a fixed seed per case keeps them reproducible while the cases cover
many different draws).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

# (N, C, H, W): single rows, single pixels, P < C, C < P, odd sizes.
PCC_SHAPES = [
    (2, 3, 4, 5),
    (1, 2, 1, 1),
    (3, 5, 1, 3),
    (1, 7, 2, 2),  # P < C
    (2, 3, 6, 7),  # C < P
    (2, 9, 3, 1),
    (1, 1, 3, 3),  # C = 1: channel orientation needs include_diagonal
    (4, 16, 3, 3),
]

PCC_OPTION_GRID = [
    dict(orientation=o, group=g, penalty=p, include_diagonal=d)
    for o, g, p, d in itertools.product(
        ("channel", "pixel"), ("sample", "batch", "batch_mean"), ("abs", "square"), (False, True)
    )
    if not (o == "pixel" and g == "batch")
]


@dataclass
class Case:
    name: str
    make: Callable[[torch.dtype], torch.Tensor]

    def __call__(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.make(dtype)


def _randn(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _content_variants(shape, seed):
    """(name, fp64 tensor builder) for one shape: plain, post-ReLU, dead, constant, scales."""
    n, c, h, w = shape

    def plain():
        return _randn(shape, seed, torch.float64)

    def relu():
        return plain().relu()

    def dead_and_constant():
        x = plain()
        x[:, 0] = 0.0
        if c > 1:
            x[:, 1] = 2.5
        return x

    def duplicated():
        x = plain()
        if c > 1:
            x[:, -1] = 3.0 * x[:, 0] - 1.0
        return x

    yield "plain", plain
    yield "relu", relu
    yield "dead+const", dead_and_constant
    yield "duplicated", duplicated
    yield "scale1e-3", lambda: plain() * 1e-3
    yield "scale1e3", lambda: plain() * 1e3


def _layouts(x: torch.Tensor):
    yield "contiguous", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    # A strided view: every other element of a wider tensor.
    wide = torch.zeros(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3], dtype=x.dtype)
    wide[..., ::2] = x
    yield "strided", wide[..., ::2]


def pcc_cases(layouts: bool = True, contents: bool = True) -> Iterator[Case]:
    """Every shape x content variant (x memory layout); built per dtype on demand."""
    for si, shape in enumerate(PCC_SHAPES):
        variants = list(_content_variants(shape, 1000 + si))
        if not contents:
            variants = variants[:1]
        for name, build in variants:
            layout_names = (("contiguous", "channels_last", "strided") if layouts
                            else ("contiguous",))
            for layout in layout_names:

                def make(dtype, build=build, layout=layout):
                    x = build().to(dtype)
                    return dict(_layouts(x))[layout]

                yield Case(f"{shape}-{name}-{layout}", make)


def ci_maps(seed: int, n: int, c: int, p: int, kind: str = "relu") -> torch.Tensor:
    """(n, c, p) float64 feature maps with the structures CI must get right.

    kind: "relu" (post-ReLU noise), "dead" (a zero row), "tiny" (a row scaled by 1e-6),
    "duplicated" (two equal rows), "combination" (a row that is a combination of two others),
    "lowrank" (rank min(c, p) // 3), "mixed" (dead + tiny + duplicated at once).
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, c, p, generator=g, dtype=torch.float64)
    if kind == "lowrank":
        r = max(1, min(c, p) // 3)
        a = torch.randn(n, c, r, generator=g, dtype=torch.float64) @ torch.randn(
            n, r, p, generator=g, dtype=torch.float64
        )
        return a
    a = a.relu()
    if kind in ("dead", "mixed"):
        a[:, 0] = 0.0
    if kind in ("tiny", "mixed") and c > 1:
        a[:, 1] *= 1e-6
    if kind in ("duplicated", "mixed") and c > 3:
        a[:, 3] = a[:, 2]
    if kind == "combination" and c > 2:
        a[:, 2] = 2.0 * a[:, 0] - 0.5 * a[:, 1]
    return a


# SPEC section 2: |CI - CI_bruteforce_fp64| <= 1e-7 * ||A||_* for every channel.
CI_BAR = 1e-7


def ci_tolerance(maps: torch.Tensor, results: int = 1) -> torch.Tensor:
    """The SPEC section 2 bar for the CI of ``maps`` (B, C, ...): (B, 1) float64 absolute
    bounds that broadcast against (B, C) scores (``.mean()`` of it bounds a mean score).

    The only accuracy a CI result carries from one host, BLAS/LAPACK path or thread count to
    another: forming the Gram matrix limits near-null directions to about sqrt(eps) * sigma_max
    (a tiny channel's CI moved by 1.1e-10 * ||A||_* under a pixel permutation on one Xeon).
    Pass ``results=2`` to compare two computed results (each within the bar of the exact CI:
    twice the bar apart), such as the scores before and after a permutation or of two backends.
    """
    rows = maps.detach().reshape(maps.shape[0], maps.shape[1], -1).double().cpu()
    return results * CI_BAR * torch.linalg.svdvals(rows).sum(-1)[:, None]


def assert_within(got: torch.Tensor, want: torch.Tensor, bound) -> None:
    """|got - want| <= bound elementwise (bound broadcasts); the message gives the worst
    |got - want| / bound, so a failure says how far past its bound it is."""
    err = (got.detach().cpu().double() - want.detach().cpu().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).cpu().expand_as(err)
    bad = ~(err <= bound)  # NaN fails too
    if bool(bad.any()):
        ratio = (err / bound.clamp_min(torch.finfo(torch.float64).tiny)).flatten()
        worst = int(ratio.nan_to_num(float("inf")).argmax())
        raise AssertionError(
            f"|got - want| > bound at {int(bad.sum())} of {err.numel()} elements; worst "
            f"{float(err.flatten()[worst]):.4g} > {float(bound.flatten()[worst]):.4g} "
            f"({float(ratio[worst]):.3g}x, flat index {worst})"
        )


CI_KINDS = ("relu", "dead", "tiny", "duplicated", "combination", "lowrank", "mixed")
# (C, P): C <= P and P < C, squares, single rows and single pixels.
CI_SHAPES = [(1, 9), (9, 1), (3, 3), (5, 12), (12, 5), (16, 64), (64, 16), (33, 31), (7, 40)]


def cifar10_copy() -> str:
    """Path of the real CIFAR-10 JPEG copy (PCCFAST_CIFAR10_NPZ, else ../shared/data beside the
    checkout). Tests that use it skip with a message when it is absent."""
    default = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                           "cifar10_jpeg.npz")
    return os.path.abspath(os.environ.get("PCCFAST_CIFAR10_NPZ", default))


def gradient_term_scale(x: torch.Tensor, options: dict) -> float:
    """Size of the terms that dS/dx is the sum of (rstd_i * a * sum_j |D_ij| |vhat_j|).

    The gradient can be far smaller than its terms (a nearly constant score, such as the
    diagonal-only score of a map with one varying channel), so rounding is measured against
    the terms, not the result.
    """
    from pccfast.ops.pcc_options import PCCOptions, pair_count, pcc_shape
    from pccfast.ops.pcc_reference import pcc_rows

    opts = PCCOptions(**options)
    rows = pcc_rows(x.detach().cpu().double(), opts)
    centered = rows - rows.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centered.square().mean(-1) + opts.eps)
    vhat = centered * rstd[..., None]
    shape = pcc_shape(x.shape, opts)
    a = 2.0 / (shape.groups * pair_count(shape.rows, opts.include_diagonal) * shape.features)
    dmax = 2.0 if opts.penalty == "square" else 1.0
    return float(a * shape.rows * dmax * vhat.abs().max() * rstd.max())


def site_activations(model, module_names, images) -> dict:
    """module name -> its output on ``images`` (eval mode, no grad), from hooks of the tests' own,
    outside any pccfast collector."""
    acts, handles = {}, []
    modules = dict(model.named_modules())
    for name in module_names:
        handles.append(modules[name].register_forward_hook(
            lambda m, a, out, name=name: acts.__setitem__(name, out.detach().clone())))
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for h in handles:
            h.remove()
    return acts


def streamed_scores(model, criterion, images, input_size) -> tuple[dict, dict]:
    """(scores, groups) of ``criterion`` streamed over ``images`` in two uneven batches, after
    checking it scores the same sites as CI (an activation criterion must)."""
    import pccfast

    col = pccfast.ScoreCollector(model, criterion)
    assert col.update(images[:2]) == 2 and col.update(images[2:]) == len(images) - 2
    scores = col.scores()
    ci = pccfast.CICollector(model, input_size=input_size)
    assert col.groups == ci.groups  # the same sites as CI
    ci.remove()
    col.remove()
    return scores, col.groups


def randomize_bn(model, seed=0):
    """Non-trivial BN statistics and affine values, so a wrongly sliced BN shows in the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model
