"""A full ResNet-50 training step with and without the PCC regulariser on every scored layer.

Target (SPEC section 6): at most 15% slower with PCC (bf16 autocast, channels_last, SGD, batch
256 at 224x224 on one H100). Both variants run in the same process, interleaved, and the
table reports the ratio and the peak memory of each.

    python benchmarks/gpu/bench_train_step.py                 # on a CUDA machine
    python benchmarks/gpu/bench_train_step.py --dry-run       # tiny CPU run of the same code
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import pccfast


def build(device):
    import torchvision

    model = torchvision.models.resnet50(num_classes=1000).to(device)
    model = model.to(memory_format=torch.channels_last)
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
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both variants")
    parser.add_argument("--weight", type=float, default=0.05)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if args.dry_run:
        args.batch, args.size, args.steps, args.rounds = 2, 32, 1, 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    model, opt = build(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    reg = pccfast.PCCRegularizer(model, weight=args.weight, check_finite=False)
    reg.enabled = False
    plain_step = make_step(model, opt, None, device, dtype)
    pcc_step = make_step(model, opt, reg, device, dtype)

    results = {"plain": [], "pcc": []}
    peaks = {}
    for _ in range(args.rounds):
        for name, step in (("plain", plain_step), ("pcc", pcc_step)):
            reg.enabled = name == "pcc"
            step(x, y)  # warm-up (and Triton compilation on the first PCC step)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            results[name].append(timed(step, x, y, device, args.steps))
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    plain, with_pcc = min(results["plain"]), min(results["pcc"])
    print(f"\n### ResNet-50 training step, batch {args.batch}, {args.size}px, {dtype}, "
          f"{len(reg.sites)} regularised layers, {device}")
    print("| variant | step ms | images/s | peak GiB |")
    print("|---|---|---|---|")
    for name, t in (("without PCC", plain), ("with PCC (all scored layers)", with_pcc)):
        key = "plain" if name.startswith("without") else "pcc"
        print(f"| {name} | {t * 1e3:.1f} | {args.batch / t:,.0f} | {peaks.get(key, float('nan')):.1f} |")
    print(f"| slowdown (target <= 1.15) | {with_pcc / plain:.3f} | | |")
    reg.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
