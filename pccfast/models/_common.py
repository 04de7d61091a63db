"""Helpers shared by the zoo: width scaling and the build recipe that pccfast.save records."""

from __future__ import annotations

import contextlib
import math

from torch import nn

RECIPE_ATTRIBUTE = "_pccfast_recipe"


def scaled(channels: int, width: float) -> int:
    """channels * width, rounded, at least 1."""
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise TypeError(f"width must be a float, got {type(width).__name__}")
    if not (math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive finite number, got {width}")
    return max(1, int(round(channels * width)))


def init_resnet_weights(model: nn.Module) -> None:
    """torchvision's ResNet initialisation: Kaiming-normal convs (fan out), BN weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def record_recipe(model: nn.Module, builder: str, **kwargs) -> nn.Module:
    """Remembers how to rebuild ``model`` (a zoo builder and its keywords) for pccfast.save."""
    setattr(model, RECIPE_ATTRIBUTE, {"builder": builder, "kwargs": dict(kwargs), "plans": []})
    return model


def record_description(model: nn.Module, description: dict) -> nn.Module:
    """Marks a model built outside the zoo: pccfast.save stores ``description`` (JSON data saying
    how the caller builds it), the pruning plans since and the state dict, and no pickle;
    ``pccfast.load(path, build=...)`` rebuilds it with the caller's own ``build(description)``."""
    setattr(model, RECIPE_ATTRIBUTE, {"external": dict(description), "plans": []})
    return model


def unwrap_parallel(model):
    """The module inside DataParallel / DistributedDataParallel wrappers."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    return model


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Puts the models in eval mode, then restores every submodule's own mode (a model may
    train with some layers, e.g. frozen BatchNorms, kept in eval)."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training
