"""PCC: the reference against the spec's formula, and every CPU-side backend against the
reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import pccfast
from pccfast.ops import _C

from cases import PCC_OPTION_GRID, gradient_term_scale, pcc_cases

needs_ext = pytest.mark.skipif(_C.extension() is None, reason=str(_C.unavailable_reason()))

# Forward/gradient tolerances by compute dtype (inputs of fp16/bf16 are computed in fp32).
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def spec_formula(x: torch.Tensor, orientation, group, penalty, include_diagonal, eps=1e-5):
    """SPEC section 1 written out with explicit loops over groups and pairs (fp64)."""
    x = x.double()
    if group == "batch_mean":
        x = x.mean(0, keepdim=True)
    n, c, h, w = x.shape
    if orientation == "channel" and group == "batch":
        groups = [x.transpose(0, 1).reshape(c, -1)]
    elif orientation == "channel":
        groups = [x[i].reshape(c, -1) for i in range(n)]
    else:
        groups = [x[i].reshape(c, -1).t() for i in range(n)]
    total, count = 0.0, 0
    for v in groups:
        m, k = v.shape
        mu = v.mean(1, keepdim=True)
        var = ((v - mu) ** 2).mean(1, keepdim=True)
        vhat = (v - mu) / torch.sqrt(var + eps)
        for i, j in itertools.product(range(m), range(m)):
            if i == j and not include_diagonal:
                continue
            r = float((vhat[i] * vhat[j]).sum()) / k
            total += abs(r) if penalty == "abs" else r * r
            count += 1
    return total / count


@pytest.mark.parametrize("options", PCC_OPTION_GRID, ids=lambda o: "-".join(map(str, o.values())))
def test_reference_is_the_spec_formula(options):
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    x[:, 1] = 0.7  # a constant channel: vhat = 0, never NaN
    got = pccfast.pcc(x, backend="torch", **options)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert got.item() == pytest.approx(spec_formula(x, **options), rel=1e-12, abs=1e-15)


def test_known_values():
    base = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    # Two exact affine copies of one channel (variances v and 4v): |R_01| =
    # 2v / sqrt((v + eps)(4v + eps)), just under 1; fp32 sums of K = 25 terms of size <= 1.
    x = torch.cat([base, -2.0 * base + 1.0], dim=1)
    s = pccfast.pcc(x, backend="torch")
    var = base.double().reshape(3, -1).var(1, unbiased=False)
    expect = (2 * var / torch.sqrt((var + 1e-5) * (4 * var + 1e-5))).mean()
    assert s.item() == pytest.approx(expect.item(), rel=1e-5)
    # Orthogonal +-1 patterns (Walsh functions) are exactly uncorrelated: 0 to the rounding of
    # a K = 4 term fp32 dot product of unit-size terms (K * eps).
    walsh = torch.tensor([[1.0, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, 1]]).reshape(1, 3, 2, 2)
    assert pccfast.pcc(walsh, backend="torch").item() == pytest.approx(
        0.0, abs=4 * torch.finfo(torch.float32).eps)


def test_mode_options_change_the_score():
    x = torch.randn(2, 4, 3, 3)
    a = pccfast.pcc(x, backend="torch")
    assert pccfast.pcc(x, backend="torch", include_diagonal=True) > a
    assert not torch.equal(pccfast.pcc(x, backend="torch", penalty="square"), a)


@pytest.mark.parametrize("options", PCC_OPTION_GRID[:8],
                         ids=lambda o: "-".join(map(str, o.values())))
def test_reference_gradcheck(options):
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64).relu() + 0.1
    x[:, 0, 0, 0] += 1.0
    x.requires_grad_(True)
    fn = lambda t: pccfast.pcc(t, backend="torch", **options)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def _compare_backend(backend, x, options):
    """Forward and input gradient of `backend` against the reference on the same input;
    an invalid combination must be refused by both."""
    xr = x.detach().clone().requires_grad_(True)
    xb = x.detach().clone().requires_grad_(True)
    try:
        want = pccfast.pcc(xr, backend="torch", **options)
    except ValueError:
        with pytest.raises(ValueError):
            pccfast.pcc(xb, backend=backend, **options)
        return
    got = pccfast.pcc(xb, backend=backend, **options)
    assert got.dtype == want.dtype and got.shape == ()
    tol = TOL[want.dtype]
    torch.testing.assert_close(got, want, **tol)
    (gw,) = torch.autograd.grad(want, xr)
    (gg,) = torch.autograd.grad(got, xb)
    assert gg.dtype == x.dtype and gg.shape == x.shape
    atol = tol["rtol"] * gradient_term_scale(x, options)
    # dx rounded to x's dtype: two ulps, relative for normal numbers, two fixed steps for
    # subnormal ones (fp16 gradients of small inputs are nearly all subnormal).
    rtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(x.dtype, 0.0)
    atol += 2 * torch.finfo(x.dtype).tiny * torch.finfo(x.dtype).eps
    torch.testing.assert_close(gg.to(gw.dtype), gw, rtol=rtol, atol=atol)


@needs_ext
@pytest.mark.parametrize("case", list(pcc_cases()), ids=lambda c: c.name)
def test_cpu_backend_matches_reference_fp32(case):
    x = case(torch.float32)
    for options in PCC_OPTION_GRID:
        _compare_backend("cpu", x, options)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(pcc_cases(layouts=False)), ids=lambda c: c.name)
def test_cpu_backend_matches_reference_dtypes(case, dtype):
    x = case(dtype)
    for options in PCC_OPTION_GRID[::3]:
        _compare_backend("cpu", x, options)


@needs_ext
def test_cpu_backend_larger_chunked_inputs():
    """Inputs big enough that the CPU kernel processes several chunks."""
    from pccfast.ops import pcc_cpu

    x = torch.randn(9, 24, 40, 40).relu()
    for options in (dict(), dict(orientation="pixel", penalty="square"), dict(group="batch")):
        _compare_backend("cpu", x, options)
    assert pcc_cpu.register()


@needs_ext
@pytest.mark.parametrize("threads", [1, 3, 4])
def test_cpu_backend_both_schedules(threads):
    """Both schedules of the CPU kernels against the reference: whole groups per thread (one
    parallel region: 6 groups on 1 and 3 threads) and chunks of groups with threaded products
    (6 groups on 4 threads). Long rows (17x19 pixels, or 20 channels) take the matrix products,
    the 323 pixel rows spanning seven row blocks of R's upper staircase (the last one ragged);
    short rows the pair loops; channels_last and fp16 the strided and converting loops."""
    g = torch.Generator().manual_seed(threads)
    inputs = [torch.randn(6, 20, 17, 19, generator=g).relu(), torch.randn(6, 40, 2, 2, generator=g)]
    for x in inputs:
        x[:, 1] = 0.5  # a constant row
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for x in inputs:
            for options in [o for o in PCC_OPTION_GRID if o["group"] != "batch"]:
                _compare_backend("cpu", x, options)
            for variant in (x.contiguous(memory_format=torch.channels_last), x.half()):
                for options in (dict(), dict(orientation="pixel", penalty="square")):
                    _compare_backend("cpu", variant, options)
    finally:
        torch.set_num_threads(saved)


# Row counts around the pair loops' blocks: 4 or 2 rows per register block, vectors of 8 (fp32)
# or 4 (fp64) columns, the transposed rows padded to 8 columns.
SHORT_ROW_COUNTS = [1, 2, 3, 4, 5, 7, 8, 9, 11, 15, 16, 17, 33]


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("features", [1, 2, 3, 4, 5])
def test_cpu_backend_short_rows_at_block_boundaries(features, dtype, threads):
    """Rows of 1-4 features take the register-blocked pair loops (5: the products, or for
    "abs" without kept signs the register tiles of FUSED_ROW_SHAPES), whose row blocks, column
    vectors and padding end at the row counts above: every count against the
    reference, both penalties, with and without the diagonal, channel and pixel rows, a
    constant row and a duplicated one among random ones, whole groups per thread."""
    g = torch.Generator().manual_seed(features * 100 + threads)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    groups = 3 if threads == 1 else 4  # whole groups per thread on either count
    try:
        for rows in SHORT_ROW_COUNTS:
            channel = torch.randn(groups, rows, 1, features, generator=g, dtype=dtype)
            pixel = torch.randn(groups, features, rows, 1, generator=g, dtype=dtype)
            if rows >= 3:
                channel[:, 1] = 0.25  # a constant row
                channel[:, 2] = channel[:, 0]  # R = 1 exactly, phi' at the top of its range
            for penalty, diagonal in itertools.product(("abs", "square"), (False, True)):
                options = dict(penalty=penalty, include_diagonal=diagonal)
                _compare_backend("cpu", channel, options)
                _compare_backend("cpu", pixel, dict(options, orientation="pixel"))
    finally:
        torch.set_num_threads(saved)


# Sizes around the kept sign codes' rule (2 bits a pair of R's upper staircase, kept for "abs"
# when at most 1/8 of the fp32 activation) and the staircase's blocks (32 rows up to M = 256):
# with K = 1 (short rows) or 7 (codes too large) none are kept, with K = 49, 64, 256 they are,
# with K = 32 for all but M = 130 (2 * 2691 bytes > 130 * 32).
SIGN_ROW_COUNTS = [31, 32, 33, 64, 65, 130]
SIGN_FEATURE_COUNTS = [1, 7, 32, 49, 64, 256]
_MAPS = {1: (1, 1), 7: (1, 7), 31: (1, 31), 32: (4, 8), 33: (3, 11), 49: (7, 7), 64: (8, 8),
         65: (5, 13), 130: (10, 13), 256: (16, 16)}


def _sign_input(groups, rows, features, orientation, dtype, g):
    """(G, C, H, W) with M rows of K features, ReLU'd, with an all-zero and a constant row."""
    h, w = _MAPS[features if orientation == "channel" else rows]
    c = rows if orientation == "channel" else features
    x = torch.randn(groups, c, h, w, generator=g).relu()
    rows_of = x if orientation == "channel" else x.flatten(2).transpose(1, 2)  # a view
    rows_of[:, 1] = 0.0  # vhat = 0: R = 0 exactly against every row, code 0
    rows_of[:, 2] = 0.5
    return x.to(dtype)


