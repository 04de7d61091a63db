"""Helpers on any ``nn.Module`` that the pruner, trainer, pipeline and I/O share: a mode
switch that restores every submodule's own mode, the model inside parallel/compile wrappers, and
a state-dict load whose mismatch is one readable line."""

from __future__ import annotations

import contextlib

from torch import nn

from ._checks import compiled_original


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


def unwrap_parallel(model):
    """The module inside DataParallel / DistributedDataParallel / torch.compile wrappers (the
    same parameters, with the names of the model as written)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

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
