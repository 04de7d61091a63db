"""The "triton" PCC backend (pccfast/ops/pcc_triton.py).

Without a GPU: the kernels run under TRITON_INTERPRET=1 against the reference
(tests/triton_cases.py, in a fresh process: the variable must be set before triton is imported,
whatever other test files imported first), every kernel launch of the ResNet-50 shapes is
compiled for sm_90 with Triton's own ptxas (the bf16 tensor-core path the interpreter cannot
run), and the GPU benchmark script is exercised in its dry-run mode.
With a GPU: the same cases compiled, bf16 at ResNet-50 sizes, and the stage-1 pixel case whose
naive version needs 10 GB for R.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import pccfast

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BENCH = os.path.join(ROOT, "benchmarks", "gpu", "bench_pcc.py")
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pccfast.__file__)))

triton_missing = pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton is not installed"
)
_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def needs_cuda(fn):
    return pytest.mark.gpu(_no_cuda(fn))


def run_python(args, interpret: bool, extra_env=None, timeout=900):
    """Runs python with args in a fresh process using this checkout's pccfast; returns stdout."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, env.get("PYTHONPATH", "")])
    env.update(extra_env or {})
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, \
        f"{' '.join(args)} failed:\n{out.stdout[-8000:]}\n{out.stderr[-4000:]}"
    return out.stdout


# tests/triton_cases.py in two parts: the core (every option combination on every shape of
# tests/cases.py, every kernel and tile edge with shrunken blocks, autograd plumbing) and the
# extended sweep (content variants x layouts, fp16/bf16 grids, edges of the default blocks).
EXTENDED = "test_cases_ or test_option_grid_half or test_tile_edges_default_blocks"


def run_cases(interpret: bool, select: str | None = None, extra_env=None):
    args = ["-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
            os.path.join(HERE, "triton_cases.py")]
    if select:
        args += ["-k", select]
    # Compiled, the cases need ~500 kernel specialisations: compile them in parallel processes
    # (PCCFAST_TEST_WORKERS, when pytest-xdist is installed).
    workers = int(os.environ.get("PCCFAST_TEST_WORKERS", "0") or 0)
    if not interpret and workers > 1 and __import__("importlib").util.find_spec("xdist"):
        args += ["-n", str(workers)]
    stdout = run_python(args, interpret, extra_env)
    assert " passed" in stdout and "skipped" not in stdout.splitlines()[-1], stdout[-2000:]


@triton_missing
def test_kernels_against_reference_interpreted():
    """Every orientation x group x penalty x diagonal over the shapes of tests/cases.py, every
    kernel and both sides of every tile edge (shrunken blocks), channels_last and strided
    views, fp16, saved tensors, torch.compile, autocast: under TRITON_INTERPRET=1."""
    run_cases(interpret=True, select=f"not ({EXTENDED})")


@pytest.mark.slow
@triton_missing
def test_kernels_against_reference_interpreted_extended():
    """The content variants of tests/cases.py (post-ReLU, dead, constant, duplicated, 1e-3 and
    1e3 scales) x layouts in fp32 and fp16, the fp16/bf16 option grids, and the edges of the
    default blocks (63/64/65 rows and features, 511/513 features), interpreted."""
    run_cases(interpret=True, select=EXTENDED)