def _op_backward(x, mean, rstd, codes, options, grad=-1.25):
    """dx from the compiled backward with the given sign codes ((0,): R formed again)."""
    from pccfast.ops.pcc_options import PCCOptions

    g = torch.tensor(grad, dtype=mean.dtype)
    return torch.ops.pccfast.pcc_backward(g, x, mean, rstd, codes,
                                          *PCCOptions(**options).op_args())


NO_CODES = torch.empty(0, dtype=torch.uint8)


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpu_backend_sign_codes_give_the_recomputed_gradient(dtype, threads):
    """The forward's kept signs of R ("abs") give bit for bit the dx of forming R again, and
    the reference's: rows around the rule's boundary and the staircase's blocks, channel and
    pixel rows, with and without the diagonal, zero and constant rows (R = 0: sign 0), whole
    groups per thread on 1 and 2 threads. The codes are used: negated, they negate dx."""
    from pccfast.ops.pcc_cpu import sign_code_bytes
    from pccfast.ops.pcc_options import PCCOptions

    g = torch.Generator().manual_seed(7 + threads)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    kept = 0
    try:
        for rows, features in itertools.product(SIGN_ROW_COUNTS, SIGN_FEATURE_COUNTS):
            for orientation, diagonal in itertools.product(("channel", "pixel"), (False, True)):
                options = dict(orientation=orientation, include_diagonal=diagonal)
                x = _sign_input(2, rows, features, orientation, dtype, g)
                _, mean, rstd, codes = torch.ops.pccfast.pcc_forward(
                    x, *PCCOptions(**options).op_args())
                size = sign_code_bytes(rows, features, PCCOptions(**options))
                assert codes.shape == ((2, size) if size else (0,))
                assert size == 0 or 2 * size <= rows * features  # <= 1/8 of the fp32 rows
                dx = _op_backward(x, mean, rstd, codes, options)
                assert torch.equal(dx, _op_backward(x, mean, rstd, NO_CODES, options))
                if size:
                    kept += 1
                    # the whole-group path kept them (the constant row: normalised rows)
                    assert codes[:, 0].tolist() == [1, 1]
                    # 1 <-> 2 in every 2-bit field: every sign negated, so D and dx negated
                    negated = ((codes & 0x55) << 1) | ((codes & 0xAA) >> 1)
                    negated[:, 0] = 1
                    assert torch.equal(_op_backward(x, mean, rstd, negated, options), -dx)
                if features in (7, 64) or dtype == torch.float32:
                    _compare_backend("cpu", x, options)
    finally:
        torch.set_num_threads(saved)
    assert kept == 2 * 2 * (len(SIGN_ROW_COUNTS) * 4 - 1)  # see SIGN_FEATURE_COUNTS


