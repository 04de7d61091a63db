"""Bad input gets a ValueError/TypeError that names the argument, on every public entry point."""

from __future__ import annotations

import os

import pytest
import torch

import pccfast
from pccfast.ops import _C
from pccfast.pipeline.config import CISection, DataSection, PruneSection, RunSection
from pccfast.study import StudyConfig
from pccfast.train.config import TrainConfig

BACKENDS = ["torch"] + (["cpu"] if _C.extension() is not None else [])
GOOD = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (GOOD.numpy(), {}, TypeError, "x must be a torch.Tensor"),
        (GOOD.long(), {}, TypeError, "x must be float"),
        (GOOD[0], {}, ValueError, r"x must have shape \(N, C, H, W\)"),
        (torch.randn(2, 0, 4, 4), {}, ValueError, "empty dimension"),
        (torch.randn(2, 1, 4, 4), {}, ValueError, "single channel"),
        (torch.randn(2, 3, 1, 1), dict(orientation="pixel"), ValueError, "single pixel"),
        (GOOD, dict(orientation="rows"), ValueError, "orientation must be one of"),
        (GOOD, dict(group="image"), ValueError, "group must be one of"),
        (GOOD, dict(penalty="l1"), ValueError, "penalty must be one of"),
        (GOOD, dict(orientation="pixel", group="batch"), ValueError, 'group="batch" needs'),
        (GOOD, dict(eps=0.0), ValueError, "eps must be a positive"),
        (GOOD, dict(eps=float("nan")), ValueError, "eps must be a positive"),
        (GOOD, dict(eps="small"), TypeError, "eps must be a float"),
        (GOOD, dict(include_diagonal=1), TypeError, "include_diagonal must be a bool"),
        # eps must be a normal number of the compute dtype (fp32 here): 5e-324 underflows to 0
        # in fp32, 1e-45 is subnormal, 1e300 rounds to inf
        (GOOD, dict(eps=5e-324), ValueError, "eps must be a normal positive float32"),
        (GOOD, dict(eps=1e-45), ValueError, "eps must be a normal positive float32"),
        (GOOD, dict(eps=1e300), ValueError, "eps must be a normal positive float32"),
        (GOOD.double(), dict(eps=5e-324), ValueError, "eps must be a normal positive float64"),
    ],
)
def test_pcc_bad_input(backend, x, kwargs, error, match):
    with pytest.raises(error, match=match):
        pccfast.pcc(x, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_pcc_nonfinite_input(backend, value):
    x = torch.randn(2, 3, 4, 4)
    x[1, 2, 3, 0] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        pccfast.pcc(x, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_at_the_bottom_of_the_normal_range(backend):
    """The smallest normal eps is accepted (fp64 takes far smaller ones than fp32), and a
    constant channel still gets vhat = 0 and a zero, not NaN, gradient (the reference divides
    by sqrt(var + eps): the derivative of rsqrt, rsqrt^3, would overflow to inf * 0)."""
    for dtype, eps in ((torch.float32, torch.finfo(torch.float32).tiny), (torch.float32, 1e-30),
                       (torch.float64, 1e-300)):
        x = torch.randn(2, 3, 4, 4, dtype=dtype)
        x[:, 1] = 0.75
        x.requires_grad_(True)
        s = pccfast.pcc(x, eps=eps, backend=backend)
        (g,) = torch.autograd.grad(s, x)
        assert torch.isfinite(s) and torch.isfinite(g).all(), (dtype, eps)
        assert (g[:, 1] == 0).all() and g.abs().max() > 0
        # eps this small is negligible next to the other rows' variance: the eps -> 0 limit
        want = pccfast.pcc(x.detach().double(), eps=1e-300, backend="torch")
        assert s.item() == pytest.approx(want.item(), rel=1e-5)


def test_single_row_allowed_with_diagonal():
    s = pccfast.pcc(torch.randn(2, 1, 4, 4), include_diagonal=True)
    assert torch.isfinite(s)


def test_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match="backend must be one of"):
        pccfast.pcc(GOOD, backend="gpu")
    with pytest.raises(ValueError, match='backend "cuda" is not implemented for pcc'):
        pccfast.pcc(GOOD, backend="cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match='backend "triton" is unavailable for pcc: .*CUDA'):
            pccfast.pcc(GOOD, backend="triton")
    with pytest.raises(ValueError, match='backend "triton" is not implemented for ci'):
        pccfast.channel_independence(GOOD, backend="triton")
    with pytest.raises(ValueError, match='backend "cuda" is unavailable for ci'):
        pccfast.channel_independence(GOOD, backend="cuda")


@pytest.mark.parametrize(
    "fmap, kwargs, error, match",
    [
        ([[1.0]], {}, TypeError, "fmap must be a torch.Tensor"),
        (torch.ones(3, 4, 4, dtype=torch.int32), {}, TypeError, "fmap must be float"),
        (torch.randn(3, 4), {}, ValueError, r"fmap must have shape \(C, H, W\) or \(N, C, H, W\)"),
        (torch.randn(2, 3, 0, 4), {}, ValueError, "empty dimension"),
        (GOOD, dict(method="svd"), ValueError, "method must be one of"),
        (GOOD, dict(backend="tpu"), ValueError, "backend must be one of"),
    ],
)
def test_ci_bad_input(fmap, kwargs, error, match):
    with pytest.raises(error, match=match):
        pccfast.channel_independence(fmap, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ci_nonfinite_input(backend):
    x = torch.randn(2, 3, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="fmap contains NaN or Inf"):
        pccfast.channel_independence(x, backend=backend)


def test_pcc_matrix_bad_input():
    with pytest.raises(ValueError, match="x must have shape"):
        pccfast.pcc_matrix(torch.randn(3, 4, 4))
    with pytest.raises(TypeError, match="x must be float"):
        pccfast.pcc_matrix(torch.ones(1, 2, 2, 2, dtype=torch.int64))


def test_loss_module_checks_at_construction():
    with pytest.raises(ValueError, match="penalty"):
        pccfast.PCCLoss(penalty="huber")
    with pytest.raises(ValueError, match="backend"):
        pccfast.PCCLoss(backend="npu")


def test_auto_keeps_fp64_off_the_fp32_triton_kernels():
    from pccfast.ops import backends

    cuda = torch.device("cuda")
    if backends.triton_unavailable_reason(cuda) is None:
        assert backends.resolve("pcc", "auto", cuda, torch.float64) == "torch"
        assert backends.resolve("pcc", "auto", cuda, torch.bfloat16) == "triton"
    assert backends.resolve("pcc", "auto", torch.device("cpu"), torch.float64) in ("cpu", "torch")


@pytest.mark.parametrize(
    "triton_version, numpy_version, broken",
    [("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False), ("3.7.1", "2.4.1", False),
     ("3.10.0", "2.5.0", False)],
)
def test_old_interpreter_with_new_numpy_is_named(monkeypatch, triton_version, numpy_version,
                                                 broken):
    """Triton's interpreter before 3.7 fails inside every kernel under NumPy 2.4: say it first."""
    pytest.importorskip("triton")
    import numpy
    import triton

    from pccfast.ops import backends

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # decided once at import (a first call may be traced by torch.compile): decide again
    monkeypatch.setattr(backends, "_INTERPRETER_PROBLEM", backends._interpreter_problem())
    reason = backends.triton_unavailable_reason(torch.device("cpu"))
    if broken:
        assert "numpy<2.4" in reason and triton_version in reason
        with pytest.raises(ValueError, match="numpy<2.4"):
            pccfast.pcc(torch.randn(2, 3, 4, 4), backend="triton")
    else:
        assert reason is None


@pytest.mark.parametrize(
    "arch, capability, runs",
    [("9.0", (9, 0), True), ("9.0", (8, 0), False), ("9.0", (10, 0), False),
     ("9.0+PTX", (10, 0), True), ("9.0+PTX", (8, 6), False), ("8.0", (8, 6), True),
     ("8.6", (8, 0), False), ("8.0;9.0", (9, 0), True), ("9.0a", (9, 0), True),
     ("7.5 8.0+PTX", (12, 0), True), ("", (9, 0), False)],
)
def test_cuda_build_arch_against_the_gpu(arch, capability, runs):
    """Machine code runs on its major with an equal or newer minor; PTX on anything newer."""
    from pccfast.ops.backends import arch_runs_on

    assert arch_runs_on(arch, capability) is runs


def _study_with_feature_images(value):
    StudyConfig.from_dict({"study": {"seeds": [0], "criteria": ["ci"], "targets": [0.5],
                                     "feature_images": value},
                           "prune": {"bn_images": 8}, "arms": {"a": {}}})


CONFIG_INTEGERS = [  # (build with the value, value, error, the whole message)
    (lambda v: DataSection(train_limit=v), 0, ValueError,
     "data.train_limit must be a positive integer or unset, got 0"),
    (lambda v: DataSection(workers=v), 1.5, ValueError,
     "data.workers must be a non-negative integer, got 1.5"),
    (lambda v: RunSection(seed=v), True, ValueError,
     "run.seed must be a non-negative integer, got True"),
    (lambda v: CISection(images=v), 0, ValueError, "ci.images must be a positive integer, got 0"),
    (lambda v: CISection(batch_size=v), "8", ValueError,
     "ci.batch_size must be a positive integer, got '8'"),
    (lambda v: PruneSection(bn_images=v), -1, ValueError,
     "prune.bn_images must be a non-negative integer, got -1"),
    (_study_with_feature_images, None, ValueError,
     "study.feature_images must be a non-negative integer, got None"),
    (lambda v: TrainConfig(epochs=v), -3, ValueError, "epochs must be >= 0, got -3"),
    (lambda v: TrainConfig(eval_every=v), 2.0, TypeError,
     "eval_every must be an integer, got float 2.0"),
    (lambda v: TrainConfig(seed=v), False, TypeError, "seed must be an integer, got bool False"),
]


@pytest.mark.parametrize("build, value, error, message", CONFIG_INTEGERS,
                         ids=[case[-1].split(" must")[0] for case in CONFIG_INTEGERS])
def test_config_integer_messages(build, value, error, message):
    """Every config module's integer fields go through one check (pccfast._checks.check_int);
    each keeps the exact message its users and tests know."""
    with pytest.raises(error) as info:
        build(value)
    assert str(info.value) == message
