"""CI: the properties of SPEC section 2, and every backend against the brute-force definition."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch

import pccfast
from pccfast.ops import _C
from pccfast.ops.ci_reference import ci_bruteforce, ci_fast

from cases import CI_KINDS, CI_SHAPES, assert_within, ci_maps, ci_tolerance, cifar10_copy

needs_ext = pytest.mark.skipif(_C.extension() is None, reason=str(_C.unavailable_reason()))
CPU_BACKENDS = ["torch"] + (["cpu"] if _C.extension() is not None else [])


def nuclear_norm(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(a).sum(-1)


def as_maps(rows: torch.Tensor, width: int = 1) -> torch.Tensor:
    """(N, C, P) -> (N, C, P / width, width), the 4-d layout the public function takes."""
    n, c, p = rows.shape
    return rows.reshape(n, c, p // width, width)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", CI_KINDS)
@pytest.mark.parametrize("shape", CI_SHAPES, ids=str)
def test_accuracy_bar_against_bruteforce(backend, kind, shape):
    c, p = shape
    rows = ci_maps(seed=100 * CI_KINDS.index(kind) + CI_SHAPES.index(shape), n=3, c=c, p=p,
                   kind=kind)
    got = pccfast.channel_independence(as_maps(rows), backend=backend)
    want = ci_bruteforce(rows)
    assert got.dtype == torch.float64 and got.shape == (3, c)
    assert_within(got, want, ci_tolerance(rows))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_properties(backend):
    rows = ci_maps(seed=7, n=2, c=12, p=30, kind="mixed")
    ci = pccfast.channel_independence(as_maps(rows), backend=backend)
    norms = rows.norm(dim=-1)
    assert (ci >= 0).all()
    assert (ci <= norms + ci_tolerance(rows)).all()  # 0 <= CI_c <= ||a_c||, to the SPEC bar
    assert (ci[:, 0] == 0).all()  # a dead channel has CI exactly 0

    # Channel permutation permutes the scores; pixel permutation changes nothing. Both change
    # the rounding of the Gram matrix, so the two results agree to twice the bar, no closer.
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    ci_perm = pccfast.channel_independence(as_maps(rows[:, perm]), backend=backend)
    assert_within(ci_perm, ci[:, perm], ci_tolerance(rows, results=2))
    pix = torch.randperm(30, generator=torch.Generator().manual_seed(2))
    ci_pix = pccfast.channel_independence(as_maps(rows[:, :, pix]), backend=backend)
    assert_within(ci_pix, ci, ci_tolerance(rows, results=2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("c,p", [(5, 5), (4, 9), (1, 3)])
def test_orthogonal_rows_score_their_norm(backend, c, p):
    q, _ = torch.linalg.qr(torch.randn(p, p, dtype=torch.float64))
    scales = torch.rand(c, dtype=torch.float64) * 10 + 0.1
    rows = (q[:c] * scales[:, None]).unsqueeze(0)
    ci = pccfast.channel_independence(as_maps(rows), backend=backend)
    # Far inside the bar: the Gram matrix is diagonal to rounding, whose first-order effect on
    # each CI is relative (p * eps), so what is left is the quadrature's error, about
    # exp(-pi^2 / QUADRATURE_STEP) ~ 6e-13 relative (ci_reference), on any host.
    torch.testing.assert_close(ci[0], scales, rtol=1e-9, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_scale_equivariance(backend, scale):
    rows = ci_maps(seed=3, n=2, c=9, p=14, kind="relu")
    base = pccfast.channel_independence(as_maps(rows), backend=backend)
    scaled = pccfast.channel_independence(as_maps(rows * scale), backend=backend)
    assert_within(scaled, base * scale, ci_tolerance(rows * scale, results=2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale", [1e-160, 2.0**-1000, 1e150, 1e300])
def test_extreme_float64_magnitudes(backend, scale):
    """Gram entries of such maps would underflow to subnormals or overflow (LAPACK then fails
    or returns NaN): the scores still scale with the map, per image, with dead channels."""
    rows = ci_maps(seed=4, n=3, c=7, p=10, kind="dead")
    base = pccfast.channel_independence(as_maps(rows), backend=backend)
    assert base.abs().sum() > 0
    factors = torch.tensor([1.0, scale, 1.0], dtype=torch.float64)
    scaled = pccfast.channel_independence(as_maps(rows * factors.view(3, 1, 1)), backend=backend)
    assert torch.isfinite(scaled).all()
    assert_within(scaled, base * factors.view(3, 1),
                  ci_tolerance(rows, results=2) * factors.view(3, 1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_any_float_input_gives_float64(backend, dtype):
    x = torch.randn(2, 6, 3, 5).relu().to(dtype)
    got = pccfast.channel_independence(x, backend=backend)
    want = ci_bruteforce(x.reshape(2, 6, 15).double())
    assert got.dtype == torch.float64
    assert_within(got, want, ci_tolerance(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_single_map_and_strided_input(backend):
    x = torch.randn(4, 8, 6, 6).relu()
    batch = pccfast.channel_independence(x, backend=backend)
    single = pccfast.channel_independence(x[2], backend=backend)
    assert single.shape == (8,)
    # Another batch size or layout may take another BLAS kernel for the Gram matrix.
    assert_within(single, batch[2], ci_tolerance(x[2:3], results=2)[0])
    cl = x.contiguous(memory_format=torch.channels_last)
    assert_within(pccfast.channel_independence(cl, backend=backend), batch,
                  ci_tolerance(x, results=2))
    strided = torch.randn(4, 8, 6, 12).relu()[..., ::2]
    want = ci_bruteforce(strided.reshape(4, 8, 36).double())
    assert_within(pccfast.channel_independence(strided, backend=backend), want,
                  ci_tolerance(strided))


@needs_ext
def test_cpu_backend_matches_reference_on_many_images():
    """Enough images for the compiled kernel to split into chunks and threads."""
    rows = ci_maps(seed=11, n=70, c=40, p=24, kind="mixed")
    got = pccfast.channel_independence(as_maps(rows), backend="cpu")
    assert_within(got, ci_fast(rows), ci_tolerance(rows, results=2))


def test_bruteforce_method_is_the_definition():
    rows = ci_maps(seed=5, n=1, c=4, p=7)
    a = rows[0]
    want = torch.stack(
        [nuclear_norm(a) - nuclear_norm(torch.cat([a[:c], torch.zeros_like(a[c:c + 1]), a[c + 1:]]))
         for c in range(4)]
    )
    torch.testing.assert_close(
        pccfast.channel_independence(as_maps(rows), method="bruteforce")[0], want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dead_channels_score_exactly_zero_and_tie_to_the_lower_index(backend):
    """Exactly-zero rows among live ones: the fast paths' rounding noise on them is snapped to 0
    (below m * eps * ||A||_F), so the dead channels tie and pruning keeps the lowest of them."""
    from pccfast.prune.plan import kept_indices

    rows = ci_maps(seed=21, n=4, c=16, p=64, kind="relu")
    dead = [3, 7, 12]
    rows[:, dead] = 0.0
    rows[:, 9] *= 1e-6  # tiny but alive: far above the threshold, not snapped
    ci = pccfast.channel_independence(as_maps(rows, 8), backend=backend)
    live = [c for c in range(16) if c not in dead]
    assert (ci[:, dead] == 0).all(), ci[:, dead]
    assert (ci[:, live] > 0).all()
    assert (ci[:, 9] > 1e3 * pccfast.ci.snap_threshold(rows)).all()
    assert kept_indices(ci.mean(0), len(live) + 1) == sorted(live + [3])
    assert kept_indices(ci.mean(0), len(live) + 2) == sorted(live + [3, 7])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["fast", "bruteforce"])
def test_scores_are_detached(backend, method):
    """CI is a score, not a training signal: no gradient on any backend (the compiled op has
    no autograd formula, so a requires_grad result would be a gradient that is not there)."""
    if method == "bruteforce" and backend != "torch":
        pytest.skip("bruteforce runs on the torch backend")
    x = torch.randn(2, 5, 3, 4).relu().requires_grad_(True)
    ci = pccfast.channel_independence(x, backend=backend, method=method)
    assert not ci.requires_grad and ci.grad_fn is None
    assert not pccfast.channel_independence(x[0], backend=backend, method=method).requires_grad


CIFAR = cifar10_copy()


def _cifar_images(count: int) -> torch.Tensor:
    """The first `count` test images (shuffled classes), (count, 3, 32, 32) in [0, 1]."""
    from PIL import Image

    data = np.load(CIFAR)
    jpeg, offsets = data["test_jpeg"], data["test_offsets"]
    order = np.random.default_rng(0).permutation(len(offsets) - 1)[:count]
    images = [
        np.asarray(Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
        for i in order
    ]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


@pytest.mark.skipif(not os.path.exists(CIFAR), reason=f"real-image check needs {CIFAR}")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_real_image_feature_maps_against_bruteforce(backend):
    """Feature maps of real CIFAR-10 images through a conv + BN + ReLU + pool stack."""
    torch.manual_seed(0)
    images = _cifar_images(6)
    stem = torch.nn.Sequential(
        torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.BatchNorm2d(24), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(24, 48, 3, padding=1), torch.nn.ReLU(),
        torch.nn.MaxPool2d(4),
    )
    with torch.no_grad():
        shallow = stem[:4](images)  # (6, 24, 16, 16): C < P
        deep = stem(images)  # (6, 48, 4, 4): P < C
    for fmap in (shallow, deep):
        n, c, h, w = fmap.shape
        rows = fmap.reshape(n, c, h * w).double()
        got = pccfast.channel_independence(fmap, backend=backend)
        assert_within(got, ci_bruteforce(rows), ci_tolerance(rows))
