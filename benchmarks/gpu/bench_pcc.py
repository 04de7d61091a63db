"""PCC forward+backward on the GPU: fused Triton kernels vs the eager reference vs
``torch.compile`` of the reference, at the ResNet-50 batch-256 bf16 shapes (SPEC section 6).

Prints one markdown table: time per forward+backward (median of CUDA-event timings), peak extra
memory (``torch.cuda.max_memory_allocated`` above what was allocated before, the input's
gradient included), bytes autograd keeps between forward and backward (the input itself not
counted), and the roofline floor ``max(bytes / bandwidth, flops / matmul rate)`` with bandwidth
and bf16 matmul rate measured on the card in the same run. Ratios are against the fused kernels.

Baselines whose R alone (G*M*M fp32) would exceed the card's memory are not attempted ("OOM
(R = ... GB)"); the others report "OOM" when they fail to allocate. "score diff" is the relative
difference of the fused score from the eager one (a sanity check of the timed kernels).

Floor model (per forward+backward; G groups of M rows with K features, x of B bytes):
    bytes = 3 B                      (read x in forward and backward, write dx)
    flops = 4 G M^2 K                (R once, symmetric, in forward; R again and D @ Vhat in
                                      backward)
            4 G M K^2                ("square" through the K x K feature Gram, when 2K <= M)

Modes:
    (default)         the timings; needs CUDA
    --compile-report  no GPU needed: compiles every kernel launch of the chosen shapes for sm_90
                      with Triton's own ptxas and prints registers, spills and shared memory
    --dry-run         the timing logic on tiny shapes on the CPU under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

BATCH = 256
# (C, H) of the distinct scored (post-ReLU conv) outputs of ResNet-50 at 224x224 input.
RESNET50_SHAPES = [
    (64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7),
    (2048, 7),
]
# A default subset that keeps the run (one torch.compile per case) to a few minutes.
DEFAULT_SHAPES = {
    "channel": [(64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7)],
    "pixel": [(64, 112), (64, 56), (256, 56), (512, 28), (2048, 7)],
}
PENALTIES = ("abs", "square")
DRY_RUN_SHAPES = [(5, 6), (3, 4)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on the CPU under TRITON_INTERPRET=1 (checks the script)")
    p.add_argument("--compile-report", action="store_true",
                   help="compile the kernels for sm_90 without a GPU; print registers/spills")
    p.add_argument("--all-shapes", action="store_true",
                   help="every distinct ResNet-50 shape for both orientations")
    p.add_argument("--shapes", default=None,
                   help='comma-separated CxH list, e.g. "64x112,2048x7" (both orientations)')
    p.add_argument("--orientations", default="channel,pixel")
    p.add_argument("--penalties", default="abs,square")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-compile", action="store_true", help="no torch.compile baseline")
    p.add_argument("--skip-eager", action="store_true", help="no eager baseline")
    return p.parse_args(argv)


def shape_list(args, orientation):
    if args.dry_run:
        return DRY_RUN_SHAPES
    if args.shapes:
        return [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.all_shapes:
        return RESNET50_SHAPES
    return DEFAULT_SHAPES[orientation]


def configs(args):
    for orientation in args.orientations.split(","):
        for c, h in shape_list(args, orientation):
            for penalty in args.penalties.split(","):
                yield orientation, penalty, c, h


# ---------------------------------------------------------------------------------------------
# Floor model
# ---------------------------------------------------------------------------------------------


def floor_work(n, c, h, itemsize, orientation, penalty, group="sample"):
    """(bytes, flops) that any implementation of forward+backward must move / do."""
    import pccfast.ops.pcc_triton as pt
    from pccfast.ops.pcc_options import PCCOptions, pcc_shape

    opts = PCCOptions(orientation=orientation, group=group, penalty=penalty)
    s = pcc_shape((n, c, h, h), opts)
    nbytes = 3 * n * c * h * h * itemsize
    if pt.uses_feature_gram(s.rows, s.features, opts):
        flops = 4 * s.groups * s.rows * s.features**2
    else:
        flops = 4 * s.groups * s.rows**2 * s.features
    return nbytes, flops


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, reps, warmup=1):
    """Median wall time of fn() in ms (CUDA events on the GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def peak_extra_mb(fn, device):
    """Peak allocation above the current one while fn() runs (None on the CPU)."""
    import torch

    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def saved_mb(score_fn, x):
    """MB autograd keeps for backward, x itself not counted."""
    import torch

    total = []

    def pack(t):
        if t.data_ptr() != x.data_ptr():
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        score_fn(x)
    return sum(total) / 2**20


def measure_card(device):
    """(bytes/s of a large copy, flop/s of a large bf16 matmul) on this device."""
    import torch

    if device.type != "cuda":
        return 20e9, 100e9  # placeholders for the dry run (not measured)
    src = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=10, warmup=3)
    bandwidth = 2 * src.numel() * 4 / (ms * 1e-3)
    del src, dst
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device, reps=10, warmup=3)
    rate = 2 * n**3 / (ms * 1e-3)
    return bandwidth, rate


