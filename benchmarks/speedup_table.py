"""FLOPs removed vs time saved: the measured speed-up of pruned models, for RESULTS.md.

    python benchmarks/speedup_table.py [--device cpu|cuda] [--threads 1] [--rows vgg16,...]
                                       [--round-to 1,8] [--batch-sizes 1,64] [--no-onnx]
                                       [--dtype float32|bfloat16] [--channels-last] [--out FILE]
    python benchmarks/speedup_table.py --dry-run    # toy models, a few seconds (checks the script)

Per row (model at a published pruning point), the original and each ``round_to`` variant are
timed in the same rounds, every round starting at another model (pccfast.speed.time_rounds),
in PyTorch eager and (CPU) in onnxruntime; the speed-up is the median over rounds of
original time / pruned time, with its quartiles. Channels are chosen on seeded random scores:
latency depends on the kept counts only, and these follow the published rate lists (VGG) or a
FLOPs target searched by tau (the others), so a CI-scored model's per-layer counts differ
somewhat. Prints a markdown table (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pccfast  # noqa: E402
from pccfast.prune.graph import build_graph  # noqa: E402
from pccfast.speed import (_Clock, _runner, _timing, speedups, time_rounds,  # noqa: E402
                           torch_threads)

# name: (builder, input size, pruning keywords, label)
ROWS = {
    "vgg16": (lambda: pccfast.models.vgg16_cifar(), 32, dict(rates="[0.51]*7+[0.90]*5"),
              "VGG-16-CIFAR, paper's rates"),
    "resnet56_47": (lambda: pccfast.models.resnet56_cifar(), 32, dict(target_flops=0.474),
                    "ResNet-56, CHIP 47%"),
    "resnet56_74": (lambda: pccfast.models.resnet56_cifar(), 32, dict(target_flops=0.74),
                    "ResNet-56, CHIP 74%"),
    "resnet50": (lambda: pccfast.models.resnet50(), 224, dict(target_flops=0.584),
                 "ResNet-50 224px, paper's 58.4%"),
    "mobilenet_v2": (lambda: _tv("mobilenet_v2"), 224, dict(target_flops=0.5),
                     "MobileNetV2 224px, 50%"),
    "efficientnet_b0": (lambda: _tv("efficientnet_b0"), 224, dict(target_flops=0.5),
                        "EfficientNet-B0 224px, 50%"),
}


# --dry-run: the same code paths on toy models and inputs
DRY_ROWS = {
    "vgg16": (lambda: pccfast.models.vgg16_cifar(width=0.25), 32,
              dict(rates="[0.51]*7+[0.90]*5"), "VGG-16-CIFAR width 0.25 (dry run)"),
    "mobilenet_v2": (lambda: _tv("mobilenet_v2"), 32, dict(target_flops=0.5),
                     "MobileNetV2 32px (dry run)"),
}


def _tv(name):
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def _ints(text):
    return tuple(int(v) for v in text.split(","))


def _rounds_for(batch: int, flops: float) -> int:
    """Fewer rounds where one forward is long (a ResNet-50 batch of 64 takes seconds)."""
    work = batch * flops
    return 21 if work < 2e9 else 9 if work < 3e10 else 5 if work < 1e11 else 3


def pruned_variants(name, round_tos, seed=0, rows=ROWS):
    build, size, kwargs, label = rows[name]
    torch.manual_seed(seed)
    model = build().eval()
    shape = (1, 3, size, size)
    graph = build_graph(model, shape)
    g = torch.Generator().manual_seed(seed)
    scores = {x.name: torch.rand(x.width, generator=g, dtype=torch.float64) for x in graph.prunable}
    out = []
    for n in round_tos:
        pruned, plan = pccfast.prune(model, scores, input_size=shape, round_to=n, verify=False,
                                     **kwargs)
        out.append((n, pruned.eval(), plan))
    return model, size, label, out


def _sessions(models, size, threads, tmp):
    from pccfast.deploy import load_onnx_session

    out = []
    for i, m in enumerate(models):
        path = pccfast.export(m.cpu(), Path(tmp) / f"m{i}.onnx", (3, size, size))
        out.append(load_onnx_session(path, threads=threads))
    return out


def measure(models, size, batch, device, dtype, channels_last, flops, rounds=None, clock="wall"):
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    x = x.to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fns = [_runner(m, x) for m in models]
    times = time_rounds(*fns, rounds=rounds or _rounds_for(batch, flops), warmup=1,
                        clock=_Clock(torch.device(device), clock))
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--round-to", type=_ints, default=(1, 8))
    p.add_argument("--batch-sizes", type=_ints, default=(1, 64))
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="CPU timing: wall clock, or process CPU time (steadier on a shared "
                        "machine; latency on one thread)")
    p.add_argument("--out")
    p.add_argument("--dry-run", action="store_true",
                   help="toy models, batch 1 and 2, two rounds, no onnx: checks the script")
    args = p.parse_args(argv)
    rows, rounds = ROWS, None
    if args.dry_run:
        rows, rounds = DRY_ROWS, 2
        args.rows, args.batch_sizes, args.no_onnx = ",".join(DRY_ROWS), (1, 2), True
    dtype = getattr(torch, args.dtype)
    onnx = not args.no_onnx and args.device == "cpu"
    engines = ["eager"] + (["onnxruntime"] if onnx else [])
    head = ["model", "round_to", "FLOPs removed", "params removed"]
    head += [f"{e} b{b}" for e in engines for b in args.batch_sizes]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    notes = []
    with torch_threads(args.threads if args.device == "cpu" else None) as threads:
        for name in args.rows.split(","):
            if name not in rows:
                p.error(f"--rows: unknown row {name!r}; known: {', '.join(rows)}")
            model, size, label, variants = pruned_variants(name, args.round_to, rows=rows)
            flops = pccfast.count(model, (1, 3, size, size))["flops"]
            models = [model] + [m for _, m, _ in variants]
            cells = {n: [] for n, _, _ in variants}
            for engine in engines:
                with tempfile.TemporaryDirectory() as tmp:
                    if engine == "onnxruntime":
                        runnable = _sessions(models, size, args.threads, tmp)
                    else:
                        runnable = [m.to(args.device, dtype).to(
                            memory_format=torch.channels_last if args.channels_last
                            else torch.contiguous_format) for m in models]
                    for batch in args.batch_sizes:
                        times = measure(runnable, size, batch, args.device, dtype,
                                        args.channels_last, flops, rounds, args.clock)
                        base = _timing(times[0])
                        notes.append(f"{label} {engine} b{batch}: original "
                                     f"{base.median_ms:.2f} ms ({base.q1_ms:.2f}-"
                                     f"{base.q3_ms:.2f}), {base.runs} rounds")
                        for (n, _, _), t in zip(variants, times[1:]):
                            q1, med, q3 = speedups(times[0], t)
                            cells[n].append(f"{med:.2f}x ({q1:.2f}-{q3:.2f})")
                        print(notes[-1], flush=True)
                models = [m.cpu().float() for m in models]
            for n, _, plan in variants:
                removed = plan.removed
                row = [label, str(n), f"{100 * removed['flops']:.1f}%",
                       f"{100 * removed['params']:.1f}%", *cells[n]]
                lines.append(f"| {' | '.join(row)} |")
                print(lines[-1], flush=True)
    load = os.getloadavg()
    header = (f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__}, device {args.device}, "
              f"{threads} thread(s), {args.dtype}, "
              f"{'CUDA events' if args.device != 'cpu' else args.clock + ' clock'}"
              f"{', channels_last' if args.channels_last else ''}, load average at the end "
              f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    text = "\n".join([header, "", *lines, "", "Original model latency (median, quartiles):", "",
                      *[f"- {n}" for n in notes]])
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
