"""The two pruning engines behind one interface, and the one place that chooses between them.

An :class:`Engine` builds a model's :class:`~pccfast.prune.graph_types.PruningGraph` and
applies a plan's kept channels to a copy of the model. ``"pccfast"``: its own fx graph
(:mod:`pccfast.prune.fx_graph`, :mod:`pccfast.prune.fx_surgery`); ``"torch_pruning"``:
Torch-Pruning's DependencyGraph (:mod:`pccfast.prune.tp_engine`), for models the first cannot
follow. A graph records its engine's name (``graph.engine``, stored in plans); everything after
the build asks :func:`engine_of` for the engine.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .counting import check_input_size
from .fx_graph import build_fx_graph
from .fx_surgery import fx_mask_hooks, slice_channels
from .graph_types import ENGINES, RESIDUAL_MODES, TorchPruningFailure, UnsupportedLayerError
from .tp_engine import apply_tp_plan, build_tp_graph, tp_mask_hooks, torch_pruning_missing


@dataclass(frozen=True)
class Engine:
    """name: as in plans and ``build_graph(engine=...)``.
    build: ``(model, input_size, residual, prune_classifier_input) -> PruningGraph``.
    apply: ``(model, graph, kept) -> pruned copy`` (kept: group name -> kept indices).
    mask_hooks: ``(model, graph, kept) -> hook handles`` zeroing the removed channels.
    exact_cost: whether ``graph.cost`` is exactly :func:`pccfast.count` of the pruned model
      (else the pruner counts the pruned model).
    missing: ``() -> str``, why the engine cannot run here ("" when it can)."""

    name: str
    build: Callable
    apply: Callable
    mask_hooks: Callable
    exact_cost: bool
    missing: Callable = str


PCCFAST = Engine("pccfast", build_fx_graph, slice_channels, fx_mask_hooks, exact_cost=True)
TORCH_PRUNING = Engine("torch_pruning", build_tp_graph, apply_tp_plan, tp_mask_hooks,
                       exact_cost=False, missing=torch_pruning_missing)
_BY_NAME = {e.name: e for e in (PCCFAST, TORCH_PRUNING)}


def engine_of(graph) -> Engine:
    """The engine that built ``graph``."""
    return _BY_NAME[graph.engine]


def build_graph(model: nn.Module, input_size=(1, 3, 32, 32), residual: str = "stream",
                prune_classifier_input: bool = False, engine: str = "auto"):
    """The pruning graph of ``model`` for inputs of ``input_size``.

    residual: ``"stream"`` (default, CHIP): residual streams are prunable groups with indices
    aligned across a stage; ``"inner"``: only the convs inside residual blocks are pruned.
    prune_classifier_input: also prune the channels read by a Linear layer (CHIP keeps them:
    VGG-16's last conv and ResNet's last stage stay whole).
    engine: ``"pccfast"`` (its own fx graph), ``"torch_pruning"`` (Torch-Pruning's
    DependencyGraph, for models the first cannot handle) or ``"auto"`` (the first, else the
    second).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    input_size = check_input_size(input_size)
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual must be one of {RESIDUAL_MODES}, got {residual!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine != "auto":
        return _BY_NAME[engine].build(model, input_size, residual, prune_classifier_input)
    try:
        return PCCFAST.build(model, input_size, residual, prune_classifier_input)
    except UnsupportedLayerError as exc:
        return _fall_back(model, input_size, residual, prune_classifier_input, exc)


def _fall_back(model, input_size, residual, prune_classifier_input, exc):
    """Torch-Pruning's graph of a model pccfast's own cannot follow (``exc`` says where)."""
    missing = TORCH_PRUNING.missing()
    if missing:
        raise UnsupportedLayerError(exc.layer, exc.what, f"{exc.why}; and {missing}") from exc
    warnings.warn(f"cannot prune through {exc.layer} ({exc.what}): {exc.why}; using "
                  "Torch-Pruning's DependencyGraph", stacklevel=3)
    try:
        graph = TORCH_PRUNING.build(model, input_size, residual, prune_classifier_input)
    except TorchPruningFailure as failure:
        raise UnsupportedLayerError(
            exc.layer, exc.what, exc.why,
            f"Torch-Pruning, pccfast's fallback, fails on {type(model).__name__} too "
            f"({failure.detail}), so this model cannot be pruned"
        ) from failure
    graph.fallback_reason = (f"pccfast's engine cannot prune through {exc.layer} ({exc.what}): "
                             f"{exc.why}")
    return graph
