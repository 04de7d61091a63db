"""The traced graph that pccfast's own engine walks (:mod:`pccfast.prune.fx_graph`): the
model traced with ``torch.fx`` as it trains and run once on an example input for every node's
shape, and the questions a handler asks of a node (its tensor, where it sits, what it calls)."""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .._modules import eval_mode
from ..sites import trace
from .graph_types import UnsupportedLayerError


def tensor_meta(node):
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta if meta is not None and hasattr(meta, "shape") else None


def describe_node(node: fx.Node, modules) -> tuple[str, str]:
    if node.op == "call_module":
        return node.target, type(modules[node.target]).__name__
    target = getattr(node.target, "__name__", str(node.target))
    stack = list(node.meta.get("nn_module_stack", {}).keys())
    where = f"{stack[-1]}: {node.name}" if stack and stack[-1] else node.name
    return where, f"{node.op} {target}"


def trace_with_shapes(model: nn.Module, input_size) -> fx.GraphModule:
    try:
        graph = trace(model)
    except Exception as exc:
        raise UnsupportedLayerError(
            type(model).__name__, "torch.fx trace", f"{type(exc).__name__}: {exc}"
        ) from exc
    gm = fx.GraphModule(model, graph)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    prop = _ShapeProp(gm)
    try:
        with eval_mode(model, gm), torch.no_grad():
            prop.run(torch.randn(input_size, device=device, dtype=dtype))
    except Exception as exc:
        cause = exc.__cause__ or exc
        where = ""
        if prop.current is not None:
            part, what = describe_node(prop.current, dict(model.named_modules()))
            where = f" at {part} ({what})"
        raise ValueError(
            f"the model does not run on input_size {tuple(input_size)}{where}: "
            f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}; pass "
            "the input size it expects (the graph is traced as the model trains, so "
            "training-only branches such as auxiliary heads run too)"
        ) from exc
    return gm


class _ShapeProp(fx.Interpreter):
    """torch.fx's ShapeProp, quiet (it prints tracebacks) and remembering the node it runs."""

    current = None

    def run_node(self, n):
        self.current = n
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        elif isinstance(result, (tuple, list)) and result and all(
                isinstance(r, torch.Tensor) for r in result):
            n.meta["piece_shapes"] = [tuple(r.shape) for r in result]  # torch.split's pieces
        return result


def is_call(node: fx.Node, functions=(), methods=(), names=()) -> bool:
    if node.op == "call_method":
        return node.target in methods
    if node.op == "call_function":
        return node.target in functions or getattr(node.target, "__name__", None) in names
    return False


def call_dims(node: fx.Node, first: int = 1):
    """The dims argument of permute/mean-like calls, as a tuple (or None)."""
    args = node.args[first:]
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    if args and all(isinstance(a, int) for a in args):
        return tuple(args)
    value = node.kwargs.get("dims", node.kwargs.get("dim"))
    if isinstance(value, int):
        return (value,)
    return tuple(value) if isinstance(value, (tuple, list)) else None
