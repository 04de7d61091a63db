"""The training loop against a bare loop: ``pccfast.train.fit`` vs a hand-written SGD loop that
takes the same batches from the same loader and does the same steps, with and without the PCC
regulariser (defaults, weight 0.05). Each ratio is fit's epoch time over the bare loop's,
alternating in one run (best of ROUNDS each); 1.00 means fit adds nothing on top of the step.
fit's time is its own record of the epoch (``seconds``: the training steps, without the test
pass and the checkpoint that follow the epoch).

    python -m pytest benchmarks/bench_fit.py --benchmark-only
    PCCFAST_BENCH_FIT_MODELS=vgg16_cifar-0.5 python -m pytest benchmarks/bench_fit.py ...
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F

import pccfast
from pccfast.data import ArraySplits
from pccfast.data.arrays import ImageArrays
from pccfast.train import PCCConfig, TrainConfig, fit
from pccfast.train.schedule import lr_at

ROUNDS = 3
STEPS = 6  # training steps per epoch
BATCH = 128
WIDTHS = {"vgg16_cifar-0.25": 0.25, "vgg16_cifar-0.5": 0.5}
SELECTED = [m for m in os.environ.get("PCCFAST_BENCH_FIT_MODELS", "vgg16_cifar-0.25").split(",")
            if m]
SUITE = "Training loop (pccfast.train.fit) vs a bare loop over the same batches, same run"


def random_data(images: int) -> ArraySplits:
    g = torch.Generator().manual_seed(0)

    def arrays(n):
        return ImageArrays(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                           torch.randint(0, 10, (n,), generator=g))

    return ArraySplits(name="random", train=arrays(images), test=arrays(BATCH), num_classes=10,
                       classes=tuple(str(i) for i in range(10)), pad=4, flip=True)


def bare_epoch(model, data, cfg: TrainConfig, pcc: PCCConfig | None) -> float:
    """What fit's epoch does, written out: the same loader, schedule, optimiser and loss."""
    reg = None
    if pcc is not None:
        reg = pccfast.PCCRegularizer(model, weight=pcc.weight, backend=pcc.backend,
                                     check_finite=False)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    loader = data.train_loader(cfg.batch_size, seed=cfg.seed)
    loader.set_epoch(0)
    model.train()
    steps = len(loader)
    start = time.perf_counter()
    for i, (images, labels) in enumerate(loader):
        for group in opt.param_groups:
            group["lr"] = lr_at(i, steps, cfg.lr, 0, cfg.min_lr)
        loss = F.cross_entropy(model(images), labels)
        if reg is not None:
            loss = loss + reg.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    if reg is not None:
        reg.remove()
    return seconds


def fit_epoch(model, data, cfg: TrainConfig, pcc: PCCConfig | None) -> float:
    result = fit(model, data, cfg, pcc=pcc, progress=False)
    return result.history[-1]["seconds"]


def timed_epochs(name):
    torch.manual_seed(0)
    model = pccfast.models.create("vgg16_cifar", width=WIDTHS[name])
    data = random_data(STEPS * BATCH)
    cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=0.01)
    variants = {"none": None, "pcc": PCCConfig(weight=0.05, backend="cpu")}
    runs = [(loop, v) for v in variants for loop in (bare_epoch, fit_epoch)]
    for loop, v in runs:
        loop(model, data, cfg, variants[v])  # warm-up
    best = {(loop.__name__, v): float("inf") for loop, v in runs}
    for _ in range(ROUNDS):
        for loop, v in runs:
            best[loop.__name__, v] = min(best[loop.__name__, v],
                                         loop(model, data, cfg, variants[v]))
    return best


@pytest.mark.parametrize("name", SELECTED)
def test_fit_vs_bare_loop(benchmark, record, name):
    if name not in WIDTHS:
        pytest.fail(f"PCCFAST_BENCH_FIT_MODELS names {name!r}; known: {', '.join(WIDTHS)}")
    load_before = os.getloadavg()[0]
    best = benchmark.pedantic(timed_epochs, args=(name,), rounds=1, iterations=1)
    record(SUITE, f"{name} batch {BATCH}, {STEPS} steps",
           bare_ms_per_step=best["bare_epoch", "none"] * 1e3 / STEPS,
           fit_ratio=best["fit_epoch", "none"] / best["bare_epoch", "none"],
           bare_pcc_ms_per_step=best["bare_epoch", "pcc"] * 1e3 / STEPS,
           fit_pcc_ratio=best["fit_epoch", "pcc"] / best["bare_epoch", "pcc"],
           load=f"{load_before:.1f}-{os.getloadavg()[0]:.1f}")
