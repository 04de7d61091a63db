"""The CUDA CI backend: Gram kernel, batched Jacobi eigensolver, ``channel_independence``.

Two halves:

* CPU (run wherever the extension is built): the CUDA kernels' host emulations -- the kernels'
  own per-thread steps in their order (kernels/jacobi_eigh.cuh, kernels/gemm_f64.cuh) and the
  operator's host flow (kernels/ci_cuda_flow.h). ``jacobi_eigh_emulation`` against
  ``torch.linalg.eigh`` on random, degenerate, rank-deficient and badly scaled matrices of
  sizes 1..70; ``small_side_gram_emulation`` against the float64 product over dtypes, strides
  and tile edges; ``channel_independence_emulation`` against the brute force at the SPEC bar.
  Plus: a CUDA build registers its kernels; the GPU benchmark's dry run.
* GPU (skipped without a CUDA device and CUDA kernels): each kernel against its emulation
  (bit for bit where the arithmetic is the same) and against torch, and the CUDA CI against
  the reference and the brute force over dtypes, strides and both sides of C <= P.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from pccfast.ops import _C, ci_cuda
from pccfast.ops.ci_reference import ci_bruteforce, ci_fast

from cases import assert_within, ci_tolerance

EPS = torch.finfo(torch.float64).eps
MAX_SWEEPS = 40  # jacobi::kMaxSweeps

needs_extension = pytest.mark.skipif(
    _C.extension() is None, reason=f"pccfast._C unavailable: {_C.unavailable_reason()}"
)
needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and ci_cuda.has_cuda_ops()),
    reason="needs a CUDA device and pccfast._C built with CUDA kernels",
)


# ---- symmetric test matrices ----------------------------------------------------------------


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def symmetric_matrix(kind: str, n: int, seed: int) -> torch.Tensor:
    """(n, n) float64 symmetric matrix of the named family."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":  # indefinite
        m = torch.randn(n, n, generator=gen, dtype=torch.float64)
        return (m + m.T) / 2
    if kind == "gram":  # a Gram matrix of activations: positive semi-definite
        x = torch.randn(n, n + 5, generator=gen, dtype=torch.float64)
        return x @ x.T
    if kind == "degenerate":  # eigenvalues repeated in clusters of up to 4
        values = torch.tensor([float(1 + i // 4) for i in range(n)], dtype=torch.float64)
        q = _orthogonal(n, gen)
        return (q * values) @ q.T
    if kind == "rank_deficient":  # rank about n / 3, the rest exactly 0 in exact arithmetic
        x = torch.randn(n, max(1, n // 3), generator=gen, dtype=torch.float64)
        return x @ x.T
    if kind == "badly_scaled":  # rows and columns scaled over 16 orders of magnitude
        x = torch.randn(n, n + 3, generator=gen, dtype=torch.float64)
        d = 10.0 ** (16 * torch.rand(n, generator=gen, dtype=torch.float64) - 8)
        return (d[:, None] * x) @ (d[:, None] * x).T
    raise ValueError(kind)


KINDS = ("random", "gram", "degenerate", "rank_deficient", "badly_scaled")


def check_eigh(gram, values, vectors, sweeps=None, slack: float = 8.0) -> None:
    """values/vectors are an accurate eigendecomposition of gram, as torch.linalg.eigh's."""
    gram, values, vectors = gram.cpu(), values.cpu(), vectors.cpu()
    n = gram.shape[-1]
    norm = torch.linalg.matrix_norm(gram, ord=2).clamp_min(1e-300)[:, None]  # (B, 1)
    tol = slack * max(n, 4) * EPS
    if sweeps is not None:
        assert bool(((sweeps >= 0) & (sweeps <= MAX_SWEEPS)).all()), sweeps
    assert torch.all(values[:, 1:] >= values[:, :-1]), "eigenvalues not ascending"
    expected = torch.linalg.eigvalsh(gram)
    assert torch.all((values - expected).abs() <= tol * norm), (values - expected).abs().max()
    eye = torch.eye(n, dtype=torch.float64)
    assert (vectors.mT @ vectors - eye).abs().max() <= tol
    residual = gram @ vectors - vectors * values[:, None, :]
    assert torch.all(residual.abs().amax((1, 2)) <= tol * norm[:, 0])


def check_projectors(gram, values, vectors, gap: float = 1e-6, slack: float = 8.0) -> None:
    """Spectral projectors on clusters of (numerically) equal eigenvalues match eigh's, to
    what two backward-stable solvers guarantee: each solves gram + E with ||E|| <= tol * ||G||
    (check_eigh's tol), which turns a cluster's projector by at most ||E|| / (its gap to the
    rest of the spectrum) (Davis-Kahan); so 2 * 2 * tol * ||G|| / gap apart."""
    ref_values, ref_vectors = torch.linalg.eigh(gram)
    n = gram.shape[-1]
    tol = slack * max(n, 4) * EPS
    for i in range(gram.shape[0]):
        lam = ref_values[i]
        scale = lam.abs().max().clamp_min(1e-300)
        start = 0
        for j in range(1, lam.numel() + 1):
            if j == lam.numel() or lam[j] - lam[j - 1] > gap * scale:
                u, v = ref_vectors[i, :, start:j], vectors[i, :, start:j].cpu()
                diff = (u @ u.T - v @ v.T).abs().max()
                sides = [lam[start] - lam[start - 1]] if start > 0 else []
                sides += [lam[j] - lam[j - 1]] if j < n else []
                if sides:  # (the whole spectrum: both projectors are the identity)
                    bound = 4 * tol * scale / min(sides)
                    assert diff <= bound, (i, start, j, float(diff), float(bound))
                start = j


# ---- CPU: the kernel's algorithm on the host ------------------------------------------------


@needs_extension
@pytest.mark.parametrize("kind", KINDS)
def test_jacobi_emulation_matches_eigh(kind):
    for n in list(range(1, 18)) + [23, 31, 32, 33, 47, 64, 70]:
        gram = torch.stack([symmetric_matrix(kind, n, seed) for seed in range(2)])
        values, vectors, sweeps = ci_cuda.jacobi_eigh_emulation(gram)
        check_eigh(gram, values, vectors, sweeps)
        if kind in ("degenerate", "gram"):
            check_projectors(gram, values, vectors)


@needs_extension
@pytest.mark.parametrize("n", [1, 2, 9, 40, 97, 130])
def test_jacobi_emulation_spill_changes_no_bit(n):
    """The kernel keeps what fits of A and V^T in shared memory and spills the rest (always
    past n = 138 on an H100): every split gives the same bits."""
    gram = torch.stack([symmetric_matrix(k, n, 3) for k in ("gram", "degenerate")])
    full = ci_cuda.jacobi_eigh_emulation(gram)
    fixed = 8 * (2 * ((n + 1) // 2) + 64) + 4 * (2 * ((n + 1) // 2) + n) + 16  # >= the fixed arrays
    for shared_bytes in (fixed, fixed + 8 * n * (n + 1) // 4, fixed + 8 * n * n):
        part = ci_cuda.jacobi_eigh_emulation(gram, shared_bytes)
        for x, y in zip(full, part):
            assert torch.equal(x, y), shared_bytes
    with pytest.raises(ValueError, match="shared_bytes"):
        ci_cuda.jacobi_eigh_emulation(gram, 64)


@needs_extension
def test_jacobi_emulation_special_matrices():
    zero = torch.zeros(1, 5, 5, dtype=torch.float64)
    values, vectors, sweeps = ci_cuda.jacobi_eigh_emulation(zero)
    assert sweeps.tolist() == [0] and torch.equal(values, torch.zeros(1, 5, dtype=torch.float64))
    assert torch.equal(vectors, torch.eye(5, dtype=torch.float64)[None])

    diagonal = torch.diag(torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=torch.float64))[None]
    values, vectors, sweeps = ci_cuda.jacobi_eigh_emulation(diagonal)
    assert sweeps.tolist() == [0]
    assert values.tolist() == [[-1.0, 0.5, 2.0, 3.0]]  # exact, sorted
    assert torch.equal(vectors.abs(), torch.eye(4, dtype=torch.float64)[:, [1, 3, 2, 0]][None])

    equal_diagonal = torch.tensor([[[2.0, 1.0], [1.0, 2.0]]], dtype=torch.float64)  # tau = 0
    values, vectors, sweeps = ci_cuda.jacobi_eigh_emulation(equal_diagonal)
    assert sweeps.tolist() == [1]
    torch.testing.assert_close(values, torch.tensor([[1.0, 3.0]], dtype=torch.float64))

    # Entries near the overflow and underflow limits (the convergence test is scaled).
    for scale in (1e-150, 1e150):
        gram = symmetric_matrix("gram", 9, 3)[None] * scale
        values, vectors, sweeps = ci_cuda.jacobi_eigh_emulation(gram)
        check_eigh(gram, values, vectors, sweeps)

    # Subnormal entries: the scale that brings them to [1, 2) would overflow; it is capped.
    for gram in (torch.eye(4, dtype=torch.float64)[None] * 1e-310,
                 torch.diag(torch.tensor([4e-320, 1e-315, 0.0], dtype=torch.float64))[None]):
        values, _, sweeps = ci_cuda.jacobi_eigh_emulation(gram)
        assert sweeps.item() >= 0
        assert torch.equal(values, torch.linalg.eigvalsh(gram))

    # Only the lower triangle is read, as torch.linalg.eigh (UPLO="L").
    gram = symmetric_matrix("random", 6, 4)[None]
    upper_garbage = gram + torch.triu(torch.full_like(gram, 7.0), diagonal=1)
    values, _, _ = ci_cuda.jacobi_eigh_emulation(upper_garbage)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(gram), rtol=0, atol=1e-13)


@needs_extension
def test_jacobi_emulation_reports_non_finite_input():
    gram = symmetric_matrix("gram", 6, 5)[None].repeat(3, 1, 1)
    gram[1, 3, 2] = math.nan
    gram[2, 4, 4] = math.inf
    _, _, sweeps = ci_cuda.jacobi_eigh_emulation(gram)
    assert sweeps[0] >= 0 and sweeps[1] == -1 and sweeps[2] == -1


@needs_extension
def test_jacobi_emulation_rejects_bad_input():
    with pytest.raises(TypeError, match="float64"):
        ci_cuda.jacobi_eigh_emulation(torch.eye(3)[None])
    with pytest.raises(ValueError, match=r"\(B, n, n\)"):
        ci_cuda.jacobi_eigh_emulation(torch.zeros(2, 3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ci_cuda.jacobi_eigh_emulation([[1.0]])


def _rows(kind: str, b: int, c: int, p: int, seed: int) -> torch.Tensor:
    """(B, C, P) float64 feature maps with the awkward rows of SPEC section 2."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(b, c, p, generator=gen, dtype=torch.float64)
    if kind == "low_rank":  # linearly dependent rows
        r = max(1, min(c, p) // 2)
        a = torch.randn(b, c, r, generator=gen, dtype=torch.float64) @ torch.randn(
            b, r, p, generator=gen, dtype=torch.float64
        )
    if c > 1:
        a[:, 0] = 0.0  # dead channel
    if c > 2:
        a[:, 1] *= 1e-6  # tiny channel
    if c > 3:
        a[:, 3] = a[:, 2]  # duplicated channel
    return a


def _assert_bar(got, a, expected=None, results=1):
    """|got - expected| <= 1e-7 ||A||_* per image (SPEC section 2); expected: the brute force,
    or another fast result with results=2 (each within the bar of the exact CI)."""
    a64 = a.double().cpu()
    expected = ci_bruteforce(a64) if expected is None else expected.cpu()
    assert_within(got, expected, ci_tolerance(a64, results))


# Odd sizes around the 64-wide tiles and 16-deep slices of the Gram kernel, both sides of C <= P.
GRAM_SHAPES = [(2, 1, 1), (1, 3, 17), (2, 16, 16), (1, 63, 65), (1, 64, 130), (2, 65, 15),
               (1, 130, 70), (3, 40, 9)]


def _strided_views(a: torch.Tensor) -> dict:
    """The same (B, C, P) values in other layouts (P = 36 for channels_last)."""
    b, c, p = a.shape
    views = {
        "contiguous": a,
        "pixel-major storage": a.transpose(1, 2).contiguous().transpose(1, 2),
        "every other channel": torch.stack([a, a], 2).reshape(b, 2 * c, p)[:, ::2],
        "batch stride 0": a[:1].expand(b, c, p),
    }
    if p == 36:
        views["channels_last"] = (
            a.reshape(b, c, 6, 6).contiguous(memory_format=torch.channels_last).reshape(b, c, p)
        )
    return views


@needs_extension
@pytest.mark.parametrize("b,c,p", GRAM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_gram_emulation_matches_float64_product(b, c, p, dtype):
    a = _rows("random", b, c, p, seed=c * 7 + p).to(dtype)
    gram = ci_cuda.small_side_gram_emulation(a)
    x = a.double()
    expected = x @ x.mT if c <= p else x.mT @ x
    assert gram.dtype == torch.float64 and gram.shape == expected.shape
    assert torch.equal(gram, gram.mT)  # mirrored bit for bit
    depth = max(c, p)
    scale = (x.square().sum(-1).amax() if c <= p else x.square().sum(-2).amax()).item()
    torch.testing.assert_close(gram, expected, rtol=0, atol=4 * depth * EPS * scale)


@needs_extension
def test_gram_emulation_reads_any_strides():
    a = _rows("random", 3, 12, 36, seed=2).float()
    expected = ci_cuda.small_side_gram_emulation(a[:1].expand(3, -1, -1).contiguous())
    for name, view in _strided_views(a[:1].expand(3, -1, -1)).items():
        assert torch.equal(ci_cuda.small_side_gram_emulation(view), expected), name
    wide = _rows("random", 2, 40, 9, seed=3)  # P < C: A^T A
    scale = wide.square().sum(-2).amax().item()
    for name, view in _strided_views(wide).items():
        torch.testing.assert_close(  # both products within depth * eps * scale (as above)
            ci_cuda.small_side_gram_emulation(view), view.mT @ view, rtol=0,
            atol=4 * 40 * EPS * scale, msg=name,
        )


CI_SHAPES = [(2, 7, 30), (2, 16, 16), (3, 24, 9), (2, 40, 36), (1, 65, 20), (2, 5, 1), (1, 1, 5),
             (1, 70, 70)]


@needs_extension
@pytest.mark.parametrize("b,c,p", CI_SHAPES)
@pytest.mark.parametrize("kind", ["random", "low_rank"])
def test_ci_emulation_meets_bar(b, c, p, kind):
    """The CUDA operator's whole computation (host-emulated kernels) meets the SPEC bar."""
    a = _rows(kind, b, c, p, seed=c * 100 + p)
    got = ci_cuda.channel_independence_emulation(a)
    assert got.dtype == torch.float64 and got.shape == (b, c)
    _assert_bar(got, a)
    _assert_bar(got, a, expected=torch.ops.pccfast.channel_independence(a), results=2)  # the CPU op
    if c > 1:
        assert torch.all(got[:, 0] == 0)  # the dead channel
    assert torch.all(got >= 0)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,c,p", [(2, 24, 36), (2, 50, 24)])
def test_ci_emulation_low_precision_and_strided_inputs(dtype, b, c, p):
    """fp16/bf16/fp32 are read as they are: CI equals the float64 CI of the rounded values,
    in every layout."""
    a = _rows("random", b, c, p, seed=11).to(dtype)
    expected = ci_bruteforce(a.double())
    for name, view in _strided_views(a).items():
        got = ci_cuda.channel_independence_emulation(view)
        _assert_bar(got, view, expected=expected if name != "batch stride 0" else None)


@needs_extension
@pytest.mark.parametrize("b,c,p", [(7, 9, 20), (5, 20, 6)])
def test_ci_emulation_chunks(b, c, p):
    """Chunks of 1, 3 (uneven) and all images give the same CI (to twice the bar: the chunk's
    ATen products may take other BLAS kernels)."""
    a = _rows("random", b, c, p, seed=b)
    whole = ci_cuda.channel_independence_emulation(a)
    for chunk in (1, 3):
        _assert_bar(ci_cuda.channel_independence_emulation(a, chunk=chunk), a, whole, results=2)


@needs_extension
def test_emulation_ops_reject_bad_input():
    with pytest.raises(ValueError, match="CPU tensor"):
        ci_cuda.channel_independence_emulation(torch.ones(1, 2, 3, device="meta"))
    with pytest.raises(ValueError, match="3 dimensions"):
        ci_cuda.small_side_gram_emulation(torch.ones(2, 3))
    with pytest.raises(TypeError, match="float"):
        ci_cuda.channel_independence_emulation(torch.ones(1, 2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        torch.ops.pccfast.channel_independence_emulation(torch.ones(0, 2, 3))
    gram = symmetric_matrix("gram", 5, 1)[None].repeat(2, 1, 1)
    bad = torch.randn(2, 5, 7, dtype=torch.float64)
    bad[1, 2, 3] = math.nan
    with pytest.raises(ValueError, match="did not converge"):
        ci_cuda.channel_independence_emulation(bad)
    assert ci_cuda.jacobi_eigh_emulation(gram)[2].min() >= 0


@needs_extension
def test_cuda_build_registers_kernels():
    """A CUDA build carries the CUDA kernels even where no GPU runs them (the build check)."""
    if not _C.has_cuda_kernels():
        pytest.skip("pccfast._C was built without CUDA kernels")
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("pccfast::channel_independence", "CUDA")
    assert has("pccfast::batched_eigh", "CUDA")
    assert has("pccfast::small_side_gram", "CUDA")
    assert ci_cuda.has_cuda_ops()
    with pytest.raises(ValueError, match="CUDA tensor"):
        ci_cuda.batched_eigh(torch.eye(3, dtype=torch.float64)[None])


@needs_extension
def test_gpu_benchmark_dry_run(capsys, monkeypatch):
    """benchmarks/gpu/bench_ci.py runs end to end on the CPU stand-ins (it cannot rot unseen)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "bench_ci.py"
    spec = importlib.util.spec_from_file_location("bench_ci", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_ci", bench)
    spec.loader.exec_module(bench)
    assert bench.main(["--dry-run", "--skip", "resnet"]) == 0
    out = capsys.readouterr().out
    assert "| **all layers** |" in out and "Batched symmetric eigensolver" in out
    # The first table's rows end with the two errors against the brute force.
    rows = [row.split("|")[1:-1] for row in out.splitlines() if row.startswith("| tiny")]
    errors = [float(cells[-1]) for cells in rows if len(cells) == 12]
    errors += [float(cells[-2]) for cells in rows if len(cells) == 12]
    assert len(errors) == 6 and max(errors) <= 1e-7


# ---- GPU ------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("kind", KINDS)
def test_batched_eigh_matches_torch(kind):
    # From 139 on (H100/H200) part of the storage, from 239 on part of A, is in global memory.
    for n in [1, 2, 3, 5, 16, 31, 32, 33, 64, 97, 138, 139, 196, 238, 239, 256, 300, 512]:
        count = 3 if n <= 256 else 1
        gram = torch.stack([symmetric_matrix(kind, n, seed) for seed in range(count)]).cuda()
        values, vectors = ci_cuda.batched_eigh(gram)
        assert values.is_cuda and vectors.is_cuda
        check_eigh(gram, values, vectors)
        if kind in ("degenerate", "gram"):
            check_projectors(gram.cpu(), values, vectors)


@needs_gpu
@pytest.mark.parametrize("n", [1, 4, 17, 37, 64, 100, 250])
def test_batched_eigh_equals_host_emulation(n):
    """Every product-sum in kernels/jacobi_eigh.cuh is an explicit fma and CUDA's float64
    division and square root are IEEE-rounded, so the kernel performs the host's operations:
    equal bits (the host side is bit-stable from -O0 to -O3 -march=native -ffp-contract=fast).
    Only the order of the norm sums differs, which could move the stopping sweep and no more."""
    gram = torch.stack([symmetric_matrix(k, n, 7) for k in KINDS])
    ref_values, ref_vectors, _ = ci_cuda.jacobi_eigh_emulation(gram)
    values, vectors = ci_cuda.batched_eigh(gram.cuda())
    assert torch.equal(values.cpu(), ref_values)
    assert torch.equal(vectors.cpu(), ref_vectors)


@needs_gpu
def test_batched_eigh_raises_on_non_finite():
    gram = symmetric_matrix("gram", 8, 1)[None].repeat(2, 1, 1).cuda()
    gram[1, 2, 1] = math.nan
    with pytest.raises(ValueError, match="did not converge"):
        ci_cuda.batched_eigh(gram)


@needs_gpu
@pytest.mark.parametrize("b,c,p", GRAM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_gram_kernel_equals_host_emulation(b, c, p, dtype):
    a = _rows("random", b, c, p, seed=c * 7 + p).to(dtype)
    expected = ci_cuda.small_side_gram_emulation(a)
    for name, view in _strided_views(a.cuda()).items():
        got = ci_cuda.small_side_gram(view)
        if name == "batch stride 0":
            assert torch.equal(got.cpu(), ci_cuda.small_side_gram_emulation(view.cpu())), name
        else:
            assert torch.equal(got.cpu(), expected), name


CUDA_SHAPES = [
    (3, 7, 30),  # C <= P
    (2, 64, 64),
    (2, 33, 100),
    (3, 40, 9),  # P < C
    (2, 130, 50),
    (1, 1, 5),
    (2, 6, 1),
]


def _cuda_ci(rows):
    return torch.ops.pccfast.channel_independence(rows)


@needs_gpu
@pytest.mark.parametrize("b,c,p", CUDA_SHAPES)
@pytest.mark.parametrize("kind", ["random", "low_rank"])
def test_cuda_ci_matches_emulation_reference_and_bruteforce(b, c, p, kind):
    a = _rows(kind, b, c, p, seed=c + 7 * p)
    got = _cuda_ci(a.cuda())
    assert got.dtype == torch.float64 and got.shape == (b, c) and got.is_cuda
    _assert_bar(got, a)
    _assert_bar(got, a, expected=ci_fast(a), results=2)
    # Same Gram, eigenvectors and weights bit for bit; the quadrature's ATen reductions may
    # differ in order between devices.
    emulated = ci_cuda.channel_independence_emulation(a)
    torch.testing.assert_close(got.cpu(), emulated, rtol=1e-12, atol=1e-14 * float(a.abs().max()))
    if c > 1:
        assert torch.all(got[:, 0] == 0)  # the dead channel
    assert torch.all(got >= 0)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,c,p", [(2, 24, 36), (2, 50, 24)])
def test_cuda_ci_low_precision_and_strided_inputs(dtype, b, c, p):
    """fp16/bf16/fp32 are read as they are: CI equals the float64 CI of the rounded values."""
    a = _rows("random", b, c, p, seed=11).to(dtype)
    expected = ci_bruteforce(a.double())
    contiguous = _cuda_ci(a.cuda())
    for name, view in _strided_views(a.cuda()).items():
        got = _cuda_ci(view)
        if name == "batch stride 0":
            _assert_bar(got, view)
        else:
            _assert_bar(got, view, expected=expected)
            assert torch.equal(got, contiguous), name  # the same Gram bits in every layout


@needs_gpu
@pytest.mark.parametrize("choice", ["jacobi", "torch"])
def test_cuda_ci_eigensolver_choice(monkeypatch, choice):
    """Both eigensolvers give the same CI, also past the Jacobi size threshold (m = 280; there
    against the float64 reference, to spare 301 SVDs)."""
    monkeypatch.setenv("PCCFAST_CI_EIGH", choice)
    a = _rows("random", 2, 30, 45, seed=3)
    _assert_bar(_cuda_ci(a.cuda()), a)
    a = _rows("random", 1, 300, 280, seed=3)
    _assert_bar(_cuda_ci(a.cuda()), a, expected=ci_fast(a), results=2)


@needs_gpu
def test_cuda_ci_bad_input(monkeypatch):
    with pytest.raises(ValueError, match=r"\(B, C, P\)"):
        _cuda_ci(torch.ones(3, 4, device="cuda"))
    with pytest.raises(ValueError, match="empty"):
        _cuda_ci(torch.ones(0, 4, 5, device="cuda"))
    monkeypatch.setenv("PCCFAST_CI_EIGH", "magma")
    with pytest.raises(ValueError, match="PCCFAST_CI_EIGH"):
        _cuda_ci(torch.ones(1, 4, 5, device="cuda"))


@needs_gpu
def test_cuda_backend_through_public_api():
    import pccfast

    fmap = torch.randn(4, 16, 5, 7, device="cuda")
    got = pccfast.channel_independence(fmap, backend="cuda")
    assert got.shape == (4, 16) and got.dtype == torch.float64 and got.is_cuda
    expected = pccfast.channel_independence(fmap.cpu(), backend="torch")
    _assert_bar(got, fmap.reshape(4, 16, 35), expected=expected, results=2)
    single = pccfast.channel_independence(fmap[1], backend="cuda")
    _assert_bar(single[None], fmap[1:2].reshape(1, 16, 35), expected=expected[1:2], results=2)