# (C, H, W) of channel rows that take the raw-row path for "abs" (csrc/pcc_cpu.cpp: kept signs,
# at least 64 features, fp32/fp64): the range's edges in K (64, 8x8) and M (33 rows: the
# fewest with codes at K = 64; 256: the most), odd maps, the staircase's two blocks (65 rows).
RAW_ROW_SHAPES = [(33, 8, 8), (65, 8, 8), (16, 32, 32), (31, 9, 11), (256, 16, 16)]


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_backend_raw_rows_match_the_reference(dtype, threads):
    """R formed from the raw rows (X X^T and the row sums, no normalised copy; header 2): score
    and dx against the reference, with an all-zero row (mean 0: still raw rows); rows whose
    mean is large against their spread (an offset, a constant row) take the normalised rows
    (header 1) and must agree too; sample groups and the batch mean, 1 and 2 threads."""
    from pccfast.ops.pcc_options import PCCOptions

    g = torch.Generator().manual_seed(17 + threads)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for (c, h, w), variant in itertools.product(RAW_ROW_SHAPES, ("raw", "offset", "const")):
            x = torch.randn(2, c, h, w, generator=g).relu()
            x[:, 1] = 0.0
            if variant == "offset":  # mean^2 / var ~ 5^2 / 0.34: past the fp32 bound
                x[:, 3] += 5.0 if dtype == torch.float32 else 500.0
            if variant == "const":
                x[:, 2] = 0.5
            x = x.to(dtype)
            for group, diagonal in itertools.product(("sample", "batch_mean"), (False, True)):
                options = dict(group=group, include_diagonal=diagonal)
                codes = torch.ops.pccfast.pcc_forward(x, *PCCOptions(**options).op_args())[3]
                groups = 2 if group == "sample" else 1
                # one group on 2 threads: the chunked path, no codes kept (header 0)
                header = 0 if groups < threads else 2 if variant == "raw" else 1
                assert codes[:, 0].tolist() == [header] * groups, (c, h, w, variant, group)
                _compare_backend("cpu", x, options)
    finally:
        torch.set_num_threads(saved)