def run_or_reason(fn):
    """fn() or a short reason it failed (out of memory, compile error)."""
    import torch

    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"
    except RuntimeError as exc:  # CPU allocation failures and compile errors
        if "out of memory" in str(exc).lower() or "not enough memory" in str(exc).lower():
            return "OOM"
        return f"error: {str(exc).splitlines()[0][:60]}"


def bench(args):
    import torch

    import pccfast.ops.pcc_triton as pt
    from pccfast.ops.pcc_options import PCCOptions
    from pccfast.ops.pcc_reference import pcc_reference

    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = getattr(torch, args.dtype)
    batch = 2 if args.dry_run else args.batch
    reps = 1 if args.dry_run else args.reps
    bandwidth, rate = measure_card(device)
    torch._dynamo.config.cache_size_limit = 256
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(device)
    print(f"device: {name}; torch {torch.__version__}; triton {__import__('triton').__version__}")
    print(f"measured: copy bandwidth {bandwidth / 1e9:.0f} GB/s, bf16 matmul "
          f"{rate / 1e12:.0f} TFLOP/s; batch {batch}, {args.dtype}"
          f"{', channels_last' if args.channels_last else ''}\n")
    rows = []
    header = ("| case | M x K | fused ms | eager ms | compile ms | vs eager | vs compile | "
              "floor ms | fused/floor | fused peak MB | eager peak MB | compile peak MB | "
              "fused saved MB | eager saved MB | score diff |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for orientation, penalty, c, h in configs(args):
        opts = PCCOptions(orientation=orientation, penalty=penalty)
        x = torch.randn(batch, c, h, h, device=device, dtype=dtype).relu_()
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        fused = lambda t: pt.pcc_triton(t, opts)  # noqa: E731
        eager = lambda t: pcc_reference(t, opts)  # noqa: E731
        s = pt._problem(pt._source(x.detach(), opts), opts)
        r_bytes = 4 * s.groups * s.rows**2
        too_big = (device.type == "cuda"
                   and r_bytes > torch.cuda.get_device_properties(device).total_memory)
        candidates = {"fused": fused}
        if not args.skip_eager:
            candidates["eager"] = eager
        if not args.skip_compile and not args.dry_run:
            candidates["compile"] = torch.compile(eager, fullgraph=True)
        result, scores = {}, {}
        for label, fn in candidates.items():
            if label != "fused" and too_big:
                result[label] = (f"OOM (R = {r_bytes / 1e9:.0f} GB)",) * 3
                continue
            scores[label] = run_or_reason(lambda fn=fn: float(fn(x.detach())))

            def step(fn=fn):
                x.grad = None
                fn(x).backward()

            ms = run_or_reason(lambda: time_ms(step, device, reps))
            peak = (run_or_reason(lambda: peak_extra_mb(step, device))
                    if not isinstance(ms, str) else ms)
            kept = run_or_reason(lambda: saved_mb(fn, x)) if not isinstance(ms, str) else ms
            result[label] = (ms, peak, kept)
            x.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        nbytes, flops = floor_work(batch, c, h, x.element_size(), orientation, penalty)
        floor = 1e3 * max(nbytes / bandwidth, flops / rate)
        a, b = scores.get("fused"), scores.get("eager")
        diff = (f"{abs(a - b) / abs(b):.1e}"
                if isinstance(a, float) and isinstance(b, float) and b else "-")

        def cell(label, i):
            v = result.get(label, ("-",) * 3)[i]
            return v if isinstance(v, str) else ("n/a" if v is None else f"{v:,.3g}")

        def ratio(label):
            a, b = result["fused"][0], result.get(label, ("-",))[0]
            return f"{b / a:.2f}x" if not isinstance(a, str) and not isinstance(b, str) else "-"

        fused_ms = result["fused"][0]
        line = (f"| {orientation}/sample/{penalty} C={c} {h}x{h} | {s.rows} x {s.features} | "
                f"{cell('fused', 0)} | {cell('eager', 0)} | {cell('compile', 0)} | "
                f"{ratio('eager')} | {ratio('compile')} | {floor:.3g} | "
                f"{fused_ms / floor if not isinstance(fused_ms, str) else float('nan'):.2f} | "
                f"{cell('fused', 1)} | {cell('eager', 1)} | {cell('compile', 1)} | "
                f"{cell('fused', 2)} | {cell('eager', 2)} | {diff} |")
        print(line, flush=True)
        rows.append(line)
        del x
    return rows


# ---------------------------------------------------------------------------------------------
# Compile report (no GPU): every launch of the chosen shapes compiled for sm_90
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recorded_launches(pt):
    """Replaces the module's wrap_triton so launches are recorded, not run."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, grid, args, kwargs))

    saved = pt.wrap_triton
    pt.wrap_triton = Recorder
    try:
        yield launches
    finally:
        pt.wrap_triton = saved


def plan_launches(n, c, h, dtype, options):
    """The kernel launches of forward + backward on x: (n, c, h, h) (meta tensors, nothing runs)."""
    import torch

    import pccfast.ops.pcc_triton as pt
    from pccfast.ops.pcc_options import PCCOptions, pcc_shape

    opts = PCCOptions(**options)
    x = torch.empty(n, c, h, h, device="meta", dtype=dtype)
    s = pcc_shape(x.shape, opts)
    stats = torch.empty(s.groups, s.rows, device="meta")
    with recorded_launches(pt) as launches:
        pt._forward_impl(x, opts)
        pt._backward_impl(torch.ones((), device="meta"), x, stats, stats, opts)
    return launches


def _specialised(kernel, target, args, kwargs):
    """(signature, constexprs, attrs, options) as the JIT would specialise this launch
    (pointer alignment, ints equal to 1 as constants); None where triton's internals differ."""
    try:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(
            backend, dict(kwargs), bound, specialization, options
        )
        return signature, constexprs, attrs, options.__dict__
    except Exception:  # internals of another triton version: fall back to a plain signature
        return None


def _plain_signature(kernel, args, kwargs):
    """Signature without specialisation (fallback for other triton versions)."""
    import torch

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(kernel.arg_names, args))
    values.update(kwargs)
    signature, constexprs = {}, {}
    pointer = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
    for name, param in zip(kernel.arg_names, kernel.params):
        v = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = pointer[v.dtype]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    return signature, constexprs, {}, options


