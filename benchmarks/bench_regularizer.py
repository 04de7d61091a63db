"""The PCC regulariser as a drop-in loss: a whole SGD training step with and without it, per
model and backend, as ratios measured in the same run (steps alternate between the variants),
with the floor beside them. Target (SPEC section 6): at most 1.15x.

The floor is the ratio the multiply-adds alone would give: the step's conv and linear work
(forward + backward = 3x the forward's) plus PCC's least work per layer, 2 G M^2 K for "abs"
(R by symmetry, M^2 K / 2, in forward and again in backward, and D Vhat, M^2 K) and
2 G M K min(M, K) for "square" (the K x K side when K < M). It assumes PCC's products run
as fast as the convolutions'; row passes (normalisation, its backward) are not counted.
`blas_floor` measures instead, on the layers of more than SHORT_ROW_FEATURES features a row
(the kernels use BLAS there, or register tiles for "abs" on 3x3-4x4 maps): the same products
(R = Vhat Vhat^T and D Vhat, or their K x K forms for "square") as batched BLAS calls on
each layer's shape, plus the least memory traffic (forward reads the activation once; backward
reads it and adds to its gradient), timed in the same alternating rounds and added to the step
without PCC; the short-row layers (2x2 maps, pair loops that beat batched BLAS there) count at
the `floor`'s multiply-add rate. What a kernel that only multiplied, at the BLAS's speed on
these thin shapes, would cost.

    python -m pytest benchmarks/bench_regularizer.py --benchmark-only
    PCCFAST_BENCH_MODELS=vgg16_cifar-0.25 python -m pytest benchmarks/bench_regularizer.py ...

Run it beside other processes with OMP_WAIT_POLICY=PASSIVE (pccfast's CLI sets it; see the
README) and read the ratios: each is taken within one run, alternating, so load shifts both.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F

import pccfast
from pccfast.ops.pcc_options import PCCOptions, pcc_shape

ROUNDS = int(os.environ.get("PCCFAST_BENCH_ROUNDS", "5"))  # alternating; each variant's best
WEIGHT = 0.05
SHORT_ROW_FEATURES = 4  # csrc/pcc_short_rows.h, kShortRowFeatures
# name -> (builder, batch, image size). VGG at 32x32 (CIFAR), the ResNets at 64x64.
MODELS = {
    "vgg16_cifar-0.25": (lambda: pccfast.models.create("vgg16_cifar", width=0.25), 128, 32),
    "vgg16_cifar-0.5": (lambda: pccfast.models.create("vgg16_cifar", width=0.5), 128, 32),
    "vgg16_cifar-1.0": (lambda: pccfast.models.create("vgg16_cifar", width=1.0), 128, 32),
    "resnet18-64px": (lambda: _torchvision("resnet18"), 64, 64),
    "resnet50-64px": (lambda: _torchvision("resnet50"), 32, 64),
}
SELECTED = [m for m in os.environ.get("PCCFAST_BENCH_MODELS", ",".join(MODELS)).split(",") if m]
BACKENDS = ("cpu", "torch")
SUITE = "Training step with the PCC regulariser (defaults, weight 0.05) vs without, same run"


def _torchvision(name):
    import torchvision

    return getattr(torchvision.models, name)(num_classes=10)


def step_macs_and_pcc_floor(model, x, options: PCCOptions) -> tuple[int, int]:
    """(multiply-adds of one training step's convs and linears, PCC's least multiply-adds over
    the regularised layers), counted on one forward pass."""
    reg = pccfast.PCCRegularizer(model, always=True)
    convs = {s.conv for s in reg.sites}
    reg.remove()
    forward, pcc_macs = 0, 0

    def count(name):
        def hook(module, inputs, output):
            nonlocal forward, pcc_macs
            if isinstance(module, torch.nn.Conv2d):
                kh, kw = module.kernel_size
                forward += output.numel() * module.in_channels // module.groups * kh * kw
            else:
                forward += output.numel() * module.in_features
            if name in convs and output.dim() == 4:
                shape = pcc_shape(output.shape, options)
                g, m, k = shape.groups, shape.rows, shape.features
                side = min(m, k) if options.penalty == "square" else m
                pcc_macs += 2 * g * m * k * side
        return hook

    handles = [m.register_forward_hook(count(n)) for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return 3 * forward, pcc_macs


def pcc_shapes(model, x, options: PCCOptions) -> list[tuple[int, int, int]]:
    """(groups, rows, features) of every regularised layer, from one forward pass."""
    reg = pccfast.PCCRegularizer(model, always=True)
    convs = {s.conv for s in reg.sites}
    reg.remove()
    shapes = []
    handles = [m.register_forward_hook(
        lambda module, inputs, output: shapes.append(pcc_shape(output.shape, options)))
        for m in map(model.get_submodule, convs)]
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()
    for h in handles:
        h.remove()
    return [(s.groups, s.rows, s.features) for s in shapes]


def blas_products(shapes, square: bool):
    """A callable doing PCC's least work on each shape: as batched BLAS calls, R (by symmetry
    half a product, in forward and again in backward: one product) and D Vhat, or for
    "square" with K < M the K x K Gram matrix and Vhat times it; and one read of the
    activation (forward) and one read plus a read-modify-write of its gradient (backward)."""
    g = torch.Generator().manual_seed(0)
    operands = []
    for groups, m, k in shapes:
        if k <= SHORT_ROW_FEATURES and not (square and k < m):
            continue  # the pair loops: counted by multiply-adds (blas_floor's docstring)
        v = torch.randn(groups, m, k, generator=g)
        side = k if square and k < m else m
        operands.append((v, v.transpose(1, 2).contiguous(), torch.randn(groups, side, side),
                         torch.randn(groups, m, k, generator=g)))

    def run():
        for v, vt, d, grad in operands:
            v.sum()
            grad.add_(v)
            if d.shape[-1] == v.shape[-1]:  # K x K: vt v, then v (K x K)
                torch.bmm(vt, v)
                torch.bmm(v, d)
            else:
                torch.bmm(v, vt)
                torch.bmm(d, v)
    return run


def timed_steps(name):
    build, batch, size = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    regs = {b: pccfast.PCCRegularizer(model, weight=WEIGHT, backend=b, check_finite=False)
            for b in BACKENDS}

    def step(variant):
        for backend, reg in regs.items():
            reg.enabled = backend == variant
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if variant in regs:
            loss = loss + regs[variant].loss()
        loss.backward()
        opt.step()

    options = regs["cpu"].options
    square = options.penalty == "square"
    shapes = pcc_shapes(model, x, options)
    products = blas_products(shapes, square)
    runs = {v: (lambda v=v: step(v)) for v in ("none",) + BACKENDS}
    runs["products"] = products
    for run in runs.values():
        run()  # warm-up
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(ROUNDS):
        for v, run in runs.items():
            start = time.perf_counter()
            run()
            best[v] = min(best[v], time.perf_counter() - start)
    for reg in regs.values():
        reg.remove()
    step_macs, pcc_macs = step_macs_and_pcc_floor(model, x, options)
    short_macs = sum(2 * g * m * k * m for g, m, k in shapes
                     if k <= SHORT_ROW_FEATURES and not (square and k < m))
    floors = dict(floor=1.0 + pcc_macs / step_macs,
                  blas_floor=1.0 + best["products"] / best["none"] + short_macs / step_macs)
    return best, floors


@pytest.mark.parametrize("name", SELECTED)
def test_training_step(benchmark, record, name):
    if name not in MODELS:
        pytest.fail(f"PCCFAST_BENCH_MODELS names {name!r}; known: {', '.join(MODELS)}")
    load_before = os.getloadavg()[0]
    best, floors = benchmark.pedantic(timed_steps, args=(name,), rounds=1, iterations=1)
    _, batch, size = MODELS[name]
    record(SUITE, f"{name} batch {batch} {size}px",
           no_pcc_ms=best["none"] * 1e3,
           cpu_ratio=best["cpu"] / best["none"],
           torch_ratio=best["torch"] / best["none"],
           **floors,
           load=f"{load_before:.1f}-{os.getloadavg()[0]:.1f}")