@triton_missing
def test_kernels_compile_for_sm90():
    """Every launch that forward + backward make at ResNet-50 shapes (bf16: the tensor-core dots
    the interpreter replaces) compiles for sm_90; needs no GPU."""
    stdout = run_python([BENCH, "--compile-report", "--shapes",
                         "64x56,2048x7,512x7,1024x32,64x112"],
                        interpret=False)
    kernels = {line.split("|")[2].strip() for line in stdout.splitlines()[2:]
               if line.startswith("|")}
    assert kernels >= {"_pcc_stats_kernel", "_pcc_tile_kernel", "_pcc_bwd_rows_kernel",
                       "_pcc_bwd_small_m_kernel", "_pcc_bwd_square_features_kernel",
                       "_pcc_batch_gram_kernel", "_pcc_batch_apply_kernel"}, stdout
    assert "FAILED" not in stdout
    # What only a launch would find: shared memory beyond an H100's 227 KiB per block ("out of
    # resource" at the first call). ptxas caps registers at 255 by spilling: the rows kernel
    # spills 4-80 B at BLOCK_KC=512 (triton 3.6 and 3.8); more would mean a tuning regression.
    for line in stdout.splitlines()[2:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 8:
            assert int(cells[6]) <= 128 and int(cells[7]) <= 227 * 1024, line


@pytest.mark.slow
@triton_missing
def test_kernels_compile_for_sm90_fp32_all_shapes():
    stdout = run_python([BENCH, "--compile-report", "--all-shapes", "--dtype", "float32"],
                        interpret=False)
    assert "FAILED" not in stdout and "_pcc_tile_kernel" in stdout


@triton_missing
def test_gpu_benchmark_dry_run():
    stdout = run_python([BENCH, "--dry-run"], interpret=True)
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| case |") and len(lines) == 1 + 2 * 2 * 2, stdout
    for line in lines[1:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert float(cells[2]) > 0 and float(cells[3]) > 0 and cells[5].endswith("x"), line


@triton_missing
def test_triton_op_decomposes_for_torch_compile():
    """The host code of both ops traces under AOTAutograd's functional mode on fake CUDA
    tensors (what torch.compile does on a GPU): every kernel becomes a
    triton_kernel_wrapper_functional node. Needs no GPU; not under the interpreter, whose
    kernels cannot be traced (the ops are opaque custom ops there)."""
    import logging

    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pccfast.ops import pcc_triton
    from pccfast.ops.pcc_options import PCCOptions

    if pcc_triton.INTERPRET:
        pytest.skip("kernels are interpreted in this process")
    from cases import PCC_OPTION_GRID

    mode = FakeTensorMode()
    try:
        with mode:
            torch.empty(1, device="cuda")
    except Exception as exc:  # a CPU-only torch build
        pytest.skip(f"no fake CUDA tensors: {exc}")
    wrap_log = logging.getLogger("torch._higher_order_ops.triton_kernel_wrap")
    level = wrap_log.level
    wrap_log.setLevel(logging.ERROR)  # without a driver the mutation analysis falls back loudly
    try:
        for options, dtype in zip(PCC_OPTION_GRID[::3], (torch.bfloat16, torch.float32) * 4):
            o = PCCOptions(**options)
            args = (o.orientation, o.group, o.penalty, o.include_diagonal, o.eps)

            def both(x):
                s, m, r = torch.ops.pccfast.pcc_triton_forward(x, *args)
                return s, torch.ops.pccfast.pcc_triton_backward(s, x, m, r, *args)

            graphs = []
            fn = aot_function(both, fw_compiler=lambda gm, _: graphs.append(gm.code) or gm)
            with mode:
                x = torch.empty(3, 40, 7, 5, device="cuda", dtype=dtype)
                s, dx = fn(x.contiguous(memory_format=torch.channels_last))
            assert s.shape == () and dx.shape == x.shape and dx.dtype == dtype
            assert graphs[0].count("triton_kernel_wrapper_functional") >= 3, (options, graphs[0])
            assert "pccfast.pcc_triton" not in graphs[0]  # decomposed into its kernels
    finally:
        wrap_log.setLevel(level)


@triton_missing
def test_cpu_tensor_needs_cuda_or_the_interpreter():
    from pccfast.ops import pcc_triton
    from pccfast.ops.pcc_options import PCCOptions

    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match='float64 runs on the "torch" and "cpu" backends'):
        pcc_triton.pcc_triton(x, PCCOptions())
    if not pcc_triton.INTERPRET:
        with pytest.raises(ValueError, match="CUDA tensor"):
            pcc_triton.pcc_triton(x.float(), PCCOptions())


# ---- on a GPU ----


@needs_cuda
@triton_missing
def test_kernels_against_reference_on_gpu():
    """tests/triton_cases.py compiled on the GPU (bf16 through the tensor cores; inductor)."""
    run_cases(interpret=False, extra_env={"PCCFAST_TRITON_DEVICE": "cuda"})


@needs_cuda
@triton_missing
@pytest.mark.parametrize("c,h", [(64, 56), (256, 14), (512, 7), (128, 28), (64, 112)])
@pytest.mark.parametrize("orientation,penalty", [("channel", "abs"), ("channel", "square"),
                                                 ("pixel", "abs"), ("pixel", "square")])
def test_bf16_resnet_shapes(c, h, orientation, penalty):
    g = torch.Generator(device="cuda").manual_seed(c + h)
    x = torch.randn(4, c, h, h, device="cuda", generator=g).relu().bfloat16()
    x = x.contiguous(memory_format=torch.channels_last) if c % 128 == 0 else x
    xr = x.detach().clone().requires_grad_(True)
    xt = x.detach().clone().requires_grad_(True)
    opts = dict(orientation=orientation, penalty=penalty)
    want = pccfast.pcc(xr, backend="torch", **opts)
    got = pccfast.pcc(xt, backend="triton", **opts)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-5)
    (gw,) = torch.autograd.grad(want, xr)
    (gt,) = torch.autograd.grad(got, xt)
    err = (gt.float() - gw.float()).norm() / gw.float().norm()
    assert err < 2e-2, float(err)


