"""Helpers shared by the zoo: width scaling and the build recipe that pccfast.save records."""

from __future__ import annotations

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


def checked_channels(in_channels) -> int:
    """The image channels a model takes (1 grey, 3 RGB, 4 RGBA, ...): a positive integer."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    return in_channels


def channel_kwargs(in_channels: int) -> dict:
    """The recipe keyword for in_channels, left out for RGB (recipes stay as they were)."""
    return {} if in_channels == 3 else {"in_channels": in_channels}


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
