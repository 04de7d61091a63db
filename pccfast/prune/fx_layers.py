"""The module types pccfast's own engine knows (:mod:`pccfast.prune.fx_graph`), one handler per
type registered with :func:`pccfast.prune.layer_rules.register_layer`: convs, BatchNorm, Linear,
norms over the channels, flatten, and the layers that keep every channel where it is. A handler
``(b, n)`` gets the walk's :class:`~pccfast.prune.fx_graph.GraphBuilder` ``b`` and the node's
:class:`~pccfast.prune.fx_groups.NodeInfo` ``n``."""

from __future__ import annotations

import math

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..sites import ACTIVATION_MODULES
from .fx_groups import Layout, NodeInfo, keep_if_normalised_over_channels
from .fx_surgery import UNPRUNABLE_CONV_HINT, unprunable_conv
from .fx_trace import tensor_meta
from .graph_types import Port, UnsupportedLayerError
from .layer_rules import register_layer

# Modules and functions that keep every channel where it is (elementwise or spatial only) and
# map 0 to 0, so a removed channel is the same as a zeroed one.
_PASS_MODULES = ACTIVATION_MODULES + (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d,
    nn.Upsample,
)
# Channelwise but not zero-preserving (gates): a removed channel reads as sigmoid(0) = 0.5 in the
# masked original, so such a tensor may only be multiplied with one whose channels are zero.
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                  nn.modules.instancenorm._InstanceNorm)


# -- module handlers: one per layer type (pccfast.prune.layer_rules) --------------------------
def _conv_graph(b, n: NodeInfo) -> None:
    module, node, xl = n.module, n.node, n.xl
    if xl is None or xl.dim != 1:
        raise n.error("its input has no channel group")
    inexact = unprunable_conv(module)
    if inexact:  # e.g. timm's ScaledStdConv2d (NFNet)
        raise UnsupportedLayerError(n.name, n.what, inexact, UNPRUNABLE_CONV_HINT)
    g_count, c_in, c_out = module.groups, module.in_channels, module.out_channels
    spatial = math.prod(n.meta.shape) // c_out
    kernel = math.prod(module.kernel_size)
    bias = module.bias is not None
    if g_count > 1 and g_count == c_in == c_out:  # depthwise: channel c reads channel c
        for g, offset in b.offsets(xl.segs):
            b.group(g).producers.append(Port(node.target, "dw", 1, offset))
            b.producer_node.setdefault(g, []).append(node)
            b.terms.append((node.target, None, g, kernel, spatial * kernel, bias, b.first(n), 1))
        b.share(n, xl, None)
        b.chan[node] = xl
        return
    if g_count > 1 and c_out != c_in and c_in == g_count:
        raise n.error("a depthwise conv with a channel multiplier")
    b.read_gated(n.x, f"read by {n.name} through a gate")
    outs = b.new_groups(c_out, "conv", n, pooled=n.x in b.pooled_nodes)
    if g_count > 1:
        if len(outs) > 1:
            raise n.error("a grouped conv whose outputs a later split reads apart")
        b.groups.add_chunks(b.single(xl, n), g_count, n.name, n.what)
        b.groups.add_chunks(outs[0], g_count, n.name, n.what)
    for i, (s, offset) in enumerate(b.offsets(xl.segs)):
        b.group(s).consumers.append(Port(node.target, "conv_in", 1, offset))
        for out in outs:
            b.terms.append((node.target, s, out, kernel, spatial * kernel, bias and i == 0,
                            b.first(n), g_count))
    for out, offset in b.offsets(outs):
        b.group(out).producers.append(Port(node.target, "conv_out", 1, offset))
        b.producer_node.setdefault(out, []).append(node)
    b.share(n, xl, outs)
    b.write(n, *outs)


def _batch_norm_graph(b, n: NodeInfo) -> None:
    x, xl, node = n.x, n.xl, n.node
    per_channel = math.prod(n.meta.shape) // n.module.num_features
    layout = xl.segs if xl is not None and xl.dim == 1 else (
        b.flat[x][0] if x in b.flat and b.flat[x][1] == 1 else None)
    if layout is None:
        raise n.error("normalises a flattened tensor")
    for s, offset in b.offsets(layout):
        b.group(s).producers.append(Port(node.target, "bn", 1, offset))
        b.norm_calls.append((s, per_channel, node.target))
    b.share(n, xl or Layout(layout), None)
    if xl is not None:
        b.chan[node] = xl
    else:
        b.flat[node] = b.flat[x]
    # the masked original zeroes a BN's removed outputs: no gate passes


