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


def checked_channels(in_channels) -> int:
    """The image channels a model takes (1 grey, 3 RGB, 4 RGBA, ...): a positive integer."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    return in_channels


def channel_kwargs(in_channels: int) -> dict:
    """The recipe keyword for in_channels, left out for RGB (recipes stay as they were)."""
    return {} if in_channels == 3 else {"in_channels": in_channels}


def load_state_checked(model: nn.Module, state, source: str) -> None:
    """``model.load_state_dict(state)`` (strict), or one ValueError line naming ``source`` and
    the parameters whose names or shapes differ (a model of another width, depth or class
    count) instead of torch's multi-line RuntimeError."""
    if not isinstance(state, dict):
        raise ValueError(f"{source} holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shapes differ (file vs model): " + _few(shapes))
    if missing:
        problems.append(f"{len(missing)} missing: " + _few(missing))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: " + _few(unexpected))
    if problems:
        raise ValueError(f"{source} does not fit this {type(model).__name__} "
                         f"({'; '.join(problems)}); was it written for another model, width or "
                         "number of classes?")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # anything else torch objects to, on one line
        first = str(exc).strip().splitlines()
        raise ValueError(f"{source} does not fit this {type(model).__name__}: "
                         f"{' '.join(line.strip() for line in first)}") from exc


def _few(items: list[str], shown: int = 3) -> str:
    more = f", ... ({len(items) - shown} more)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


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
    """The module inside DataParallel / DistributedDataParallel / torch.compile wrappers (the
    same parameters, with the names of the model as written)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    from .._checks import compiled_original

    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif compiled_original(model) is not None:
            model = compiled_original(model)
        else:
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
