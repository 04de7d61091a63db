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


def record_recipe(model: nn.Module, builder: str, **kwargs) -> nn.Module:
    """Remembers how to rebuild ``model`` (a zoo builder and its keywords) for pccfast.save."""
    setattr(model, RECIPE_ATTRIBUTE, {"builder": builder, "kwargs": dict(kwargs), "plans": []})
    return model
