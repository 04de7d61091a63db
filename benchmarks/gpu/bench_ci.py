"""CI on the GPU: the CUDA fast path against the CPU fast path and the brute force, and the
batched Jacobi eigensolver against torch.linalg.eigh on CUDA. Prints markdown tables.

    python benchmarks/gpu/bench_ci.py                 # on a CUDA machine (H100: a few minutes)
    python benchmarks/gpu/bench_ci.py --dry-run       # anywhere: tiny sizes, CPU stand-ins

Feature maps are ReLU'd Gaussians (non-negative, half zeros: the spectrum of real post-ReLU
activations, one large mean direction) in --dtype, (images, C, H*W). Every time is the best of
--repeats runs after a warm-up on two images, with the device synchronised. The brute force
(one nuclear norm per channel, CHIP style, float64) runs on --brute-images images only and is
extrapolated to --images, as the tables say; the errors of both fast paths are measured against
it on those images, relative to the image's nuclear norm (the SPEC bar is 1e-7).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pccfast.ops import _C, ci_cuda  # noqa: E402
from pccfast.ops.ci_reference import ci_bruteforce  # noqa: E402

# (name, C, H*W): the 12 scored VGG-16 layers on CIFAR-10 (32x32 input).
VGG16_CIFAR = [
    ("conv1_1", 64, 1024), ("conv1_2", 64, 256), ("conv2_1", 128, 256), ("conv2_2", 128, 64),
    ("conv3_1", 256, 64), ("conv3_2", 256, 64), ("conv3_3", 256, 16), ("conv4_1", 512, 16),
    ("conv4_2", 512, 16), ("conv4_3", 512, 4), ("conv5_1", 512, 4), ("conv5_2", 512, 4),
]
# ResNet-50 on 224x224: the stem, and per stage the two bottleneck ReLUs (conv1 output at the
# stage's input size, conv2 output at the strided size).
RESNET50 = [
    ("stem", 64, 112 * 112),
    ("layer1 relu1", 64, 56 * 56), ("layer1 relu2", 64, 56 * 56),
    ("layer2 relu1", 128, 56 * 56), ("layer2 relu2", 128, 28 * 28),
    ("layer3 relu1", 256, 28 * 28), ("layer3 relu2", 256, 14 * 14),
    ("layer4 relu1", 512, 14 * 14), ("layer4 relu2", 512, 7 * 7),
]
EIGH_SIZES = (16, 32, 64, 128, 256, 512)
DRY_RUN_SHAPES = [("tiny C<P", 6, 20), ("tiny C=P", 9, 9), ("tiny P<C", 12, 5)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int, warmup=None) -> tuple[float, object]:
    """(best wall time in s, last result); runs `warmup` (or fn) once first. Stops repeating once
    a run takes over 2 s."""
    (warmup or fn)()
    synchronize(device)
    best, out = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
        if best > 2.0:
            break
    return best, out


def _ratio(slow: float, fast: float) -> str:
    return f"{slow / fast:.3g}x" if fast > 0 else "n/a"


def feature_maps(images: int, c: int, p: int, dtype, device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(images, c, p, generator=gen, device=device, dtype=torch.float32)
    return x.relu_().to(dtype)


def bar_error(fast: torch.Tensor, brute: torch.Tensor, rows64: torch.Tensor) -> float:
    nuclear = torch.linalg.matrix_norm(rows64, ord="nuc")[:, None]
    return float(((fast.cpu() - brute.cpu()).abs() / nuclear.cpu().clamp_min(1e-300)).max())


def bench_ci_layers(title, shapes, args, fast_device, fast_fn, fast_label):
    """One table: per layer, the fast path on `fast_device`, the CPU fast path, brute force."""
    rows = []
    for index, (name, c, p) in enumerate(shapes):
        x = feature_maps(args.images, c, p, args.dtype, fast_device, seed=index)
        t_fast, ci_dev = best_time(lambda: fast_fn(x), fast_device, args.repeats,
                                   warmup=lambda: fast_fn(x[:2]))
        x_cpu = x[: args.cpu_images].cpu()
        cpu = torch.device("cpu")
        t_cpu, ci_cpu = best_time(lambda: torch.ops.pccfast.channel_independence(x_cpu), cpu,
                                  args.repeats,
                                  warmup=lambda: torch.ops.pccfast.channel_independence(x_cpu[:2]))
        t_cpu *= args.images / x_cpu.shape[0]
        brute_device = torch.device(args.brute_device)
        rows64 = x[: args.brute_images].to(brute_device, torch.float64)
        t_brute, brute = best_time(lambda: ci_bruteforce(rows64), brute_device, 1,
                                   warmup=lambda: None)  # seconds per image: no warm-up
        t_brute *= args.images / rows64.shape[0]
        k = args.brute_images
        rows.append({
            "layer": name, "C": c, "P": p, "m": min(c, p),
            "fast": t_fast, "cpu": t_cpu, "brute": t_brute,
            "err_fast": bar_error(ci_dev[:k], brute, rows64),
            "err_cpu": bar_error(ci_cpu[:k], brute, rows64),
        })
        del x, x_cpu, rows64
        if fast_device.type == "cuda":
            torch.cuda.empty_cache()
    extrapolated = "" if args.cpu_images >= args.images else f", extrapolated from {args.cpu_images} images"
    lines = [
        f"### {title}: {args.images} images, {str(args.dtype).replace('torch.', '')}",
        "",
        f"Brute force: {args.brute_device}, float64, timed on {args.brute_images} image(s) and "
        f"extrapolated to {args.images}. CPU fast path: {torch.get_num_threads()} threads"
        f"{extrapolated}. Errors: max over channels and brute-forced images of "
        "|CI - CI_brute| / ||A||_* (bar 1e-7).",
        "",
        f"| layer | C | H*W | m | {fast_label} (s) | CPU fast (s) "
        f"| brute force {args.brute_device}, extrapolated (s) | CPU / {fast_label} "
        f"| brute / {fast_label} | brute / CPU | err {fast_label} | err CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['C']} | {r['P']} | {r['m']} | {r['fast']:.3g} | {r['cpu']:.3g} "
            f"| {r['brute']:.3g} | {_ratio(r['cpu'], r['fast'])} | {_ratio(r['brute'], r['fast'])} "
            f"| {_ratio(r['brute'], r['cpu'])} | {r['err_fast']:.1e} | {r['err_cpu']:.1e} |"
        )
    total = {key: sum(r[key] for r in rows) for key in ("fast", "cpu", "brute")}
    worst = {key: max(r[key] for r in rows) for key in ("err_fast", "err_cpu")}
    lines.append(
        f"| **all layers** | | | | **{total['fast']:.3g}** | **{total['cpu']:.3g}** "
        f"| **{total['brute']:.3g}** | **{_ratio(total['cpu'], total['fast'])}** "
        f"| **{_ratio(total['brute'], total['fast'])}** | **{_ratio(total['brute'], total['cpu'])}** "
        f"| {worst['err_fast']:.1e} | {worst['err_cpu']:.1e} |"
    )
    return "\n".join(lines)


def bench_eigh(args, device, jacobi_fn, baseline_fn, jacobi_label, baseline_label, sizes):
    lines = [
        f"### Batched symmetric eigensolver: {args.eigh_batch} Gram matrices per call, float64",
        "",
        "Gram matrices of ReLU'd Gaussian rows (n x 2n). Error: max |lambda_jacobi - "
        f"lambda_{baseline_label}| / ||G||_2.",
        "",
        f"| n | {jacobi_label} (ms) | {baseline_label} (ms) | {baseline_label} / {jacobi_label} "
        "| eigenvalue error | orthogonality error |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    wins = []
    for n in sizes:
        x = feature_maps(args.eigh_batch, n, 2 * n, torch.float64, device, seed=n)
        gram = x @ x.mT
        t_jacobi, (values, vectors) = best_time(lambda: jacobi_fn(gram), device, args.repeats,
                                                warmup=lambda: jacobi_fn(gram[:2]))
        t_base, (ref_values, _) = best_time(lambda: baseline_fn(gram), device, args.repeats,
                                            warmup=lambda: baseline_fn(gram[:2]))
        norm = ref_values.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        err = float(((values - ref_values).abs() / norm).max())
        eye = torch.eye(n, dtype=torch.float64, device=device)
        orth = float((vectors.mT @ vectors - eye).abs().max())
        wins.append((n, t_base / t_jacobi))
        lines.append(
            f"| {n} | {1e3 * t_jacobi:.3g} | {1e3 * t_base:.3g} | {_ratio(t_base, t_jacobi)} "
            f"| {err:.1e} | {orth:.1e} |"
        )
        del x, gram
    largest_win = max((n for n, ratio in wins if ratio > 1.0), default=None)
    lines += ["", f"Largest n where the Jacobi kernel wins: {largest_win} "
              "(kernels/ci_cuda.cu: kJacobiMaxSize, override with PCCFAST_CI_EIGH)."]
    return "\n".join(lines)


def _jacobi_emulation(gram):
    values, vectors, _ = ci_cuda.jacobi_eigh_emulation(gram)
    return values, vectors


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=640, help="calibration images per layer")
    parser.add_argument("--cpu-images", type=int, default=None,
                        help="images for the CPU fast path, extrapolated (default: --images)")
    parser.add_argument("--brute-images", type=int, default=2,
                        help="images for the brute force, extrapolated (default 2)")
    parser.add_argument("--brute-device", default=None,
                        help="device of the brute force (default: the fast path's)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="dtype of the feature maps (default float32)")
    parser.add_argument("--eigh-batch", type=int, default=640, help="matrices per eigh call")
    parser.add_argument("--eigh-sizes", type=int, nargs="+", default=list(EIGH_SIZES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, best kept")
    parser.add_argument("--skip", choices=["vgg", "resnet", "eigh"], nargs="*", default=[],
                        help="tables to leave out")
    parser.add_argument("--out", default=None, help="also write the tables to this file")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU with CPU stand-ins for the CUDA kernels")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.images, args.brute_images, args.eigh_batch, args.repeats = 4, 1, 6, 1
        args.eigh_sizes = [4, 7, 16]
        args.cpu_images = args.cpu_images or 4
    args.cpu_images = min(args.cpu_images or args.images, args.images)
    args.brute_images = min(args.brute_images, args.images)
    args.dtype = DTYPES[args.dtype]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = _C.unavailable_reason()
    if reason is not None:
        print(f"pccfast._C is unavailable: {reason}", file=sys.stderr)
        return 2
    if args.dry_run:
        device = torch.device("cpu")
        fast_fn = torch.ops.pccfast.channel_independence
        fast_label, jacobi_fn, jacobi_label = "CPU op", _jacobi_emulation, "Jacobi (host emulation)"
        baseline_label = "torch eigh (CPU)"
        vgg, resnet = DRY_RUN_SHAPES, DRY_RUN_SHAPES[:2]
        header = "dry run: tiny sizes, CPU stand-ins for the CUDA kernels (timings meaningless)"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device (use --dry-run to check the script on the CPU)", file=sys.stderr)
            return 2
        if not ci_cuda.has_cuda_ops():
            print("pccfast._C was built without CUDA kernels (PCCFAST_CUDA=1)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        fast_fn = torch.ops.pccfast.channel_independence
        fast_label, jacobi_fn, jacobi_label = "CUDA", ci_cuda.batched_eigh, "Jacobi kernel"
        baseline_label = "torch eigh (CUDA)"
        vgg, resnet = VGG16_CIFAR, RESNET50
        header = f"{torch.cuda.get_device_name(device)}"
    args.brute_device = args.brute_device or device.type
    print(f"## CI benchmark ({header}), torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}\n", flush=True)
    sections = []
    if "vgg" not in args.skip:
        sections.append(bench_ci_layers("VGG-16 on CIFAR-10, 12 scored layers", vgg, args,
                                        device, fast_fn, fast_label))
        print(sections[-1] + "\n", flush=True)
    if "resnet" not in args.skip:
        sections.append(bench_ci_layers("ResNet-50 on ImageNet, scored layers", resnet, args,
                                        device, fast_fn, fast_label))
        print(sections[-1] + "\n", flush=True)
    if "eigh" not in args.skip:
        sections.append(bench_eigh(args, device, jacobi_fn, torch.linalg.eigh, jacobi_label,
                                   baseline_label, args.eigh_sizes))
        print(sections[-1] + "\n", flush=True)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n\n".join(sections) + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
