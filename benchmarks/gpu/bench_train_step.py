"""A full training step with and without the PCC regulariser on every scored layer.

Target (SPEC section 6): at most 15% slower with PCC (bf16 autocast, channels_last, SGD, on one
H100). The variants (no PCC, then one per backend: the fused "triton" against the "torch"
reference) run in the same process, interleaved, and the table reports each one's ratio to the
step without PCC and its peak memory.

    python benchmarks/gpu/bench_train_step.py                          # ResNet-50, 224px
    python benchmarks/gpu/bench_train_step.py --model vgg16_cifar --batch 256 --size 32
    python benchmarks/gpu/bench_train_step.py --dry-run       # tiny CPU run of the same code
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import pccfast


def build(device, name):
    if name == "vgg16_cifar":
        model = pccfast.models.create("vgg16_cifar")
    else:
        import torchvision

        model = getattr(torchvision.models, name)(num_classes=1000)
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    return model, opt


def make_step(model, opt, reg, device, dtype):
    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            if reg is not None:
                loss = loss + reg.loss()
        loss.backward()
        opt.step()
        return loss

    return step


def timed(step, x, y, device, steps):
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="vgg16_cifar or a torchvision name")
    parser.add_argument("--backends", default="triton,torch",
                        help="PCC backends to time against the step without PCC")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both variants")
    parser.add_argument("--weight", type=float, default=0.05)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    backends = [b for b in args.backends.split(",") if b]
    if args.dry_run:
        args.batch, args.size, args.steps, args.rounds = 2, 32, 1, 1
        backends = ["cpu" if b == "triton" else b for b in backends]  # no GPU: the CPU kernels
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    model, opt = build(device, args.model)
    x = torch.randn(args.batch, 3, args.size, args.size,
                    device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10 if args.model == "vgg16_cifar" else 1000, (args.batch,), device=device)
    regs = {b: pccfast.PCCRegularizer(model, weight=args.weight, backend=b, check_finite=False)
            for b in backends}
    steps = {"none": make_step(model, opt, None, device, dtype)}
    steps.update({b: make_step(model, opt, reg, device, dtype) for b, reg in regs.items()})

    results = {name: [] for name in steps}
    peaks = {}
    for _ in range(args.rounds):
        for name, step in steps.items():
            for b, reg in regs.items():
                reg.enabled = b == name
            step(x, y)  # warm-up (and Triton compilation on the first PCC step)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            results[name].append(timed(step, x, y, device, args.steps))
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    best = {name: min(times) for name, times in results.items()}
    layers = len(next(iter(regs.values())).sites) if regs else 0
    print(f"\n### {args.model} training step, batch {args.batch}, {args.size}px, {dtype}, "
          f"channels_last, {layers} regularised layers, {device}")
    print("| variant | step ms | images/s | peak GiB | ratio to no PCC (target <= 1.15) |")
    print("|---|---|---|---|---|")
    for name, t in best.items():
        label = "without PCC" if name == "none" else f"with PCC, backend {name}"
        print(f"| {label} | {t * 1e3:.1f} | {args.batch / t:,.0f} | "
              f"{peaks.get(name, float('nan')):.1f} | {t / best['none']:.3f} |")
    for reg in regs.values():
        reg.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
