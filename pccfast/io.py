"""Saving and loading pruned models: ``pccfast.save(model, path)`` / ``pccfast.load(path)``.

A pruned model's architecture is its per-layer widths, which no state dict records. For zoo
models (:mod:`pccfast.models`) the file holds the recipe (builder name and keywords, and every
pruning plan applied since, with its kept indices) beside the state dict: loading rebuilds the
network, replays the plans and loads the weights, with ``torch.load(weights_only=True)`` only,
in a fresh process and without any calibration data. A model marked with
:func:`pccfast.models._common.record_description` (the pipeline's ``package.module:factory``
models) is stored the same way with the caller's description instead of a zoo builder, and
loads with ``build=`` (the caller, not the file, says which code builds it). Other models are
stored as a pickled module, which loads only with ``allow_pickle=True`` (unpickling runs code:
trusted files only).

Every write goes to a temporary file in the target's directory, then ``os.replace``: a crash
leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import os

import torch
from torch import nn

from .atomic import atomic_torch_save
from ._modules import unwrap_parallel
from .models._common import RECIPE_ATTRIBUTE, record_description

MODEL_FORMAT = "pccfast.model"
MODEL_VERSION = 1


def read_torch_file(path, what: str):
    """``torch.load(path, weights_only=True)`` on the CPU; unreadable files are a ValueError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zipfile, pickle, EOF and format errors alike
        raise ValueError(f"{path} is not a readable {what} file (truncated, damaged or not "
                         f"written by pccfast): {type(exc).__name__}: {exc}") from exc


def save(model: nn.Module, path) -> None:
    """Writes ``model`` (architecture and weights) to ``path`` atomically.

    Zoo models, pruned or not, are stored as recipe + plans + state dict; other models as a
    pickled module (see the module docstring). A DDP/DataParallel/torch.compile wrapper is
    unwrapped.
    """
    model = unwrap_parallel(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    recipe = getattr(model, RECIPE_ATTRIBUTE, None)
    payload = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "class": type(model).__name__}
    if isinstance(recipe, dict) and "external" in recipe:
        payload.update(kind="external", description=dict(recipe["external"]),
                       plans=list(recipe.get("plans", [])), state_dict=state)
    elif isinstance(recipe, dict):
        payload.update(kind="recipe", builder=recipe["builder"], kwargs=dict(recipe["kwargs"]),
                       plans=list(recipe.get("plans", [])), state_dict=state)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        payload.update(kind="module",
                       module=torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
    atomic_torch_save(payload, path)


def load(path, allow_pickle: bool = False, map_location="cpu", build=None) -> nn.Module:
    """The model written by :func:`save`, on ``map_location``, in eval mode.

    allow_pickle: also load files that hold a pickled module (models outside the zoo); only
    for trusted files. build: ``build(description) -> nn.Module``, the unpruned model of a file
    saved with a description (see the module docstring). A truncated, damaged or foreign file
    is a ValueError.
    """
    payload = read_torch_file(path, "pccfast model")
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} was not written by pccfast.save (no 'format': "
                         f"'{MODEL_FORMAT}' entry); a plain state dict loads with "
                         "model.load_state_dict(torch.load(path))")
    if payload.get("version") != MODEL_VERSION:
        raise ValueError(f"{path}: pccfast model format version {payload.get('version')} is not "
                         f"supported (this pccfast reads version {MODEL_VERSION})")
    kind = payload.get("kind")
    if kind == "recipe":
        model = _rebuild(payload, path)
    elif kind == "external":
        model = _rebuild_external(payload, path, build)
    elif kind == "module":
        if not allow_pickle:
            raise ValueError(f"{path} holds a pickled {payload.get('class')} (not a pccfast zoo "
                             "model); unpickling runs code, so pass allow_pickle=True if you "
                             "trust the file")
        data = payload["module"].numpy().tobytes()
        model = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    else:
        raise ValueError(f"{path}: unknown pccfast model kind {kind!r}")
    return model.to(map_location).eval()


def _rebuild_external(payload: dict, path, build) -> nn.Module:
    description = payload.get("description")
    if build is None:
        raise ValueError(f"{path} holds the weights of a model built outside the zoo "
                         f"({description}); pass build= (description -> the unpruned model) "
                         "to load it")
    model = build(description)
    if not isinstance(model, nn.Module):
        raise TypeError(f"build returned a {type(model).__name__}, not a torch.nn.Module")
    record_description(model, description)
    return _pruned_with_weights(model, payload, path, "model")


def _rebuild(payload: dict, path) -> nn.Module:
    from .models import BUILDERS

    builder = payload.get("builder")
    if builder not in BUILDERS:
        raise ValueError(f"{path}: unknown zoo builder {builder!r} (known: {tuple(BUILDERS)})")
    return _pruned_with_weights(BUILDERS[builder](**payload["kwargs"]), payload, path, builder)


def _pruned_with_weights(model: nn.Module, payload: dict, path, what: str) -> nn.Module:
    """The unpruned ``model`` with the file's pruning plans applied, then its weights loaded."""
    from .prune.plan import Plan
    from .prune.surgery import apply_plan

    for plan in payload["plans"]:
        model = apply_plan(model, Plan.from_dict(plan))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: the weights do not fit the rebuilt {what}: {exc}") from exc
    return model