@needs_ext
def test_cpu_backend_sign_codes_across_thread_counts():
    """Forward and backward on different thread counts: a forward that took the chunked path
    (3 groups on 2 threads) keeps no signs (headers 0) and a whole-groups backward forms R
    again; codes of a whole-groups forward are decoded by a whole-groups backward on another
    thread count and ignored by a chunked one. Every dx bit for bit the recomputed one's."""
    from pccfast.ops.pcc_options import PCCOptions

    g = torch.Generator().manual_seed(3)
    saved = torch.get_num_threads()
    try:
        for groups, forward_threads, backward_threads in [(3, 2, 1), (4, 2, 1), (3, 1, 2),
                                                          (4, 1, 2)]:
            for orientation in ("channel", "pixel"):
                options = dict(orientation=orientation)
                x = _sign_input(groups, 65 if orientation == "channel" else 64,
                                49 if orientation == "channel" else 256, orientation,
                                torch.float32, g)
                torch.set_num_threads(forward_threads)
                _, mean, rstd, codes = torch.ops.pccfast.pcc_forward(
                    x, *PCCOptions(**options).op_args())
                assert codes.dim() == 2 and codes.shape[0] == groups
                chunked_forward = groups % forward_threads != 0
                assert codes[:, 0].tolist() == [0 if chunked_forward else 1] * groups
                torch.set_num_threads(backward_threads)
                dx = _op_backward(x, mean, rstd, codes, options)
                assert torch.equal(dx, _op_backward(x, mean, rstd, NO_CODES, options))
                _compare_backend("cpu", x, options)
    finally:
        torch.set_num_threads(saved)


