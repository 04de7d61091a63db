"""How a module type takes part in pccfast's own pruning graph: one entry per layer type
(Torch-Pruning's customized pruners). The built-in types (convs, BatchNorm, Linear, norms,
activations, ...) are registered by :mod:`pccfast.prune.fx_graph`; a layer of your own registers
the same way, next to its class (the zoo's :class:`pccfast.models.PadShortcut` does)::

    from pccfast.prune.layer_rules import register_layer

    def shortcut_graph(builder, n):        # n: a fx_graph.NodeInfo; builder: fx_graph.GraphBuilder
        ...                                # add the layer's ports, say what channels it writes
    def shortcut_slice(module, kept):      # kept: role -> kept indices (None: unchanged)
        ...
    register_layer(PadShortcut, graph=shortcut_graph, slice=shortcut_slice, leaf=True)

This module imports nothing from pccfast, so low floors (the tracer in :mod:`pccfast.sites`)
may ask it which types to keep as single calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class LayerRule:
    """graph: ``(builder, node_info) -> None``, adds the layer to the channel graph.
    slice: ``(module, {role: kept indices or None}) -> None``, the surgery of a layer whose
    ports use roles of its own (None: only the built-in roles, sliced by the surgery).
    leaf: the tracer keeps the module as one call instead of following its forward."""

    graph: Callable
    slice: Callable | None = None
    leaf: bool = False


_RULES: dict[type, LayerRule] = {}


def register_layer(cls: type, graph: Callable, slice: Callable | None = None,
                   leaf: bool = False) -> None:
    """Registers (or replaces) the rule of module type ``cls`` and its subclasses."""
    if not isinstance(cls, type):
        raise TypeError(f"cls must be a module class, got {type(cls).__name__}")
    if not callable(graph) or (slice is not None and not callable(slice)):
        raise TypeError("graph (and slice, when given) must be callables")
    _RULES[cls] = LayerRule(graph, slice, bool(leaf))


def rule_for(module) -> LayerRule | None:
    """The rule of the most specific registered class of ``module``, or None."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


def leaf_types() -> tuple[type, ...]:
    """The registered types the tracer keeps as single calls."""
    return tuple(cls for cls, rule in _RULES.items() if rule.leaf)
