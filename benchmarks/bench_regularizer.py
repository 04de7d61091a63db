"""The PCC regulariser as a drop-in loss: a whole SGD training step with and without it, per
model and backend, as ratios measured in the same run (steps alternate between the variants),
with the floor beside them. Target (SPEC section 6): at most 1.15x.

The floor is the ratio the multiply-adds alone would give: the step's conv and linear work
(forward + backward = 3x the forward's) plus PCC's least work per layer, 2 G M^2 K for "abs"
(R by symmetry, M^2 K / 2, in forward and again in backward, and D Vhat, M^2 K) and
2 G M K min(M, K) for "square" (the K x K side when K < M). It assumes PCC's products run
as fast as the convolutions'; row passes (normalisation, its backward) are not counted.

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

ROUNDS = 5  # alternating rounds; each variant's best step is kept
WEIGHT = 0.05
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

    variants = ("none",) + BACKENDS
    for v in variants:
        step(v)  # warm-up
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(ROUNDS):
        for v in variants:
            start = time.perf_counter()
            step(v)
            best[v] = min(best[v], time.perf_counter() - start)
    for reg in regs.values():
        reg.remove()
    step_macs, pcc_macs = step_macs_and_pcc_floor(model, x[:2], regs["cpu"].options)
    return best, 1.0 + pcc_macs / step_macs


@pytest.mark.parametrize("name", SELECTED)
def test_training_step(benchmark, record, name):
    if name not in MODELS:
        pytest.fail(f"PCCFAST_BENCH_MODELS names {name!r}; known: {', '.join(MODELS)}")
    load_before = os.getloadavg()[0]
    best, floor = benchmark.pedantic(timed_steps, args=(name,), rounds=1, iterations=1)
    _, batch, size = MODELS[name]
    record(SUITE, f"{name} batch {batch} {size}px",
           no_pcc_ms=best["none"] * 1e3,
           cpu_ratio=best["cpu"] / best["none"],
           torch_ratio=best["torch"] / best["none"],
           floor=floor,
           load=f"{load_before:.1f}-{os.getloadavg()[0]:.1f}")
