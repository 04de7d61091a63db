"""The "triton" PCC backend against the reference, on the awkward inputs of tests/cases.py.

Not collected by a plain ``pytest`` run (the name has no test_ prefix): tests/test_pcc_triton.py
runs it in a fresh process, because TRITON_INTERPRET=1 must be set before triton is imported:

    TRITON_INTERPRET=1 python -m pytest tests/triton_cases.py             # CPU, interpreted
    PCCFAST_TRITON_DEVICE=cuda python -m pytest tests/triton_cases.py     # compiled, on a GPU

Under the interpreter fp32, fp16 and bf16 inputs are checked (bf16 tl.dot is replaced by an
fp32 dot there, so the bf16 tensor-core path is only exercised on a GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("PCCFAST_TRITON_DEVICE", "cpu")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU runs need TRITON_INTERPRET=1 set before triton is imported",
                allow_module_level=True)
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("PCCFAST_TRITON_DEVICE=cuda but no CUDA device", allow_module_level=True)

import pccfast  # noqa: E402
from pccfast.ops import pcc_triton as pt  # noqa: E402
from pccfast.ops.pcc_options import PCCOptions, pcc_shape  # noqa: E402
from pccfast.ops.pcc_reference import pcc_rows  # noqa: E402

from cases import PCC_OPTION_GRID, PCC_SHAPES, gradient_term_scale, pcc_cases  # noqa: E402

OPTION_IDS = ["-".join(map(str, o.values())) for o in PCC_OPTION_GRID]
# Forward relative tolerance and gradient tolerance (relative to the size of the gradient's
# terms) by input dtype; 16-bit inputs feed some dots with vhat rounded to their precision.
FORWARD_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# dx itself is rounded to the input's dtype (as the reference's is).
GRAD_RTOL = {torch.float32: 0.0, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Small blocks that reach every regime and tile edge at interpreter-friendly sizes.
SMALL = dict(tile=16, reduce=16, rows_max_k=32, small_m_max=32, scratch_floats=600,
             target_programs=3)


def on_device(x: torch.Tensor) -> torch.Tensor:
    """x on DEVICE with the same strides (dense or not)."""
    if x.device.type == DEVICE:
        return x
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=DEVICE)
    return y.copy_(x)


def compare(x: torch.Tensor, options: dict, grad_scale: float = 1.0):
    """Forward and input gradient of the triton backend against the reference on the same x;
    an invalid option combination must be refused by both."""
    x = on_device(x)
    xr = x.detach().clone().requires_grad_(True)
    xt = x.detach().clone().requires_grad_(True)
    try:
        want = pccfast.pcc(xr, backend="torch", **options)
    except ValueError:
        with pytest.raises(ValueError):
            pccfast.pcc(xt, backend="triton", **options)
        return
    got = pccfast.pcc(xt, backend="triton", **options)
    assert got.dtype == torch.float32 and got.shape == () and got.device == x.device
    rtol = FORWARD_RTOL[x.dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * 0.1,
                               msg=lambda m: f"{options}: {m}")
    upstream = torch.tensor(grad_scale, device=x.device)
    (gw,) = torch.autograd.grad(want, xr, upstream)
    (gt,) = torch.autograd.grad(got, xt, upstream)
    assert gt.dtype == x.dtype and gt.shape == x.shape
    atol = GRAD_TOL[x.dtype] * abs(grad_scale) * gradient_term_scale(x, options)
    atol += 2 * torch.finfo(x.dtype).tiny * torch.finfo(x.dtype).eps  # fp16 subnormal steps
    torch.testing.assert_close(gt.float(), gw.float(), rtol=GRAD_RTOL[x.dtype], atol=atol,
                               msg=lambda m: f"gradient, {options}: {m}")


# ---- every option combination, every shape ----


@pytest.mark.parametrize("shape", PCC_SHAPES, ids=str)
def test_option_grid_fp32(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    for options in PCC_OPTION_GRID:
        compare(x, options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", PCC_SHAPES, ids=str)
def test_option_grid_half(shape, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7 + sum(shape))).to(dtype)
    for options in PCC_OPTION_GRID[::2] if dtype == torch.bfloat16 else PCC_OPTION_GRID:
        compare(x, options)


@pytest.mark.parametrize("content", ["scale1e-3", "scale1e3", "dead+const", "duplicated"])
def test_scales_dead_and_duplicated_channels(content):
    """A core sample of the content variants (the full sweep is test_cases_*), fp32 and fp16."""
    names = (f"(2, 3, 6, 7)-{content}-contiguous", f"(4, 16, 3, 3)-{content}-strided")
    chosen = [case for case in pcc_cases() if case.name in names]
    assert len(chosen) == 2
    for case in chosen:
        for dtype, grid in ((torch.float32, PCC_OPTION_GRID[::2]),
                            (torch.float16, PCC_OPTION_GRID[1::4])):
            for options in grid:
                compare(case(dtype), options)


# ---- contents (post-ReLU, dead, constant, duplicated, 1e-3 / 1e3 scales) x layouts ----

# Every shape x content variant, contiguous; channels_last and strided views of the post-ReLU
# and the dead+constant contents.
_CASES = [c for c in pcc_cases()
          if c.name.endswith("-contiguous") or "-relu-" in c.name or "-dead+const-" in c.name]


@pytest.mark.parametrize("index", range(len(_CASES)), ids=[c.name for c in _CASES])
def test_cases_fp32(index):
    """Each case against a rotating third of the option grid (all of it over neighbouring
    cases)."""
    x = _CASES[index](torch.float32)
    for options in PCC_OPTION_GRID[index % 3::3]:
        compare(x, options)


_HALF_CASES = [c for c in _CASES if c.name.endswith("-contiguous")][::3]


@pytest.mark.parametrize("index", range(len(_HALF_CASES)), ids=[c.name for c in _HALF_CASES])
def test_cases_fp16(index):
    x = _HALF_CASES[index](torch.float16)
    for options in PCC_OPTION_GRID[index % 4::4]:
        compare(x, options)


# ---- tile edges ----


@pytest.mark.parametrize(
    "shape,orientation,regime",
    [
        ((2, 63, 7, 9), "channel", "rows"),  # M one below the 64-tile, K one below the chunk
        ((1, 65, 5, 13), "channel", "rows"),  # M, K one above
        ((2, 64, 8, 8), "channel", "rows"),  # exactly one tile
        ((1, 3, 7, 9), "pixel", "rows"),  # M = 63 pixels
        ((1, 5, 5, 13), "pixel", "rows"),  # M = 65 pixels
        ((1, 511, 2, 2), "pixel", "rows"),  # K one below rows_max_k = 512: one chunk
        ((1, 513, 2, 3), "pixel", "small_m"),  # K one above: two passes over K, all M at once
    ],
    ids=str,
)
def test_tile_edges_default_blocks(shape, orientation, regime):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])).relu()
    for penalty in ("abs", "square"):
        options = dict(orientation=orientation, penalty=penalty, include_diagonal=penalty == "abs")
        s = pcc_shape(shape, PCCOptions(**options))
        if penalty == "abs":
            assert pt.backward_regime(s.rows, s.features, PCCOptions(**options)) == regime
        compare(x, options)


# (shape, options, expected backward regime) under the SMALL tuning: every kernel, both sides
# of every block edge (16, 32), several feature chunks, chunked scratch, split batches.
SMALL_CASES = [
    ((2, 15, 3, 5), dict(), "rows"),  # M < 16, K < 16
    ((2, 17, 4, 4), dict(), "rows"),  # M just above a tile, K = 16: one chunk of 32
    ((1, 33, 5, 7), dict(), "rows"),  # M = 33 > small_m_max, K = 35 > rows_max_k: two chunks
    ((2, 31, 3, 11), dict(), "small_m"),  # K = 33, all 31 rows at once
    ((2, 16, 5, 7), dict(penalty="square"), "small_m"),
    ((1, 9, 8, 8), dict(orientation="pixel"), "rows"),  # M = 64 pixel rows, K = 9
    ((1, 33, 2, 2), dict(orientation="pixel"), "small_m"),  # K = 33 channels, M = 4 pixels
    ((2, 17, 7, 5), dict(orientation="pixel", penalty="square"), "square_features"),
    ((2, 33, 7, 10), dict(orientation="pixel", penalty="square"), "square_features"),  # 2 chunks
    ((2, 40, 2, 3), dict(penalty="square"), "square_features"),  # channel rows, K = 6 < M/2
    ((5, 17, 3, 4), dict(group="batch"), "batch"),  # 3 sample splits, last one short
    ((3, 33, 2, 3), dict(group="batch", penalty="square"), "batch"),
    ((4, 18, 5, 7), dict(group="batch_mean"), "small_m"),
    ((4, 5, 7, 7), dict(group="batch_mean", orientation="pixel", penalty="square"),
     "square_features"),
]


@pytest.mark.parametrize("shape,options,regime", SMALL_CASES, ids=str)
def test_regimes_and_edges_small_blocks(shape, options, regime):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3 * sum(shape))) * 2 + 0.5
    with pt.tuning(**SMALL):
        for diagonal in (False, True):
            opts = dict(options, include_diagonal=diagonal)
            s = pcc_shape(shape, PCCOptions(**opts))
            assert pt.backward_regime(s.rows, s.features, PCCOptions(**opts)) == regime
            compare(x, opts)
            compare(x.half(), opts)


def test_small_blocks_channels_last_and_strided():
    x = torch.randn(2, 20, 5, 7, generator=torch.Generator().manual_seed(11)).relu()
    wide = torch.zeros(2, 20, 5, 14)
    wide[..., ::2] = x
    with pt.tuning(**SMALL):
        for layout in (x.contiguous(memory_format=torch.channels_last), wide[..., ::2]):
            for options in (dict(), dict(orientation="pixel"), dict(group="batch"),
                            dict(orientation="pixel", penalty="square")):
                compare(layout, options)


def test_samples_beyond_the_grid_limit_run_in_chunks(monkeypatch):
    """group="sample" with more samples than a launch takes: chunks, weighted by their sizes."""
    monkeypatch.setattr(pt, "MAX_GROUPS_PER_LAUNCH", 3)
    x = torch.randn(8, 6, 4, 5, generator=torch.Generator().manual_seed(21)).relu()
    for options in (dict(), dict(orientation="pixel", penalty="square"),
                    dict(group="batch_mean")):
        compare(x, options, grad_scale=0.7)
    with pytest.raises(ValueError, match='at most 3 samples for group="batch"'):
        pccfast.pcc(on_device(x), backend="triton", group="batch")


def test_sample_wider_than_int32_offsets_is_copied(monkeypatch):
    """A batch-inner view ((C, N, H, W) seen as (N, C, H, W)) spans the whole tensor within one
    sample; past the int32 bound the kernels read a contiguous copy instead."""
    y = torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(22))
    x = y.transpose(0, 1)
    assert pt._pixel_stride(x) is not None and pt._sample_span(x) == 5 * 60 + 3 * 3 + 2 * 1
    monkeypatch.setattr(pt, "MAX_INT32_OFFSET", 100)
    assert pt._source(x, PCCOptions()).is_contiguous()
    for options in (dict(), dict(orientation="pixel"), dict(group="batch")):
        compare(x, options)


# ---- values ----


def test_large_offset_rows():
    """Rows with |mean| >> std: the chunked (Chan) statistics keep fp32 accuracy where
    E[x^2] - E[x]^2 would lose it; checked against fp64."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 9, 9, generator=g) + 1e3 * torch.arange(1, 7).view(1, 6, 1, 1)
    for options in (dict(), dict(orientation="pixel"), dict(group="batch")):
        got = pccfast.pcc(on_device(x), backend="triton", **options)
        want = pccfast.pcc(x.double(), backend="torch", **options)
        assert got.item() == pytest.approx(want.item(), rel=2e-3)


