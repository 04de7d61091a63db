"""PCC on the CPU: the compiled "cpu" backend against the eager reference, forward + backward, at
the VGG-16-CIFAR conv-output shapes, batch 128. Targets: no slower, >= 5x less extra memory.
PCCFAST_BENCH_WIDTH (default 1) takes the shapes of the narrower VGG-16 the studies train
(0.25, 0.5); OMP_NUM_THREADS=1 gives the per-layer figures of benchmarks/RESULTS.md:

    PCCFAST_BENCH_WIDTH=0.5 OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_pcc.py \
        --benchmark-only -k "cpu and channel"

Memory is reported two ways: the bytes autograd keeps between forward and backward (exact;
the input itself not counted) and the extra peak: the peak resident-set growth of forward +
backward, measured in a fresh process, minus the input gradient itself (the same for both).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import pccfast
from pccfast.models._common import scaled

from conftest import _TABLES
from memory import peak_extra_bytes

BATCH = 128
# (C, H) of the 13 VGG-16-CIFAR conv outputs (H = W).
VGG16_CIFAR_CONV_OUTPUTS = [
    (64, 32), (64, 32), (128, 16), (128, 16), (256, 8), (256, 8), (256, 8),
    (512, 4), (512, 4), (512, 4), (512, 2), (512, 2), (512, 2),
]
WIDTH = float(os.environ.get("PCCFAST_BENCH_WIDTH", "1"))
DISTINCT = sorted({(scaled(c, WIDTH), h) for c, h in VGG16_CIFAR_CONV_OUTPUTS}, reverse=True)
OPTIONS = {"channel/sample/abs": dict(),
           "pixel/sample/square": dict(orientation="pixel", penalty="square")}
SUITE = ("PCC forward+backward, batch 128: cpu backend vs eager reference"
         + (f", VGG-16 width {WIDTH:g}" if WIDTH != 1 else ""))


def make_input(c, h):
    return torch.randn(BATCH, c, h, h, generator=torch.Generator().manual_seed(c + h)).relu()


def forward_backward(x, backend, options):
    x = x.detach().requires_grad_(True)
    pccfast.pcc(x, backend=backend, **options).backward()
    return x.grad


def saved_bytes(x, backend, options) -> int:
    """Bytes autograd saves for backward, not counting x itself."""
    x = x.detach().requires_grad_(True)
    total = []

    def pack(t):
        if t.data_ptr() != x.data_ptr():
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pccfast.pcc(x, backend=backend, **options)
    return sum(total)


def _setup(c, h):
    forward_backward(torch.randn(2, c, 2, 2).relu(), "torch", {})  # warm: threads, kernels
    forward_backward(torch.randn(2, c, 2, 2).relu(), "cpu", {})
    return make_input(c, h)


def _work(backend, options, x):
    forward_backward(x, backend, options)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", DISTINCT, ids=lambda s: f"C={s[0]}x{s[1]}x{s[1]}")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_pcc_forward_backward(benchmark, record, backend, shape, option):
    options = OPTIONS[option]
    x = make_input(*shape)
    benchmark.pedantic(forward_backward, args=(x, backend, options), rounds=3, warmup_rounds=1)
    ms = benchmark.stats.stats.min * 1e3
    peak = peak_extra_bytes(functools.partial(_setup, *shape),
                            functools.partial(_work, backend, options))
    extra = max(0, peak - x.numel() * x.element_size())
    row = f"{option} C={shape[0]} {shape[1]}x{shape[1]}"
    prefix = "reference" if backend == "torch" else "cpu"
    record(SUITE, row, **{f"{prefix}_ms": ms,
                          f"{prefix}_saved_MB": saved_bytes(x, backend, options) / 2**20,
                          f"{prefix}_extra_peak_MB": extra / 2**20})
    cells = _TABLES[SUITE]["rows"][row]
    if "reference_ms" in cells and "cpu_ms" in cells:
        record(SUITE, row, speedup=cells["reference_ms"] / cells["cpu_ms"],
               extra_memory_ratio=(cells["reference_extra_peak_MB"]
                                   / max(cells["cpu_extra_peak_MB"], 0.1)))
