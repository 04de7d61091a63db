"""How a module type takes part in pccfast's own pruning graph: one entry per layer type
(Torch-Pruning's customized pruners). The built-in types (convs, BatchNorm, Linear, norms,
activations, ...) are registered by :mod:`pccfast.prune.fx_layers`; a layer of your own registers
the same way, next to its class (the zoo's :class:`pccfast.models.PadShortcut` does)::

    from pccfast.prune.layer_rules import register_layer

    def shortcut_graph(builder, n):        # n: fx_groups.NodeInfo; builder: fx_graph.GraphBuilder
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


def register_layer(cls: type | str, graph: Callable, slice: Callable | None = None,
                   leaf: bool = False) -> None:
    """Registers (or replaces) the rule of module type ``cls`` and its subclasses; ``cls`` may
    be named ``"module.ClassName"`` (a class of an optional library such as timm)."""
    if not (isinstance(cls, type) or (isinstance(cls, str) and "." in cls)):
        raise TypeError(f"cls must be a module class or its 'module.ClassName', got "
                        f"{type(cls).__name__} {cls!r}")
    if not callable(graph) or (slice is not None and not callable(slice)):
        raise TypeError("graph (and slice, when given) must be callables")
    _RULES[cls] = LayerRule(graph, slice, bool(leaf))


def rule_for(module) -> LayerRule | None:
    """The rule of the most specific registered class of ``module``, or None."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls) or _RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule
    return None


def is_leaf(module) -> bool:
    """Whether the tracer keeps ``module`` as one call (its rule says so)."""
    rule = rule_for(module)
    return rule is not None and rule.leaf


def leaf_types() -> tuple[type, ...]:
    """The registered types the tracer keeps as single calls."""
    return tuple(cls for cls, rule in _RULES.items() if rule.leaf and isinstance(cls, type))


# -- splits along the channels: the module whose forward splits, and how its split resizes -----
_SPLIT_RULES: dict[str, Callable] = {}  # "module.path.ClassName" -> resize(module, widths)


def register_split(cls, resize: Callable) -> None:
    """How a module that splits its input along the channels (``torch.split(x, self.sizes, 1)``)
    is told its parts' new widths after pruning: ``resize(module, widths)``, ``widths`` the
    kept channels of each part in order. ``cls``: the class, or its ``"module.ClassName"``
    (for classes of optional libraries such as timm)."""
    if not callable(resize):
        raise TypeError(f"resize must be a callable, got {type(resize).__name__}")
    key = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    _SPLIT_RULES[key] = resize


def split_rule_for(module) -> Callable | None:
    """The resize rule of the most specific registered class of ``module``, or None."""
    for cls in type(module).__mro__:
        rule = _SPLIT_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule
    return None


def _mixed_conv(module, widths) -> None:  # timm's MixNet: one conv per part
    module.splits = list(widths)
    module.in_channels = sum(widths)


def _res2net_block(module, widths) -> None:  # timm's Res2Net: torch.split(out, self.width, 1)
    module.width = widths[0]


def _cross_stage(module, widths) -> None:  # timm's CSPNet: x.split(self.expand_chs // 2, 1)
    module.expand_chs = sum(widths)


register_split("timm.layers.mixed_conv2d.MixedConv2d", _mixed_conv)
register_split("timm.models.res2net.Bottle2neck", _res2net_block)
register_split("timm.models.cspnet.CrossStage", _cross_stage)
register_split("timm.models.cspnet.CrossStage3", _cross_stage)