@needs_ext
def test_cpu_backend_sign_codes_shape_from_shapes_alone():
    """The fake implementation (torch.compile, export) gives the codes' real shape: a sweep of
    row and feature counts across the keep rule's boundary, on 1 and 2 threads, both penalties
    and group modes; a bad codes tensor is a clear error."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pccfast.ops.pcc_options import PCCOptions

    saved = torch.get_num_threads()
    fake_mode = FakeTensorMode()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for c, (h, w) in itertools.product([5, 30, 33, 64, 65, 129, 200],
                                               [(1, 5), (2, 2), (3, 4), (5, 5), (4, 9), (8, 8)]):
                x = torch.randn(3, c, h, w)
                for group, penalty in itertools.product(("sample", "batch", "batch_mean"),
                                                        ("abs", "square")):
                    args = PCCOptions(group=group, penalty=penalty).op_args()
                    real = torch.ops.pccfast.pcc_forward(x, *args)[3]
                    with fake_mode:
                        fake = torch.ops.pccfast.pcc_forward(fake_mode.from_tensor(x), *args)[3]
                    assert fake.shape == real.shape and fake.dtype == real.dtype == torch.uint8
    finally:
        torch.set_num_threads(saved)
    x = torch.randn(2, 40, 8, 8)
    _, mean, rstd, codes = torch.ops.pccfast.pcc_forward(x, *PCCOptions().op_args())
    with pytest.raises(ValueError, match="sign_codes must have shape"):
        _op_backward(x, mean, rstd, codes[:, 1:], {})
    with pytest.raises(TypeError, match="sign_codes must be a uint8"):
        _op_backward(x, mean, rstd, codes.float(), {})


@needs_ext
def test_cpu_backend_without_the_exported_blas():
    """A torch built with another BLAS exports no sgemm_/dgemm_: the kernels then multiply
    through at::cpu::addmm_out (PCCFAST_PCC_GEMM=aten takes that path here, read once per
    process), and must agree with the reference the same way."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PCCFAST_PCC_GEMM": "aten"}
    test = f"{__file__}::test_cpu_backend_both_schedules"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "passed" in done.stdout and "skipped" not in done.stdout


# (C, H, W, orientation) of groups whose rows take the register tiles of csrc/pcc_fused_rows.h
# ("abs", 5-32 features, no sign codes kept, padded rows within 4096 values): the range's edges
# in K (5 = just past the short rows, 32) and in M (the fewest rows without codes, 256 = the
# most at K = 16), odd and even, rows padded or not, one of pixel rows (63 rows of 13).
FUSED_ROW_SHAPES = [(9, 1, 5, "channel"), (29, 4, 4, "channel"), (64, 4, 4, "channel"),
                    (130, 3, 3, "channel"), (93, 4, 8, "channel"), (256, 4, 4, "channel"),
                    (13, 7, 9, "pixel")]


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpu_backend_fused_rows_match_the_reference(dtype, threads):
    """The register-tiled "abs" of few-feature rows (R never stored): score and dx against the
    reference at the range's edges, with and without the diagonal, per sample and on the batch
    mean, with an all-zero and a constant row (R = 0 there: sign 0), whole groups per thread on
    1 and 2 threads; no sign codes are kept for these shapes."""
    from pccfast.ops.pcc_cpu import sign_code_bytes
    from pccfast.ops.pcc_options import PCCOptions

    g = torch.Generator().manual_seed(11 + threads)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for c, h, w, orientation in FUSED_ROW_SHAPES:
            rows, features = (c, h * w) if orientation == "channel" else (h * w, c)
            x = torch.randn(2, c, h, w, generator=g).relu()
            rows_of = x if orientation == "channel" else x.flatten(2).transpose(1, 2)  # a view
            rows_of[:, 1] = 0.0
            rows_of[:, 2] = 0.5
            x = x.to(dtype)
            for group, diagonal in itertools.product(("sample", "batch_mean"), (False, True)):
                options = dict(orientation=orientation, group=group, include_diagonal=diagonal)
                assert sign_code_bytes(rows, features, PCCOptions(**options)) == 0
                _compare_backend("cpu", x, options)
    finally:
        torch.set_num_threads(saved)


@needs_ext
def test_cpu_backend_keeps_row_statistics_and_small_sign_codes():
    """Autograd saves x itself, (G, M) statistics and the signs of R (uint8, at most 1/8 of the
    fp32 activation's bytes), nothing activation- or Gram-sized."""
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s = pccfast.pcc(x, backend="cpu")
    s.backward()
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # x itself, not a copy
    codes = [t for t in saved if t.dtype == torch.uint8]
    assert len(codes) == 1 and 0 < 8 * codes[0].numel() <= 4 * x.numel()
    for t in saved:
        if t.dtype != torch.uint8:
            assert t.data_ptr() == x.data_ptr() or t.numel() <= 4 * 6, tuple(t.shape)
    assert x.grad is not None


