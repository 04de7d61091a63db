"""The function and method calls pccfast's own engine follows (:mod:`pccfast.prune.fx_graph`):
splits along the channels, attention (kept whole, a constant cost), and one handler per kind of
call (arithmetic, concatenation, permutes and reshapes, padding, pooling, indexing, norms), tried
in order. A handler ``(b, n)`` gets the walk's :class:`~pccfast.prune.fx_graph.GraphBuilder`
``b`` and the node's :class:`~pccfast.prune.fx_groups.NodeInfo` ``n``."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..sites import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS
from .counting import attention_cost, is_map_attention, is_token_attention, is_window_attention
from .fx_groups import Layout, NodeInfo, keep_if_normalised_over_channels
from .fx_trace import call_dims, is_call, tensor_meta
from .layer_rules import split_rule_for

_PASS_FUNCTIONS = tuple(ACTIVATION_FUNCTIONS) + (
    F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.interpolate,
)
_PASS_FUNCTION_NAMES = ("stochastic_depth", "drop_path")  # per-sample scaling
# Attention (heads, qkv, proj) is not pruned: the groups it reads and writes are kept whole.
_ATTENTION_MODULES = (nn.MultiheadAttention,)
_ATTENTION_FUNCTION_NAMES = ("shifted_window_attention", "scaled_dot_product_attention")
_GATE_FUNCTIONS = (torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus)
_PASS_METHODS = tuple(ACTIVATION_METHODS) + ("contiguous", "clone", "float", "to", "detach",
                                             "type_as", "half", "bfloat16")
_GATE_METHODS = ("sigmoid", "sigmoid_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add, operator.sub, torch.sub)
_ADD_METHODS = ("add", "add_", "sub", "sub_")
_FLATTEN_METHODS = ("flatten", "view", "reshape")
_MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul)
_MUL_METHODS = ("mul", "mul_")
_DIV_FUNCTIONS = (operator.truediv, torch.div)
_DIV_METHODS = ("div", "div_")
_CHANNEL_NORM_FUNCTIONS = (F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm)


_SPLIT_FUNCTIONS = (torch.split, torch.chunk, torch.tensor_split)
_SPLIT_METHODS = ("split", "chunk", "tensor_split")


def channel_split(b, n: NodeInfo) -> bool:
    """A split along the channels: each part carries the groups between its bounds (the
    writers' outputs cut where a bound falls inside one of them).

    The split's sizes live in the module whose forward splits (the *owner*); after pruning it
    is told its parts' widths by its rule (:func:`pccfast.prune.layer_rules.register_split`).
    A split into equal parts by one size (``torch.split(x, self.width, 1)``, ``chunk``) must
    stay equal: its parts are pruned with one index set. A split whose owner has no rule keeps
    its parts' channels (chunk needs none: equal parts stay equal)."""
    if n.xl is None or not is_call(n.node, _SPLIT_FUNCTIONS, _SPLIT_METHODS):
        return False
    node = n.node
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    x_meta = tensor_meta(n.x)
    shapes = node.meta.get("piece_shapes")
    if not (isinstance(dim, int) and x_meta is not None and shapes is not None):
        raise n.error("splits along a dim or into parts the pruner cannot tell")
    if n.x in b.gated:
        b.gated.add(node)
    if dim % len(x_meta.shape) != n.xl.dim:  # along other dims: every part keeps the channels
        b.pieces[node] = [n.xl] * len(shapes)
        return True
    sizes = [int(shape[n.xl.dim]) for shape in shapes]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    how = node.args[1] if len(node.args) > 1 else node.kwargs.get(
        "split_size_or_sections", node.kwargs.get("chunks", node.kwargs.get("split_size")))
    equal = isinstance(how, int)  # one size (or a number of chunks): the parts stay equal
    owner = list(node.meta.get("nn_module_stack", {}) or [""])[-1]
    module = b.modules.get(owner)
    rule = split_rule_for(module) if module is not None else None
    chunked = is_call(node, (torch.chunk,), ("chunk",))
    kept = ""
    if rule is None and not chunked:
        kept = (f"split at {n.name} by {type(module).__name__}, whose split sizes pccfast "
                "cannot change (register a resize rule: "
                "pccfast.prune.layer_rules.register_split)")
    elif equal and len(set(sizes)) > 1:
        kept = f"split at {n.name} into unequal parts {sizes} by one size"
    parts = b.split(n.xl, bounds, n)
    if equal and not kept:  # the parts must keep one width: one index set for them all,
        relative = {o for p in parts for _, o in b.offsets(p.segs)}  # so cut alike
        b.cut(n.xl, sorted({start + r for start in bounds[:-1] for r in relative}), n)
    if equal and not kept:
        for segs in zip(*(p.segs for p in parts)):
            for s in segs[1:]:
                b.groups.union(segs[0], s, n.name, n.what, stream=False)
    if kept:
        for s in n.xl.segs:
            b.groups.keep(s, kept)
    elif rule is not None:
        b.splits.append((owner, [p.segs for p in parts]))
    b.pieces[node] = parts
    return True


def split_piece(b, n: NodeInfo) -> bool:
    """``parts[i]`` of a split: that part's groups."""
    node = n.node
    if not (node.op == "call_function" and node.target is operator.getitem
            and n.x in b.pieces and isinstance(node.args[1], int)):
        return False
    b.follow(n, source=n.x, layout=b.pieces[n.x][node.args[1]])
    return True


# -- attention: kept whole, counted as a constant ---------------------------------------------
def is_attention(b, n: NodeInfo) -> bool:
    node = n.node
    return (isinstance(n.module, _ATTENTION_MODULES) or is_token_attention(n.module)
            or is_call(node, names=_ATTENTION_FUNCTION_NAMES)
            or (node.op == "call_function" and node.target is operator.getitem
                and n.x in b.attention_tuples))


def add_attention(b, n: NodeInfo) -> None:
    node = n.node
    called = (isinstance(n.module, _ATTENTION_MODULES) or is_token_attention(n.module)
              or is_call(node, names=_ATTENTION_FUNCTION_NAMES))
    why = (f"read or written by the attention {n.name} ({n.what}): pccfast keeps attention "
           "heads and the stream they read")
    for a in n.inputs:
        for s in (b.chan[a].segs if a in b.chan else b.flat[a][0]):
            b.groups.keep(s, why)
    if called:  # not the getitem of its (output, weights)
        owner = node.target if node.op == "call_module" else (
            list(node.meta.get("nn_module_stack", {}) or [""])[-1])
        module = b.modules.get(owner)
        if not (isinstance(module, nn.MultiheadAttention) or (
                module is not None and (is_window_attention(module)
                                        or is_token_attention(module)))):
            raise n.error(f"attention inside {type(module).__name__}, whose projections "
                          "pccfast cannot count (it counts nn.MultiheadAttention and Swin's "
                          "window attention)")
        given = list(node.args) + [node.kwargs[k] for k in ("query", "key", "value", "x")
                                   if k in node.kwargs]
        shapes = [tuple(tensor_meta(a).shape) for a in given[:3]
                  if tensor_meta(a) is not None]
        params, macs = attention_cost(module, shapes)
        first = b.calls.get(owner, 1) == 1 if node.op == "call_module" else (
            owner not in b.attention_seen)
        b.attention_seen.add(owner)
        b.attention_count += 1
        b.attention_widths.update(int(tensor_meta(a).shape[b.chan[a].dim if a in b.chan
                                                             else -1])
                                  for a in n.inputs[:1] if tensor_meta(a) is not None)
        b.terms.append((owner, None, None, params, macs, False, first, 1))
    if n.meta is None:
        b.attention_tuples.add(node)  # MultiheadAttention's (output, weights)
    elif len(n.meta.shape) >= 2:
        map_attention = n.module is not None and is_map_attention(n.module)  # (N, C, H, W)
        dim = 1 if map_attention else len(n.meta.shape) - 1
        out = b.groups.new(int(n.meta.shape[dim]), "other", n.pos)
        b.groups.keep(out, why)
        b.chan[node] = Layout((out,), dim)


# -- function and method handlers, tried in order; False: not this handler's case ----------
CALL_HANDLERS: list = []


def _on_call(functions=(), methods=(), names=()):
    """Registers a handler of calls to these functions / methods / function names."""
    def register(handler):
        CALL_HANDLERS.append(((tuple(functions), tuple(methods), tuple(names)), handler))
        return handler
    return register


@_on_call(_PASS_FUNCTIONS + _GATE_FUNCTIONS, _PASS_METHODS + _GATE_METHODS,
          _PASS_FUNCTION_NAMES)
def _pass_call(b, n: NodeInfo) -> bool:
    if not (len(n.inputs) == 1 and n.inputs[0] is n.x):
        return False
    b.follow(n)
    if is_call(n.node, _GATE_FUNCTIONS, _GATE_METHODS):
        b.gated.add(n.node)
    return True


@_on_call(_ADD_FUNCTIONS + _MUL_FUNCTIONS + _DIV_FUNCTIONS,
          _ADD_METHODS + _MUL_METHODS + _DIV_METHODS)
def _arithmetic_call(b, n: NodeInfo) -> bool:
    """x + y joins two groups (a residual stream); x * y a gate; x * c, x + c keep x's."""
    node = n.node
    operands = list(node.args[:2])
    is_add = is_call(node, _ADD_FUNCTIONS, _ADD_METHODS)
    is_div = is_call(node, _DIV_FUNCTIONS, _DIV_METHODS)
    tracked = [a for a in operands if isinstance(a, fx.Node) and a in b.chan]
    if len(tracked) == 2:
        return _join(b, n, tracked, is_add, is_div)
    if len(tracked) == 1 and (tracked[0] is operands[0] or not is_div):
        t = tracked[0]
        other = operands[1] if operands[0] is t else operands[0]
        layout = b.chan[t]
        other_meta = tensor_meta(other)
        if other_meta is not None and len(other_meta.shape) > 0:
            shape = tuple(other_meta.shape)
            at = layout.dim - (len(n.meta.shape) - len(shape))
            if 0 <= at < len(shape) and shape[at] != 1:
                for s in layout.segs:
                    b.groups.keep(s, f"scaled by a per-channel tensor at {n.name}, which "
                                  "pccfast does not slice")
        elif isinstance(other, fx.Node):
            raise n.error("an operand of unknown shape")
        b.chan[node] = layout
        zero = isinstance(other, (int, float)) and other == 0
        if t in b.gated or (is_add and not zero):
            b.gated.add(node)  # x + c: a removed channel reads c in the masked original
        return True
    return False


def _join(b, n: NodeInfo, tracked, is_add: bool, is_div: bool) -> bool:
    """Two tensors with channels combined elementwise."""
    node = n.node
    la, lb = b.chan[tracked[0]], b.chan[tracked[1]]
    if is_div:
        raise n.error("divides by a tensor with channels")
    wa, wb = b.width(la.segs), b.width(lb.segs)
    if la.dim != lb.dim:
        raise n.error("combines different channel dims")
    if not is_add and 1 in (wa, wb) and wa != wb:  # a (N, 1, H, W) spatial gate
        b.follow(n, tracked[0] if wb == 1 else tracked[1])
        return True
    if wa != wb:
        raise n.error(f"combines {wa} with {wb} channels")
    bounds = sorted({o for s, o in b.offsets(la.segs)} | {o for s, o in b.offsets(lb.segs)})
    b.cut(la, bounds, n)  # both cut at the same positions: the parts pair up
    b.cut(lb, bounds, n)
    roots = [b.groups.union(x, y, n.name, n.what, stream=is_add)
             for x, y in zip(la.segs, lb.segs)]
    b.write(n, *roots, dim=la.dim)
    if is_add:
        b.add_nodes.append(node)
        if tracked[0] in b.gated or tracked[1] in b.gated:
            b.gated.add(node)
    elif tracked[0] in b.gated and tracked[1] in b.gated:
        b.gated.add(node)
    return True


@_on_call(names=("_patch_merging_pad",))
def _patch_merging_call(b, n: NodeInfo) -> bool:
    """Swin's patch merging: zero-pads H and W, concatenates 4 strided views on channels."""
    if not (len(n.inputs) == 1 and n.inputs[0] is n.x) or n.xl is None:
        return False
    b.follow(n, layout=Layout(n.xl.segs * 4, n.xl.dim))
    return True


@_on_call((torch.cat,))
def _cat_call(b, n: NodeInfo) -> bool:
    """Along channels: one segment per input; along tokens (ViT's class token): one group."""
    node = n.node
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = len(n.meta.shape)
    if isinstance(tensors, (list, tuple)) and all(
            isinstance(a, fx.Node) and a in b.chan for a in tensors):
        layouts = [b.chan[a] for a in tensors]
        if all(lay.dim == dim % rank for lay in layouts):
            b.chan[node] = Layout(tuple(s for lay in layouts for s in lay.segs), dim % rank)
            if any(a in b.gated for a in tensors):
                b.gated.add(node)
            return True
    if isinstance(tensors, (list, tuple)) and all(isinstance(a, fx.Node) for a in tensors):
        tracked = [a for a in tensors if a in b.chan]
        layouts = [b.chan[a] for a in tracked]
        if tracked and all(lay.dim != dim % rank and lay.dim == layouts[0].dim
                           and len(lay.segs) == 1 for lay in layouts):
            root = layouts[0].segs[0]
            for lay in layouts[1:]:
                root = b.groups.union(root, lay.segs[0], n.name, n.what, stream=False)
            if len(tracked) < len(tensors):
                b.groups.keep(root, f"concatenated with a tensor the pruner does not "
                              f"slice (a class token) at {n.name}")
            b.write(n, root, dim=layouts[0].dim)
            if any(a in b.gated for a in tracked):
                b.gated.add(node)
            return True
    raise n.error("concatenates along another dim or with untracked tensors")


@_on_call((torch.permute,), ("permute",))
def _permute_call(b, n: NodeInfo) -> bool:
    dims = call_dims(n.node)
    if n.xl is None or dims is None:
        return False
    dims = tuple(d % len(n.meta.shape) for d in dims)
    b.follow(n, layout=Layout(n.xl.segs, dims.index(n.xl.dim)))
    return True


@_on_call((torch.transpose,), ("transpose",))
def _transpose_call(b, n: NodeInfo) -> bool:
    """Two dims swapped (timm's patch embedding: ``(N, C, HW) -> (N, HW, C)``)."""
    node = n.node
    dims = node.args[1:3] if len(node.args) >= 3 else (node.kwargs.get("dim0"),
                                                        node.kwargs.get("dim1"))
    if n.xl is None or not all(isinstance(d, int) for d in dims):
        return False
    rank = len(n.meta.shape)
    a, c = (d % rank for d in dims)
    dim = c if n.xl.dim == a else a if n.xl.dim == c else n.xl.dim
    b.follow(n, layout=Layout(n.xl.segs, dim))
    return True


@_on_call((torch.flatten,), _FLATTEN_METHODS)
def _flatten_call(b, n: NodeInfo) -> bool:
    """(N, C, H, W) -> (N, C*H*W) for a classifier, or (N, C, H*W) tokens; else a regrouping."""
    xl, meta = n.xl, n.meta
    if xl is None or xl.dim != 1:
        return False
    in_shape = tensor_meta(n.x).shape
    if len(meta.shape) == 2 and int(meta.shape[1]) == math.prod(in_shape[1:]):
        b.flat[n.node] = (xl.segs, math.prod(in_shape[2:]))
        if n.x in b.gated:
            b.gated.add(n.node)
        return True
    if tuple(meta.shape[:2]) == tuple(in_shape[:2]):  # merges H and W (ViT's tokens)
        b.follow(n)
        return True
    if len(meta.shape) > 2 and tuple(meta.shape[2:]) != tuple(in_shape[2:]):
        raise n.error(f"reshapes the {in_shape[1]} channels into {tuple(meta.shape[1:])} "
                      "(a channel shuffle or split regroups channels)")
    return False


@_on_call((torch.flatten, torch.reshape), _FLATTEN_METHODS)
def _channels_last_reshape_call(b, n: NodeInfo) -> bool:
    """A reshape of a channels-last tensor that keeps the channels last (timm's Swin windows),
    or merges the dims just before them into the channels (patch merging: one segment run per
    merged position)."""
    xl, out = n.xl, tuple(n.meta.shape)
    if xl is None or not isinstance(n.x, fx.Node) or tensor_meta(n.x) is None:
        return False
    shape = tuple(tensor_meta(n.x).shape)
    if xl.dim != len(shape) - 1 or len(out) < 2:
        return False
    if out[-1] == shape[-1]:
        b.follow(n, layout=Layout(xl.segs, len(out) - 1))
        return True
    merged = out[-1] // shape[-1]
    for k in range(len(shape) - 1):
        if (out[-1] == merged * shape[-1] and math.prod(shape[k:-1]) == merged
                and shape[:k] == out[:-1]):
            b.follow(n, layout=Layout(xl.segs * merged, len(out) - 1))
            return True
    return False


@_on_call((F.pad,))
def _pad_call(b, n: NodeInfo) -> bool:
    """Padding of other dims than the channels: channel ``c`` stays ``c``; a removed (zero)
    channel stays zero unless padded with a nonzero constant."""
    node = n.node
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    if n.xl is None or not isinstance(pad, (tuple, list)) or not (len(n.inputs) == 1
                                                                  and n.inputs[0] is n.x):
        return False
    at = 2 * (len(n.meta.shape) - 1 - n.xl.dim)
    if any(pad[at:at + 2]):
        return False
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    b.follow(n)
    if mode == "constant" and value not in (None, 0, 0.0):
        b.gated.add(node)
    return True


@_on_call((torch.roll,), ("roll",))
def _roll_call(b, n: NodeInfo) -> bool:
    """A cyclic shift along other dims than the channels (Swin's shifted windows)."""
    node = n.node
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
    dims = (dims,) if isinstance(dims, int) else dims
    if n.xl is None or not isinstance(dims, (tuple, list)) or not dims:
        return False
    if n.xl.dim in {d % len(n.meta.shape) for d in dims}:
        return False
    b.follow(n)
    return True


@_on_call((torch.mean, torch.amax), ("mean", "amax"))
def _reduce_call(b, n: NodeInfo) -> bool:
    """A mean/max over spatial dims (global pooling): channels stay."""
    if n.xl is None:
        return False
    in_shape = tensor_meta(n.x).shape
    dims = {d % len(in_shape) for d in (call_dims(n.node) or ())}
    if n.xl.dim in dims or not dims or 0 in dims:
        return False
    if len(n.meta.shape) == len(in_shape):
        b.chan[n.node] = n.xl  # keepdim
    elif len(n.meta.shape) == 2 and (n.xl.dim == 1 or (
            n.xl.dim == len(in_shape) - 1 and dims == set(range(1, n.xl.dim)))):
        b.flat[n.node] = (n.xl.segs, 1)  # (N, C) from (N, C, H, W) or (N, H, W, C)
    else:
        raise n.error("reduces to an unexpected shape")
    if n.x in b.gated:
        b.gated.add(n.node)
    return True


@_on_call((operator.getitem,))
def _getitem_call(b, n: NodeInfo) -> bool:
    """Basic indexing that keeps every channel."""
    if n.xl is None:
        return False
    at = _index_channel_dim(n.node.args[1], len(tensor_meta(n.x).shape), n.xl.dim)
    if at is None:
        return False
    b.follow(n, layout=Layout(n.xl.segs, at))
    return True


@_on_call(_CHANNEL_NORM_FUNCTIONS)
def _channel_norm_call(b, n: NodeInfo) -> bool:
    if n.xl is None:
        return False
    node = n.node
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    if node.target is not F.layer_norm or not isinstance(shape, (tuple, list)):
        shape = None
    keep_if_normalised_over_channels(b.groups, n.xl, len(n.meta.shape), shape, n.name, n.what)
    b.chan[node] = n.xl
    return True


def _index_channel_dim(index, rank: int, dim: int) -> int | None:
    """The channel dim after ``x[index]`` (basic indexing that keeps every channel), or None."""
    index = index if isinstance(index, tuple) else (index,)
    if not all(i is Ellipsis or isinstance(i, (int, slice)) for i in index) or (
            sum(i is Ellipsis for i in index) > 1):
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (rank - len(index) + 1) + index[at + 1:]
    index = tuple(index) + (slice(None),) * (rank - len(index))
    if len(index) != rank or index[dim] != slice(None):
        return None
    return dim - sum(isinstance(i, int) for i in index[:dim])