def test_all_zero_and_constant_inputs():
    for value in (0.0, 2.5):
        x = torch.full((2, 3, 4, 5), value, device=DEVICE, requires_grad=True)
        for options in PCC_OPTION_GRID:
            s = pccfast.pcc(x, backend="triton", **options)
            (g,) = torch.autograd.grad(s, x)
            assert s.item() == 0.0 and torch.count_nonzero(g) == 0


def test_upstream_gradient_scales():
    x = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(2))
    for options in (dict(), dict(orientation="pixel", penalty="square"), dict(group="batch")):
        compare(x, options, grad_scale=-2.5)


def test_statistics_outputs():
    """The forward op's second and third outputs are the rows' mean and rstd (0 for constant
    rows), shape (G, M), fp32."""
    x = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(4))
    x[:, 1] = 1.5
    for options in PCC_OPTION_GRID[::2]:
        opts = PCCOptions(**options)
        score, mean, rstd = torch.ops.pccfast.pcc_triton_forward(
            on_device(x), opts.orientation, opts.group, opts.penalty, opts.include_diagonal,
            opts.eps,
        )
        rows = pcc_rows(x.double(), opts)
        var = rows.var(-1, unbiased=False)
        want_rstd = torch.where(var > 0, torch.rsqrt(var + opts.eps), 0.0)
        assert mean.dtype == rstd.dtype == torch.float32
        torch.testing.assert_close(mean.cpu().double(), rows.mean(-1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rstd.cpu().double(), want_rstd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("magnitude", [1e19, 1e37])
def test_fp32_values_near_the_top_of_the_range(magnitude):
    """The statistics kernel scales rows whose values reach 2^32 by a power of two (eps alike),
    so variances of fp32 values up to ~1e38 do not overflow into a silent 0; every group mode,
    split statistics (group="batch" over several programs) included."""
    x = torch.randn(5, 6, 3, 5, generator=torch.Generator().manual_seed(12)).clamp(-3, 3)
    x = x * (magnitude / 3)
    x[:, 2] = 2.0 ** 60  # a constant row far above 1: still exactly vhat = 0
    with pt.tuning(**SMALL):
        for options in PCC_OPTION_GRID[::3]:
            got = pccfast.pcc(on_device(x), backend="triton", **options)
            want = pccfast.pcc(x.double(), backend="torch", **options)
            assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6), options
    if magnitude == 1e19:  # gradients (~1e-21) are normal floats
        for options in (dict(), dict(orientation="pixel", penalty="square"), dict(group="batch")):
            compare(x, options)


def test_bf16_values_that_overflow_the_fp32_products_raise():
    """bf16 inputs are multiplied raw (16-bit products summed in fp32): values whose products
    overflow that raise a ValueError that says so, never a silent or NaN score."""
    x = (torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(13)) * 1e37)
    with pytest.raises(ValueError, match="overflow"):
        pccfast.pcc(on_device(x.to(torch.bfloat16)), backend="triton")
    assert pccfast.pcc(x.to(torch.bfloat16), backend="torch").item() > 0


