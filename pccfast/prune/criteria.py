"""Pruning criteria beside CI: each gives the same ``layer -> (C,) float64`` scores that
:func:`pccfast.prune` takes, so plans, budgets and surgery are shared and a comparison between
criteria differs only in the scores (SPEC section 3).

- ``ci`` (default): mean channel independence of the scored activation (CHIP).
- ``l1``: the L1 norm of each output filter of the conv(s) producing the channels (Li et al.,
  ICLR 2017), ``sum |W[c]|`` over input channels and kernel; needs no data.
- ``hrank``: the mean over calibration images of the matrix rank of each channel's H x W map
  (Lin et al., HRank, CVPR 2020), in float32 as HRank's code, with
  :func:`torch.linalg.matrix_rank`'s default tolerance ``max(H, W) * eps_fp32 * sigma_max``.
- ``taylor``: first-order Taylor importance on the activation (Molchanov et al., CVPR 2019, the
  "gate after each channel" form): per image ``n`` and channel ``c``,
  ``|sum_{h,w} a[n,c,h,w] * dL_n/da[n,c,h,w]|`` with ``L_n`` image ``n``'s cross-entropy (model
  in eval mode, BatchNorm frozen, so images do not interact), averaged over the images. The
  paper squares the per-batch sum; the absolute per-image value is the common implementation
  and does not depend on the batch size.
- ``random``: seeded uniform scores in [0, 1), the control every pruning paper should show;
  each layer's scores depend only on the seed and the layer's name.

The activation criteria (``ci``, ``hrank``, ``taylor``) score the same sites as CI, and a
residual stream's score is the mean over its sites of their per-site means. ``l1`` scores the
same layers; a stream's score is the mean over the convs writing the stream (stem, every block's
last conv, the shortcut convs: their filters are pruned with one index set) of their filter
norms. :class:`pccfast.prune.scores.ScoreCollector` streams them in one pass.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from .._checks import check_choice, check_finite_tensor, check_float_tensor
from ..ci import channel_independence

CRITERIA = ("ci", "l1", "hrank", "taylor", "random")
DATA_FREE = ("l1", "random")  # scores from the weights or the seed alone


def check_criterion(criterion) -> str:
    return check_choice("criterion", criterion, CRITERIA)


def channel_rank(fmap: torch.Tensor) -> torch.Tensor:
    """HRank: ``(N, C, H, W) -> (N, C)`` float64, the rank of every channel's H x W map.

    Batched over all N*C maps in float32 (HRank's own precision); the tolerance is
    :func:`torch.linalg.matrix_rank`'s default, ``max(H, W) * eps_fp32 * sigma_max`` per map.
    """
    check_float_tensor("fmap", fmap, (4,))
    check_finite_tensor("fmap", fmap)
    n, c, h, w = fmap.shape
    ranks = torch.linalg.matrix_rank(fmap.detach().to(torch.float32).reshape(n * c, h, w))
    return ranks.reshape(n, c).to(torch.float64)


def taylor_importance(activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """First-order Taylor: ``(N, C, H, W)`` activation and its loss gradient -> ``(N, C)``
    float64 ``|sum_{h,w} a * g|`` (products in the activation's precision, summed in float64)."""
    check_float_tensor("activation", activation, (4,))
    if not isinstance(grad, torch.Tensor) or grad.shape != activation.shape:
        raise ValueError(f"grad must be a tensor of the activation's shape "
                         f"{tuple(activation.shape)}, got {getattr(grad, 'shape', grad)!r}")
    product = activation.detach() * grad.detach()
    check_finite_tensor("activation * grad", product)
    return product.sum(dim=(2, 3), dtype=torch.float64).abs()


def per_image_scores(criterion: str, activation: torch.Tensor, grad=None,
                     backend: str = "auto") -> torch.Tensor:
    """``(N, C)`` float64 scores of one activation for the activation criteria."""
    if criterion == "ci":
        return channel_independence(activation.detach(), backend=backend)
    if criterion == "hrank":
        return channel_rank(activation)
    if criterion == "taylor":
        return taylor_importance(activation, grad)
    raise ValueError(f"criterion {criterion!r} does not score activations "
                     f"(one of 'ci', 'hrank', 'taylor')")


def filter_l1(model: nn.Module, convs: list[str], width: int) -> torch.Tensor:
    """Li et al.: ``(width,)`` float64 L1 norm of each output filter, the mean over ``convs``
    (the convs writing one channel group; those with another output width are skipped)."""
    norms = []
    for name in dict.fromkeys(convs):
        weight = model.get_submodule(name).weight.detach()
        if weight.shape[0] == width:
            norms.append(weight.to("cpu", torch.float64).abs().flatten(1).sum(1))
    if not norms:
        raise ValueError(f"l1: no conv among {convs} has {width} output filters")
    return torch.stack(norms).mean(0)


def random_scores(layer: str, width: int, seed: int) -> torch.Tensor:
    """``(width,)`` float64 uniform in [0, 1) from a generator seeded by ``seed`` and the
    layer's name (the same seed gives the same scores, whatever other layers are scored)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + zlib.crc32(layer.encode())) % (1 << 63)
    generator = torch.Generator().manual_seed(mixed)
    return torch.rand(width, generator=generator, dtype=torch.float64)
