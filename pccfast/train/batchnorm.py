"""Re-estimating BatchNorm statistics after pruning, without touching any weight.

Removing channels changes what the next layers see, so their BatchNorm running statistics (kept
from pre-training) no longer match; a pruned network can score near chance until they are
re-estimated, even though its weights are fine (as EagleEye, ECCV 2020, observed). This measures
how much of the pre-fine-tuning accuracy drop is only that.
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed as dist_utils


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> int:
    """Replaces every BatchNorm's running mean and variance by their average over ``batches``
    (image tensors, or (images, labels) pairs), in training-mode forward passes without
    gradients; under DDP the averages are also averaged over ranks. Returns this rank's image
    count. The model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    images = 0
    model.train()
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
            images += x.shape[0]
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    if images == 0:
        raise ValueError("recalibrate_batchnorm needs at least one batch of images")
    world = dist_utils.world_size()
    if world > 1:
        for m in norms:
            for stat in (m.running_mean, m.running_var):
                stat.copy_(dist_utils.all_reduce_sum(stat.clone()) / world)
    return images