@needs_cuda
@triton_missing
@pytest.mark.parametrize("c", [64, 256])
def test_pixel_stage1_batch256_fits(c):
    """ResNet-50 stage 1 at batch 256, pixel rows: the naive R is 256 x 3136 x 3136 floats
    (10 GB, more for its autograd); the fused kernels need dx and (G, M) statistics only."""
    from pccfast.ops.pcc_reference import pcc_reference
    from pccfast.ops.pcc_options import PCCOptions

    g = torch.Generator(device="cuda").manual_seed(c)
    x = torch.randn(256, c, 56, 56, device="cuda", generator=g).relu().bfloat16()
    x.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    s = pccfast.pcc(x, orientation="pixel", backend="triton")
    s.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    nbytes = x.numel() * x.element_size()
    assert extra < 1.5 * nbytes, (extra, nbytes)  # dx (1x) plus small temporaries
    # The score is the mean over samples: the reference on chunks of 8 samples agrees.
    opts = PCCOptions(orientation="pixel")
    with torch.no_grad():
        want = torch.stack([pcc_reference(x[i:i + 8], opts) for i in range(0, 256, 8)]).mean()
    torch.testing.assert_close(s.detach(), want, rtol=1e-2, atol=1e-5)
    # dx of the first samples: the fused gradient of the full batch is 8/256 of the chunk's.
    xc = x[:8].detach().clone().requires_grad_(True)
    (gc,) = torch.autograd.grad(pcc_reference(xc, opts), xc)
    err = (x.grad[:8].float() * 32 - gc.float()).norm() / gc.float().norm()
    assert err < 2e-2, float(err)


@needs_cuda
@triton_missing
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensor_on_another_device_than_the_current_one():
    torch.cuda.set_device(0)
    x = torch.randn(3, 20, 9, 9, device="cuda:1").requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    got = pccfast.pcc(x, backend="triton")
    want = pccfast.pcc(xr, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-7)
    assert torch.cuda.current_device() == 0


def test_device_guard_only_for_a_foreign_cuda_device():
    pytest.importorskip("triton")
    from pccfast.ops import pcc_triton

    assert isinstance(pcc_triton._on_device_of(torch.ones(1)), type(contextlib.nullcontext()))
