"""Argument checks shared by every public entry point.

Every message names the argument, what was expected and what came, so a user can fix the
call without reading our source.
"""

from __future__ import annotations

import math
import sys
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_float_tensor(name: str, x, ndims: tuple[int, ...]) -> torch.Tensor:
    """A floating tensor with one of the given ranks and no empty dimension."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )
    if x.dim() not in ndims:
        shapes = " or ".join(_shape_name(n) for n in ndims)
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not have an empty dimension, got shape {tuple(x.shape)}")
    return x


def check_int(name: str, value, minimum: int, *, optional: bool = False,
              type_error: bool = False) -> None:
    """An int (a bool is not one) of at least ``minimum``; None too when ``optional``.

    The message names the bound in words where it has them ("a positive integer" for 1, "a
    non-negative integer" for 0), as config keys are reported. ``type_error``: the two-message
    form TrainConfig's fields have always had instead, a TypeError for a value that is not an
    int ("must be an integer, got float 2.5") and a ValueError for one below the bound.
    """
    if value is None and optional:
        return
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if type_error:
        if not is_int:
            raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
        return
    if not is_int or value < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {kind}{' or unset' if optional else ''}, got {value!r}")


def check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def check_finite_tensor(name: str, x: torch.Tensor) -> None:
    """Raises if x holds NaN or Inf (one reduction; syncs on CUDA)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def compiled_original(model):
    """The module inside a ``torch.compile(model)`` wrapper (an OptimizedModule), else None.
    Looked up without importing torch._dynamo: no wrapper exists before it is imported."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", ())
    return model._orig_mod if isinstance(model, optimized) else None


def _shape_name(ndim: int) -> str:
    return {2: "(C, P)", 3: "(C, H, W)", 4: "(N, C, H, W)"}.get(ndim, f"{ndim}-d")


def check_materialised(name: str, model) -> None:
    """A model whose tensors hold values: a meta-device model (shapes only, e.g. built under
    ``torch.device("meta")``) fails deep inside tracing or scoring otherwise."""
    for kind, tensors in (("parameter", model.named_parameters()),
                          ("buffer", model.named_buffers())):
        for tensor_name, tensor in tensors:
            if tensor.is_meta:
                raise ValueError(
                    f"{name} has tensors on the meta device (shapes without values), e.g. "
                    f"{kind} {tensor_name}: load its weights first (model.to_empty(device='cpu'),"
                    " then load_state_dict)")