@pytest.mark.parametrize("options", [dict(), dict(orientation="pixel", penalty="square"),
                                     dict(group="batch", include_diagonal=True)], ids=str)
def test_double_backward_is_the_references(options):
    """create_graph=True: the backward runs through the reference, so second derivatives are
    exact (the kernels themselves are not differentiable)."""
    x = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(14))
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(15))

    def second(t, backend):
        t = t.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(pccfast.pcc(t, backend=backend, **options), t, create_graph=True)
        (h,) = torch.autograd.grad((g * v.to(g)).sum(), t)
        return g.detach(), h

    g, h = second(on_device(x), "triton")
    g_want, h_want = second(x.double(), "torch")
    assert h_want.abs().max() > 0
    scale = float(h_want.abs().max())
    torch.testing.assert_close(h.cpu().double(), h_want, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(g.cpu().double(), g_want, rtol=1e-4,
                               atol=1e-5 * float(g_want.abs().max()))


# ---- autograd plumbing ----


@pytest.mark.parametrize("options", PCC_OPTION_GRID[::2], ids=OPTION_IDS[::2])
def test_saves_only_x_and_row_statistics(options):
    """What autograd keeps between forward and backward: x itself and (G, M) mean and rstd."""
    x = torch.randn(3, 4, 5, 5, device=DEVICE, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s = pt.pcc_triton(x, PCCOptions(**options))
    shape = pcc_shape(x.shape, PCCOptions(**options))
    assert len(saved) == 3
    assert saved[0].data_ptr() == x.data_ptr() and saved[0].shape == x.shape  # not a copy
    for t in saved[1:]:
        assert t.shape == (shape.groups, shape.rows) and t.dtype == torch.float32
    s.backward()
    assert x.grad is not None


def test_sum_of_two_scores_and_double_use():
    x = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(9))
    xt = on_device(x).requires_grad_(True)
    xr = x.clone().double().requires_grad_(True)
    both = lambda t, b: (pccfast.pcc(t, backend=b)  # noqa: E731
                         + 0.5 * pccfast.pcc(t, orientation="pixel", penalty="square", backend=b))
    (gt,) = torch.autograd.grad(both(xt, "triton"), xt)
    (gr,) = torch.autograd.grad(both(xr, "torch"), xr)
    torch.testing.assert_close(gt.cpu().double(), gr, rtol=1e-4, atol=1e-6)


def test_torch_compile_through_the_op():
    """fullgraph torch.compile of a model using PCCLoss(backend="triton"): the op traces
    (interpreter: opaque custom op with a fake; GPU: triton_op with inductor)."""
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(3, 6, 3, padding=1).to(DEVICE)
    loss_fn = pccfast.PCCLoss(backend="triton", check_finite=False)
    pixel_fn = pccfast.PCCLoss(orientation="pixel", penalty="square", backend="triton",
                               check_finite=False)

    def step(x):
        feats = torch.relu(conv(x))
        return feats.mean() + loss_fn(feats) + pixel_fn(feats)

    x = torch.randn(2, 3, 6, 5, device=DEVICE)
    eager = step(x)
    (g_eager,) = torch.autograd.grad(eager, conv.weight)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    out = compiled(x)
    (g_compiled,) = torch.autograd.grad(out, conv.weight)
    tol = 1e-5 if DEVICE == "cpu" else 1e-4  # inductor may fuse the conv epilogue differently
    torch.testing.assert_close(out, eager, rtol=tol, atol=tol * 0.1)
    torch.testing.assert_close(g_compiled, g_eager, rtol=10 * tol, atol=tol * 0.1)


def test_autocast_region():
    """Under autocast the conv output is 16-bit; the op takes it as it is and the score and
    gradients match the reference on the same activations."""
    conv = torch.nn.Conv2d(3, 5, 3, padding=1).to(DEVICE)
    x = torch.randn(2, 3, 6, 7, device=DEVICE)
    dtype = torch.bfloat16
    with torch.autocast(device_type=DEVICE, dtype=dtype):
        feats = torch.relu(conv(x))
        assert feats.dtype == dtype
        got = pccfast.pcc(feats, backend="triton")
    assert got.dtype == torch.float32
    (g_got,) = torch.autograd.grad(got, conv.weight)
    with torch.autocast(device_type=DEVICE, dtype=dtype):
        feats = torch.relu(conv(x))
    want = pccfast.pcc(feats, backend="torch")  # outside: autocast would run it in bf16
    (g_want,) = torch.autograd.grad(want, conv.weight)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=3e-2, atol=3e-2 * float(g_want.abs().max()))


def test_bad_input():
    with pytest.raises(TypeError, match='"torch" and "cpu"'):
        pt.pcc_triton(torch.randn(1, 2, 3, 3, dtype=torch.float64, device=DEVICE), PCCOptions())
    with pytest.raises(ValueError, match="single"):
        pt.pcc_triton(torch.randn(2, 1, 3, 3, device=DEVICE), PCCOptions())
    with pytest.raises(ValueError, match="single"):  # the op itself checks too
        torch.ops.pccfast.pcc_triton_forward(torch.randn(2, 1, 3, 3, device=DEVICE), "channel",
                                             "sample", "abs", False, 1e-5)
    x = torch.randn(2, 3, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="mean and rstd must have shape"):
        stats = torch.zeros(2, 4, device=DEVICE)
        torch.ops.pccfast.pcc_triton_backward(torch.ones((), device=DEVICE), x, stats, stats,
                                              "channel", "sample", "abs", False, 1e-5)