def compile_launch(kernel, args, kwargs, arch=90):
    """Compiles one recorded launch for CUDA sm_<arch> as the JIT would specialise it; returns
    (compiled kernel, ptxas -v lines)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    spec = _specialised(kernel, target, args, kwargs) or _plain_signature(kernel, args, kwargs)
    signature, constexprs, attrs, options = spec
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    info = []
    if os.path.exists(ptxas):
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", ptx, "-o",
                                  os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
            info = [line.strip() for line in out.stderr.splitlines()
                    if "registers" in line or "spill" in line]
    return compiled, info


def _ptxas_numbers(info):
    import re

    text = " ".join(info)
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None)


def compile_report(args):
    import torch

    dtype = getattr(torch, args.dtype)
    batch = args.batch
    seen = set()
    print("| case | kernel | grid | constexprs | warps/stages | regs | spill B | smem B |")
    print("|---|---|---|---|---|---|---|---|")
    failures = 0
    for orientation, penalty, c, h in configs(args):
        for group in (("sample", "batch") if orientation == "channel" else ("sample",)):
            options = dict(orientation=orientation, group=group, penalty=penalty)
            for kernel, grid, a, kw in plan_launches(batch, c, h, dtype, options):
                consts = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
                key = (kernel.__name__, tuple(sorted(consts.items())),
                       tuple(str(t.dtype) for t in a if isinstance(t, torch.Tensor)))
                if key in seen:
                    continue
                seen.add(key)
                try:
                    compiled, info = compile_launch(kernel, a, kw)
                    regs, spill = _ptxas_numbers(info)
                    smem = compiled.metadata.shared
                except Exception as exc:  # report every failure, then exit non-zero
                    failures += 1
                    regs = spill = smem = f"FAILED: {type(exc).__name__}: {str(exc)[:80]}"
                short = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                                 for k, v in consts.items())
                print(f"| {orientation}/{group}/{penalty} C={c} {h}x{h} | {kernel.__name__} | "
                      f"{tuple(grid)} | {short} | {kw.get('num_warps')}/{kw.get('num_stages')} | "
                      f"{regs} | {spill} | {smem} |", flush=True)
    return failures


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        if "triton" in sys.modules:
            raise SystemExit("--dry-run needs TRITON_INTERPRET=1 before triton is imported")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    if args.compile_report:
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("--compile-report needs TRITON_INTERPRET unset")
        return 1 if compile_report(args) else 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run or --compile-report on the CPU")
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
