"""pccfast: fused kernels for PCC pre-training and channel-independence pruning of CNNs.

    s = pccfast.pcc(x)                           # (N, C, H, W) -> differentiable score
    reg = pccfast.PCCRegularizer(model)          # hooks; loss = task_loss + reg.loss()
    ci = pccfast.channel_independence(fmap)      # (N, C, H, W) -> (N, C) float64
    col = pccfast.CICollector(model)             # col.update(images); scores = col.scores()
    scores = pccfast.scores(model, loader, criterion="l1")  # or hrank, taylor, random, ci
    pruned, plan = pccfast.prune(model, scores, rates="[0.21]*7+[0.75]*5")
    pccfast.count(pruned, (1, 3, 32, 32))        # params, params_all, flops, flops_bn
    pccfast.save(pruned, "m.pt"); model = pccfast.load("m.pt")
    pccfast.benchmark(pruned, (3, 32, 32), baseline=model)  # measured speed-up, batch 1 and 64
    pccfast.export(pruned, "m.onnx", (3, 32, 32))           # or format="torchscript"/"exported"
"""

from . import _openmp  # noqa: F401  (first: the OpenMP wait policy, before torch loads)
from . import models
from .ci import channel_independence
from .deploy import export
from .io import load, save
from .pcc import PCCLoss, pcc, pcc_matrix
from .prune import CICollector, ScoreCollector, count
from .prune import collect_scores as scores
from .prune_entry import prune  # callable; its attributes are the pccfast.prune package's
from .regularizer import PCCRegularizer
from .speed import benchmark

__version__ = "0.1.0"

__all__ = [
    "CICollector",
    "PCCLoss",
    "PCCRegularizer",
    "ScoreCollector",
    "benchmark",
    "channel_independence",
    "count",
    "export",
    "load",
    "models",
    "pcc",
    "pcc_matrix",
    "prune",
    "save",
    "scores",
]
