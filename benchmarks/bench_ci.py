"""CI on the CPU: the fast path against the CHIP-style brute force, at the 12 scored VGG-16-CIFAR
shapes (post-ReLU maps). Target (SPEC section 6): >= 100x faster at the accuracy bar.

    make bench          # or: python -m pytest benchmarks/bench_ci.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

import pccfast
from pccfast.ops.ci_reference import ci_bruteforce

from conftest import _TABLES, add_total_row

# (C, H*W) of the 12 scored VGG-16-CIFAR layers (CHIP's list; the max-pool outputs where a pool
# follows the conv).
VGG16_CIFAR_SHAPES = [
    (64, 1024), (64, 256), (128, 256), (128, 64), (256, 64), (256, 64),
    (256, 16), (512, 16), (512, 16), (512, 4), (512, 4), (512, 4),
]
FAST_IMAGES = 64  # per call; the CI collector sees calibration batches of this order
BRUTE_IMAGES = 2  # brute force costs about 1 s per image for all 12 layers on 2 cores
SUITE = "CI per image: fast path (auto backend) vs CHIP-style brute force"
add_total_row(SUITE, "all 12 layers", sums=("fast_ms", "brute_ms"), maxes=("max_err_over_nuclear",),
              ratios=(("speedup", "brute_ms", "fast_ms"),))


def post_relu_maps(n, c, p, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, p, 1, generator=g).relu()


def _label(i, shape):
    return f"{i:02d} C={shape[0]} P={shape[1]}"


@pytest.mark.parametrize("i", range(len(VGG16_CIFAR_SHAPES)))
def test_ci_fast(benchmark, record, i):
    c, p = VGG16_CIFAR_SHAPES[i]
    maps = post_relu_maps(FAST_IMAGES, c, p, seed=i)
    out = benchmark.pedantic(pccfast.channel_independence, args=(maps,), rounds=5, warmup_rounds=1)
    want = ci_bruteforce(maps[:1, :, :, 0].double())[0]
    nuc = torch.linalg.svdvals(maps[0, :, :, 0].double()).sum()
    record(SUITE, _label(i, (c, p)),
           fast_ms=benchmark.stats.stats.min / FAST_IMAGES * 1e3,
           max_err_over_nuclear=float((out[0] - want).abs().max() / nuc))


@pytest.mark.parametrize("i", range(len(VGG16_CIFAR_SHAPES)))
def test_ci_bruteforce(benchmark, record, i):
    c, p = VGG16_CIFAR_SHAPES[i]
    maps = post_relu_maps(BRUTE_IMAGES, c, p, seed=i)
    benchmark.pedantic(pccfast.channel_independence, args=(maps,),
                       kwargs=dict(method="bruteforce"), rounds=1)
    row = _label(i, (c, p))
    brute_ms = benchmark.stats.stats.min / BRUTE_IMAGES * 1e3
    values = dict(brute_ms=brute_ms)
    fast = _TABLES[SUITE]["rows"].get(row, {}).get("fast_ms")
    if fast:
        values["speedup"] = brute_ms / fast
    record(SUITE, row, **values)