def _linear_graph(b, n: NodeInfo) -> None:
    """A classifier on (N, features), a pointwise layer on a channels-last map or tokens, or a
    layer on constants (a fixed cost)."""
    module, node, x, xl = n.module, n.node, n.x, n.xl
    bias = module.bias is not None
    rows = math.prod(n.meta.shape) // module.out_features
    if b.constant(n):  # on a table of constants (Swin V2's cpb_mlp): a fixed cost
        fan = module.in_features * module.out_features
        b.terms.append((node.target, None, None, fan + (module.out_features if bias else 0),
                        rows * fan, False, b.first(n), 1))
        return
    x_meta = tensor_meta(x)
    x_shape = tuple(x_meta.shape) if x_meta is not None else ()
    pointwise = xl is not None and len(x_shape) >= 3 and xl.dim == len(x_shape) - 1
    if x in b.flat:
        segs, factor = b.flat[x]
    elif xl is not None and (len(x_shape) == 2 or pointwise):
        segs, factor = xl.segs, 1
    else:
        raise n.error("its input is not (N, features) or a channels-last map")
    b.read_gated(x, f"read by {n.name} through a gate")
    out = b.new_group(module.out_features, "conv" if pointwise else "linear", n,
                      pooled=x in b.pooled_nodes)
    for i, (s, offset) in enumerate(b.offsets(segs)):
        b.group(s).consumers.append(Port(node.target, "linear_in", factor, offset))
        if not pointwise:
            b.classifier_groups.add(s)
        b.terms.append((node.target, s, out, factor, rows * factor, bias and i == 0,
                        b.first(n), 1))
    dim = len(x_shape) - 1 if pointwise else 1
    b.group(out).producers.append(Port(node.target, "linear_out", dim=-1 if pointwise else 1))
    if pointwise:
        b.producer_node.setdefault(out, []).append(node)
    b.share(n, Layout(segs), out)
    if pointwise:
        b.write(n, out, dim=dim)
    else:
        b.flat[node] = ((out,), 1)


def _channel_norm_graph(b, n: NodeInfo) -> None:
    if n.xl is None:
        if n.inputs:
            raise n.error("unknown module type")
        return
    shape = n.module.normalized_shape if isinstance(n.module, nn.LayerNorm) else None
    keep_if_normalised_over_channels(b.groups, n.xl, len(n.meta.shape), shape, n.name, n.what)
    b.chan[n.node] = n.xl


def pass_graph(b, n: NodeInfo) -> None:
    """Elementwise or spatial layers; gates (sigmoid) make their output gated."""
    if isinstance(n.module, nn.PReLU) and n.module.num_parameters != 1:
        raise n.error("per-channel slopes")
    if n.xl is not None:
        b.chan[n.node] = n.xl
    elif n.x in b.flat:
        b.flat[n.node] = b.flat[n.x]
    if n.x in b.gated or isinstance(n.module, _GATE_MODULES):
        b.gated.add(n.node)


def _flatten_graph(b, n: NodeInfo) -> None:
    xl, module = n.xl, n.module
    if xl is not None and xl.dim == 1 and module.start_dim == 1 and module.end_dim == -1:
        b.flat[n.node] = (xl.segs, math.prod(tensor_meta(n.x).shape[2:]))
        if n.x in b.gated:
            b.gated.add(n.node)
        return
    raise n.error("flattens other than from dim 1")


register_layer(nn.Conv2d, graph=_conv_graph, leaf=True)
register_layer(_BatchNorm, graph=_batch_norm_graph, leaf=True)
register_layer(nn.Linear, graph=_linear_graph, leaf=True)
register_layer(nn.Flatten, graph=_flatten_graph)
for _cls in _CHANNEL_NORMS:
    register_layer(_cls, graph=_channel_norm_graph)
for _cls in _PASS_MODULES + _GATE_MODULES:
    register_layer(_cls, graph=pass_graph)