def test_auto_backend_on_cpu():
    x = torch.randn(2, 3, 4, 4)
    want = pccfast.pcc(x, backend="torch")
    torch.testing.assert_close(pccfast.pcc(x), want, **TOL[torch.float32])


def test_pcc_matrix():
    x = torch.randn(3, 4, 2, 5, dtype=torch.float64)
    r = pccfast.pcc_matrix(x)
    assert r.shape == (3, 4, 4)
    torch.testing.assert_close(r, r.transpose(1, 2))
    v = x.reshape(3, 4, -1)
    vhat = ((v - v.mean(-1, keepdim=True))
            / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-5))
    torch.testing.assert_close(r, vhat @ vhat.transpose(1, 2) / 10)
    assert pccfast.pcc_matrix(x, orientation="pixel").shape == (3, 10, 10)
    assert pccfast.pcc_matrix(x, group="batch").shape == (1, 4, 4)
    assert pccfast.pcc_matrix(x, group="batch_mean").shape == (1, 4, 4)


def test_pcc_loss_module():
    loss = pccfast.PCCLoss(penalty="square", backend="torch")
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = loss(x)
    out.backward()
    want = pccfast.pcc(x, penalty="square").item()  # the auto backend: another fp32 code path
    assert out.item() == pytest.approx(want, rel=TOL[torch.float32]["rtol"],
                                       abs=TOL[torch.float32]["atol"])
    assert "square" in repr(loss)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@needs_ext
def test_torch_compile_of_a_model_using_pccloss():
    """The custom ops trace under torch.compile (fake implementations + registered autograd)."""
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(3, 6, 3, padding=1)
    loss_fn = pccfast.PCCLoss(backend="cpu")

    def step(x):
        feats = torch.relu(conv(x))
        return feats.mean() + loss_fn(feats)

    x = torch.randn(2, 3, 8, 8)
    eager = step(x)
    (g_eager,) = torch.autograd.grad(eager, conv.weight)
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x)
    (g_compiled,) = torch.autograd.grad(out, conv.weight)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if _C.extension() is not None else []))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_does_not_lower_the_arithmetic(backend, dtype):
    """Inside autocast the score is still computed in fp32 (the inner matmuls are not autocast)."""
    x = torch.randn(3, 5, 6, 6).relu()
    want = pccfast.pcc(x.to(dtype), backend="torch")
    with torch.autocast("cpu", dtype=dtype):
        xa = x.to(dtype).requires_grad_(True)
        got = pccfast.pcc(xa, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert xa.grad.dtype == dtype and torch.isfinite(xa.grad).all()


SECOND_ORDER_OPTIONS = [dict(), dict(penalty="square"),
                        dict(orientation="pixel", include_diagonal=True),
                        dict(group="batch"), dict(group="batch_mean", penalty="square")]


@needs_ext
@pytest.mark.parametrize("options", SECOND_ORDER_OPTIONS,
                         ids=lambda o: "-".join(map(str, o.values())) or "default")
def test_cpu_backend_double_backward(options):
    """create_graph=True through the cpu backend (gradient penalties, second-order methods): its
    backward is then differentiable through the reference, so second derivatives are exact,
    not zeros with a torch warning."""
    g = torch.Generator().manual_seed(31)
    x = torch.randn(2, 3, 3, 5, generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)

    def second(backend):
        t = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(pccfast.pcc(t, backend=backend, **options), t,
                                      create_graph=True)
        (hv,) = torch.autograd.grad((grad * v).sum(), t)
        return grad.detach(), hv

    grad_cpu, hv_cpu = second("cpu")
    grad_ref, hv_ref = second("torch")
    assert hv_ref.abs().max() > 1e-3 * hv_ref.numel() ** -0.5 * grad_ref.abs().max()
    torch.testing.assert_close(grad_cpu, grad_ref, **TOL[torch.float64])
    torch.testing.assert_close(hv_cpu, hv_ref, **TOL[torch.float64])
    small = x[:, :, :2, :3].clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: pccfast.pcc(t, backend="cpu", **options),
                                        (small,))


