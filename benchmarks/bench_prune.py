"""Calibration and pruning cost: pccfast's one-pass CICollector against a CHIP-style pipeline
on the same images, and the time of pccfast.prune itself.

CHIP's pipeline runs the calibration data once per scored layer with one hook, stores the
feature maps (as .npy files; here in a temporary directory, as CHIP does), then computes each
channel's CI as a difference of nuclear norms (C+1 SVDs per image). pccfast runs the data once
with every site hooked and turns each activation into CI on the fly (fast algorithm, compiled
backend), nothing on disk.

    python benchmarks/bench_prune.py [--images 4] [--width 1.0]

Prints the baseline, pccfast and their ratio; no assertion (timings are for reading).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

import pccfast
from pccfast.ops.ci_reference import ci_bruteforce


def chip_style(model, sites, images):
    """Per layer: one forward with one hook, feature maps to .npy, brute-force CI per image."""
    modules = dict(model.named_modules())
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layer, (site,) in sites.items():
            path = os.path.join(tmp, f"{layer}.npy")
            handle = modules[site].register_forward_hook(
                lambda m, a, out, path=path: np.save(path, out.detach().cpu().numpy()))
            with torch.no_grad():
                model(images)
            handle.remove()
            fmap = torch.from_numpy(np.load(path)).to(torch.float64)
            n, c = fmap.shape[:2]
            scores[layer] = ci_bruteforce(fmap.reshape(n, c, -1)).mean(0)
    return scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="calibration images (default 4)")
    parser.add_argument("--width", type=float, default=1.0, help="VGG-16 width multiplier")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = pccfast.models.vgg16_cifar(width=args.width).eval()
    images = torch.randn(args.images, 3, 32, 32)

    start = time.perf_counter()
    col = pccfast.CICollector(model, max_images=args.images, progress=False,
                              input_size=(1, 3, 32, 32))
    t_setup = time.perf_counter() - start
    col.update(images)
    ours = col.scores()
    t_ours = time.perf_counter() - start
    sites = {k: v for k, v in col.groups.items() if k != "features.conv16"}  # CHIP's 12 layers
    col.remove()

    start = time.perf_counter()
    theirs = chip_style(model, sites, images)
    t_chip = time.perf_counter() - start
    error = max(float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max().clamp_min(1e-30))
                for k in theirs)

    print(f"VGG-16-CIFAR width {args.width}, {args.images} images, 12 scored layers, "
          f"{torch.get_num_threads()} threads")
    print(f"  CHIP-style (per-layer passes, .npy, brute force): {t_chip:8.2f} s")
    print(f"  pccfast CICollector (one pass, fast CI):          {t_ours:8.2f} s "
          f"(of which {t_setup:.2f} s tracing the graph)")
    print(f"  ratio: {t_chip / t_ours:.1f}x   max relative difference of the scores: {error:.1e}")

    for name, net, size, rates in [
        ("vgg16_cifar", model, (1, 3, 32, 32), "[0.21]*7+[0.75]*5"),
        ("resnet56_cifar", pccfast.models.resnet56_cifar(), (1, 3, 32, 32),
         "[0.]+[0.15]*2+[0.4]*27"),
        ("resnet50", pccfast.models.resnet50(), (1, 3, 224, 224), "[0.]+[0.1]*3+[0.35]*16"),
    ]:
        graph = pccfast.prune.build_graph(net, size)
        scores = {g.name: torch.rand(g.width, dtype=torch.float64) for g in graph.prunable}
        for kwargs in ({"rates": rates}, {"target_flops": 0.5}):
            start = time.perf_counter()
            _, plan = pccfast.prune(net, scores, input_size=size, verify=False, **kwargs)
            elapsed = time.perf_counter() - start
            print(f"  prune {name:<15} {str(kwargs):<38} {elapsed:6.2f} s "
                  f"(flops removed {plan.removed['flops']:.3f})")


if __name__ == "__main__":
    main()
