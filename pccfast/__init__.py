"""pccfast: fused kernels for PCC pre-training and channel-independence pruning of CNNs.

    s = pccfast.pcc(x)                           # (N, C, H, W) -> differentiable score
    reg = pccfast.PCCRegularizer(model)          # hooks; loss = task_loss + reg.loss()
    ci = pccfast.channel_independence(fmap)      # (N, C, H, W) -> (N, C) float64
"""

from .ci import channel_independence
from .pcc import PCCLoss, pcc, pcc_matrix
from .regularizer import PCCRegularizer

__version__ = "0.1.0"

__all__ = [
    "PCCLoss",
    "PCCRegularizer",
    "channel_independence",
    "pcc",
    "pcc_matrix",
]