def _fresh_python(code: str, env: dict | None = None) -> str:
    """Runs code in a new interpreter (nothing of pccfast imported or registered yet)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(pccfast.__file__)))
    full_env = {**os.environ,
                "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    full_env.pop("TRITON_INTERPRET", None)
    full_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout


FIRST_CALL_COMPILED = """
import torch, pccfast
from pccfast.ops import ci_compiled
conv = torch.nn.Conv2d(3, 5, 3, padding=1)

def step(x):
    f = torch.relu(conv(x))
    s = pccfast.pcc(f, backend=BACKEND, check_finite=False)
    if BACKEND == "cpu":  # the compiled CI op too
        s = s + 0 * ci_compiled.channel_independence(f.detach().flatten(2)).sum()
    return s

x = torch.randn(2, 3, 6, 7)
out = torch.compile(step, fullgraph=True, backend=COMPILER)(x)
(g,) = torch.autograd.grad(out, conv.weight)
want = step(x)
(g_want,) = torch.autograd.grad(want, conv.weight)
torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(g, g_want, rtol=1e-4, atol=1e-6)
print("ok")
"""


@needs_ext
def test_first_call_of_the_process_inside_torch_compile_fullgraph():
    """The ops get their fake/autograd implementations at import: registering them at the first
    call, inside the trace, broke the graph (fullgraph=True failed)."""
    code = "BACKEND, COMPILER = 'cpu', 'inductor'\n" + FIRST_CALL_COMPILED
    assert _fresh_python(code).strip().endswith("ok")


@pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None,
                    reason="triton is not installed")
def test_first_call_of_the_process_inside_torch_compile_fullgraph_triton_interpreted():
    from pccfast.ops.backends import interpreter_unavailable_reason

    if (reason := interpreter_unavailable_reason()) is not None:
        pytest.skip(reason)
    code = "BACKEND, COMPILER = 'triton', 'aot_eager'\n" + FIRST_CALL_COMPILED
    assert _fresh_python(code, {"TRITON_INTERPRET": "1"}).strip().endswith("ok")


EXTREME_CASES = [  # (dtype, largest |x|): variances that overflow unless rows are scaled
    (torch.float32, 1e19), (torch.float32, 1e37), (torch.bfloat16, 1e20), (torch.bfloat16, 1e37),
    (torch.float64, 1e160), (torch.float64, 1e300),
]


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if _C.extension() is not None else []))
@pytest.mark.parametrize("dtype,magnitude", EXTREME_CASES, ids=str)
def test_values_near_the_top_of_the_dtype_range(backend, dtype, magnitude):
    """Every backend takes the dtype's whole range: the score of x equals that of x scaled down
    by a power of two (eps scaled alike), where it used to be a silent 0 or NaN; constant rows
    at that magnitude still give vhat = 0."""
    g = torch.Generator().manual_seed(32)
    base = torch.randn(3, 4, 3, 5, generator=g, dtype=torch.float64).clamp(-3, 3)
    base[:, 1] = 0.5  # constant rows
    shift = int(math.floor(math.log2(magnitude / 3)))
    x = (base * 2.0**shift).to(dtype)
    for options in (dict(), dict(group="batch"), dict(orientation="pixel", penalty="square"),
                    dict(group="batch_mean")):
        got = pccfast.pcc(x, backend=backend, **options)
        # the same values scaled by 2^-shift (exact), eps by 4^-shift (below any variance here)
        small = x.double() * 2.0**-shift
        want = pccfast.pcc(small, eps=max(1e-5 * 4.0**-shift, 1e-300), backend="torch", **options)
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7), options
        if dtype != torch.float64 and magnitude < 1e30:  # fp32 gradients still normal floats
            t = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(pccfast.pcc(t, backend=backend, **options), t)
            s = small.requires_grad_(True)
            (grad_want,) = torch.autograd.grad(pccfast.pcc(s, backend="torch", **options), s)
            torch.testing.assert_close(grad.double() * 2.0**shift, grad_want, rtol=2e-2,
                                       atol=1e-5 * float(grad_want.abs().max()))
    r = pccfast.pcc_matrix(x)
    assert torch.isfinite(r).all() and r[:, 0, 2].abs().max() > 0 and (r[:, 1] == 0).all()
