"""Which channels move together: the pruning graph of a CNN (the structure part of pruning).

The model is traced with ``torch.fx`` and run once on an example input (for shapes). Every
tensor with channels (dim 1) belongs to a *channel group*; a group is a set of channel
positions that must be pruned with one index set:

- a conv's output channels, carried through BatchNorm, activations and pooling, read by the
  next conv (its input channels) or, after a flatten, by a Linear layer (``factor`` features per
  channel);
- a *residual stream*: tensors added together share one group, so the stem, every block's last
  conv and the downsample convs of a stage keep aligned indices;
- an option-A shortcut (:class:`pccfast.models.PadShortcut`) reads one group and writes another
  (channel ``c`` to ``c + pad``), so the two stages' streams stay separate groups.

Each group also knows its *scored sites* (SPEC section 3, CHIP's choice): the post-ReLU output of
each conv producing it, or the max-pool output where a pool follows the ReLU, and for a stream
the post-ReLU output of every residual add.

Anything else that touches a prunable tensor (concatenation, grouped convs, multiplications,
unknown modules) is an :class:`UnsupportedLayerError` naming it; :func:`build_graph` with
``engine="auto"`` then hands the model to Torch-Pruning (see :mod:`pccfast.prune.tp_engine`).
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..models._common import eval_mode
from ..models.resnet_cifar import PadShortcut
from ..sites import Site
from .counting import check_input_size

ENGINES = ("auto", "pccfast", "torch_pruning")
RESIDUAL_MODES = ("stream", "inner")

# Modules and functions that keep every channel where it is (elementwise or spatial only) and
# map 0 to 0, so a removed channel is the same as a zeroed one.
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Tanh, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = (F.relu, F.relu6, torch.relu, torch.relu_)
_PASS_FUNCTIONS = _RELU_FUNCTIONS + (
    F.leaky_relu, F.silu, F.gelu, F.hardswish, torch.tanh, F.dropout, F.max_pool2d,
    F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.nn.functional.dropout2d,
)
_PASS_METHODS = ("relu", "relu_", "contiguous", "clone", "float", "to", "detach")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_FLATTEN_METHODS = ("flatten", "view", "reshape")
_SCALE_FUNCTIONS = (operator.mul, operator.truediv, torch.mul)
_SCALE_METHODS = ("mul", "mul_", "div", "div_")
_NORMS = (nn.BatchNorm2d, nn.BatchNorm1d)


class UnsupportedLayerError(ValueError):
    """The structural pruner met a layer it cannot prune through; ``layer`` names it."""

    def __init__(self, layer: str, what: str, why: str, hint: str | None = None):
        self.layer, self.what, self.why = layer, what, why
        if hint is None:
            hint = ("pccfast's own pruner handles Conv2d (groups=1), BatchNorm, activations, "
                    "pooling, residual adds, flatten and Linear; other models go through "
                    "Torch-Pruning (engine='torch_pruning', pip install torch-pruning)")
        super().__init__(f"cannot prune through {layer} ({what}): {why}. {hint}")


class TorchPruningFailure(ValueError):
    """Torch-Pruning raised inside its own code; ``detail`` says what and where."""

    def __init__(self, message: str, detail: str):
        self.detail = detail
        super().__init__(message)


@dataclass(frozen=True)
class Port:
    """Where a module touches a group: ``role`` is conv_out, conv_in, bn, linear_in,
    shortcut_in or shortcut_out; ``factor`` is the features per channel of a Linear input."""

    module: str
    role: str
    factor: int = 1


@dataclass
class ChannelGroup:
    """Channel positions pruned with one index set.

    name: the conv's name, or for a residual stream the stage's name (e.g. ``layer1``).
    kind: ``conv`` (one conv's outputs), ``stream`` (tensors added together), ``linear``,
    ``input`` or ``other``.
    producers / consumers: the module ports that write / read these channels.
    sites: the scored activations (:class:`pccfast.sites.Site`), CHIP's choice.
    block: the residual block holding an inner conv ("" outside blocks).
    prunable: whether plans may remove channels; ``reason`` says why not.
    """

    name: str
    width: int
    kind: str
    producers: list[Port] = field(default_factory=list)
    consumers: list[Port] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    block: str = ""
    prunable: bool = True
    reason: str = ""

    @property
    def convs(self) -> list[str]:
        return [p.module for p in self.producers if p.role == "conv_out"]


@dataclass(frozen=True)
class CostTerm:
    """One conv/linear layer's params and MACs as bilinear functions of its group widths:
    ``params = w_in * w_out * weight_coef + w_out * bias``, ``macs = w_in * w_out * mac_coef``.
    A group of None has a fixed width (``fixed_in`` / ``fixed_out``)."""

    module: str
    in_group: str | None
    out_group: str | None
    fixed_in: int
    fixed_out: int
    weight_coef: int
    mac_coef: int
    bias: bool
    count_params: bool  # False for the second and later calls of a shared module


class PruningGraph:
    """The channel groups of a model, in the order their first producer runs.

    ``groups`` lists them; ``group(name)``; ``prunable`` the ones plans may shrink;
    ``cost(widths)`` the params/MACs for given group widths (the budget search).
    """

    engine = "pccfast"

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], terms: list[CostTerm],
                 input_size: tuple[int, ...], residual: str, blocks: list[str],
                 prune_classifier_input: bool = False, norms=()):
        self.model = model
        self.norms = list(norms)  # (group name, width, output elements per channel) per BN call
        self.prune_classifier_input = prune_classifier_input
        self.groups = groups
        self.terms = terms
        self.input_size = input_size
        self.residual = residual
        self.blocks = blocks
        self._by_name = {g.name: g for g in groups}

    def group(self, name: str) -> ChannelGroup:
        return self._by_name[name]

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    @property
    def sites(self) -> list[Site]:
        """Every scored site of the prunable groups, each once, in forward order."""
        out: dict[str, Site] = {}
        for g in self.prunable:
            for s in g.sites:
                out.setdefault(s.name, s)
        return list(out.values())

    def cost(self, widths: dict[str, int]) -> dict[str, int]:
        """params (conv + linear, BN excluded), flops (MACs) and flops_bn for the given group
        widths (groups not named keep their width): :func:`pccfast.count` of the pruned model."""
        params = flops = flops_bn = 0
        for group, width, per_channel in self.norms:
            flops_bn += 2 * widths.get(group, width) * per_channel
        for t in self.terms:
            w_in = widths.get(t.in_group, t.fixed_in) if t.in_group else t.fixed_in
            w_out = widths.get(t.out_group, t.fixed_out) if t.out_group else t.fixed_out
            flops += w_in * w_out * t.mac_coef
            if t.count_params:
                params += w_in * w_out * t.weight_coef + (w_out if t.bias else 0)
        return {"params": params, "flops": flops, "flops_bn": flops_bn}

    def __repr__(self) -> str:
        lines = [f"PruningGraph({type(self.model).__name__}, residual={self.residual!r})"]
        for g in self.groups:
            flag = "prunable" if g.prunable else f"kept: {g.reason}"
            lines.append(f"  {g.name:<28} {g.kind:<6} width {g.width:<5} {flag}")
        return "\n".join(lines)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, PadShortcut) or super().is_leaf_module(m, qualname)


class _Groups:
    """Union-find over group ids, each root holding a ChannelGroup being built."""

    def __init__(self):
        self.parent: list[int] = []
        self.data: list[ChannelGroup] = []
        self.first: list[int] = []  # node position of the first producer (for ordering)

    def new(self, width: int, kind: str, position: int) -> int:
        self.parent.append(len(self.parent))
        self.data.append(ChannelGroup("", width, kind))
        self.first.append(position)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def get(self, i: int) -> ChannelGroup:
        return self.data[self.find(i)]

    def union(self, a: int, b: int, node: str) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        ga, gb = self.data[a], self.data[b]
        if ga.width != gb.width:
            raise UnsupportedLayerError(node, "add", f"adds {ga.width} to {gb.width} channels")
        if self.first[b] < self.first[a]:
            a, b, ga, gb = b, a, gb, ga
        self.parent[b] = a
        ga.producers += gb.producers
        ga.consumers += gb.consumers
        ga.sites += gb.sites
        kinds = {ga.kind, gb.kind}
        ga.kind = "input" if "input" in kinds else "stream"
        return a


def _tensor_meta(node):
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta if meta is not None and hasattr(meta, "shape") else None


def _describe(node: fx.Node, modules) -> tuple[str, str]:
    if node.op == "call_module":
        return node.target, type(modules[node.target]).__name__
    target = getattr(node.target, "__name__", str(node.target))
    stack = list(node.meta.get("nn_module_stack", {}).keys())
    where = f"{stack[-1]}: {node.name}" if stack and stack[-1] else node.name
    return where, f"{node.op} {target}"


def _trace(model: nn.Module, input_size) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:
        raise UnsupportedLayerError(
            type(model).__name__, "torch.fx trace", f"{type(exc).__name__}: {exc}"
        ) from exc
    gm = fx.GraphModule(model, graph)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    try:
        with eval_mode(model, gm), torch.no_grad():
            ShapeProp(gm).propagate(torch.randn(input_size, device=device, dtype=dtype))
    except Exception as exc:
        raise ValueError(
            f"the model does not run on input_size {tuple(input_size)} "
            f"({type(exc).__name__}: {exc}); pass the input size it expects"
        ) from exc
    return gm


def build_graph(model: nn.Module, input_size=(1, 3, 32, 32), residual: str = "stream",
                prune_classifier_input: bool = False, engine: str = "auto"):
    """The pruning graph of ``model`` for inputs of ``input_size``.

    residual: ``"stream"`` (default, CHIP): residual streams are prunable groups with indices
    aligned across a stage; ``"inner"``: only the convs inside residual blocks are pruned.
    prune_classifier_input: also prune the channels read by a Linear layer (CHIP keeps them:
    VGG-16's last conv and ResNet's last stage stay whole).
    engine: ``"pccfast"`` (this module), ``"torch_pruning"`` (Torch-Pruning's DependencyGraph,
    for models this module cannot handle) or ``"auto"`` (the first, else the second).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    input_size = check_input_size(input_size)
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual must be one of {RESIDUAL_MODES}, got {residual!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "torch_pruning":
        from .tp_engine import build_tp_graph

        return build_tp_graph(model, input_size, residual, prune_classifier_input)
    try:
        return _build_fx_graph(model, input_size, residual, prune_classifier_input)
    except UnsupportedLayerError as exc:
        if engine == "pccfast":
            raise
        from .tp_engine import build_tp_graph, torch_pruning_missing

        missing = torch_pruning_missing()
        if missing:
            raise UnsupportedLayerError(exc.layer, exc.what, f"{exc.why}; and {missing}") from exc
        warnings.warn(f"cannot prune through {exc.layer} ({exc.what}): {exc.why}; using "
                      "Torch-Pruning's DependencyGraph", stacklevel=2)
        try:
            return build_tp_graph(model, input_size, residual, prune_classifier_input)
        except TorchPruningFailure as failure:
            raise UnsupportedLayerError(
                exc.layer, exc.what, exc.why,
                f"Torch-Pruning, pccfast's fallback, fails on {type(model).__name__} too "
                f"({failure.detail}), so this model cannot be pruned"
            ) from failure


def _build_fx_graph(model, input_size, residual, prune_classifier_input) -> PruningGraph:
    gm = _trace(model, input_size)
    modules = dict(model.named_modules())
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    groups = _Groups()
    chan: dict[fx.Node, int] = {}  # node -> group of its dim-1 channels
    flat: dict[fx.Node, tuple[int, int]] = {}  # node -> (group, features per channel)
    calls: dict[str, int] = {}
    call_index: dict[fx.Node, int] = {}
    producer_node: dict[int, list[fx.Node]] = {}  # group id -> conv nodes producing it
    add_nodes: list[fx.Node] = []
    terms: list[tuple] = []  # (module, in group id, out group id, weight coef, mac coef, ...)
    norm_calls: list[tuple[int, int]] = []  # (group id, output elements per channel)
    classifier_groups: set[int] = set()  # group ids read by a Linear layer
    output_groups: set[int] = set()  # group ids of the model's outputs

    def grouped_inputs(node):
        found = []
        for a in node.all_input_nodes:
            if a in chan:
                found.append(a)
            elif a in flat:
                found.append(a)
        return found

    for node in nodes:
        if node.op == "call_module":
            call_index[node] = calls.get(node.target, 0)
            calls[node.target] = call_index[node] + 1
        meta = _tensor_meta(node)
        pos = position[node]
        if node.op == "placeholder":
            if meta is not None and len(meta.shape) >= 2:
                chan[node] = groups.new(int(meta.shape[1]), "input", pos)
            continue
        if node.op == "output":
            for a in node.all_input_nodes:
                if a in chan:
                    output_groups.add(chan[a])
                elif a in flat:
                    output_groups.add(flat[a][0])
            continue
        inputs = grouped_inputs(node)
        name, what = _describe(node, modules)
        x = node.args[0] if node.args else None

        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, nn.Conv2d):
                if x not in chan:
                    raise UnsupportedLayerError(name, what, "its input has no channel group")
                if module.groups != 1:
                    raise UnsupportedLayerError(name, what, f"groups={module.groups}")
                out = groups.new(module.out_channels, "conv", pos)
                groups.get(chan[x]).consumers.append(Port(node.target, "conv_in"))
                groups.get(out).producers.append(Port(node.target, "conv_out"))
                producer_node.setdefault(out, []).append(node)
                spatial = math.prod(meta.shape) // module.out_channels
                kernel = math.prod(module.kernel_size)
                terms.append((node.target, chan[x], out, kernel, spatial * kernel,
                               module.bias is not None, call_index[node] == 0))
                chan[node] = out
                continue
            if isinstance(module, _NORMS):
                per_channel = math.prod(meta.shape) // module.num_features
                if x in chan and len(meta.shape) >= 2:
                    groups.get(chan[x]).producers.append(Port(node.target, "bn"))
                    chan[node] = chan[x]
                    norm_calls.append((chan[x], per_channel))
                    continue
                if x in flat and flat[x][1] == 1:
                    groups.get(flat[x][0]).producers.append(Port(node.target, "bn"))
                    flat[node] = flat[x]
                    norm_calls.append((flat[x][0], per_channel))
                    continue
                raise UnsupportedLayerError(name, what, "normalises a flattened tensor")
            if isinstance(module, nn.Linear):
                if x in flat:
                    g, factor = flat[x]
                    groups.get(g).consumers.append(Port(node.target, "linear_in", factor))
                    classifier_groups.add(g)
                elif x in chan and len(_tensor_meta(x).shape) == 2:
                    g, factor = chan[x], 1
                    groups.get(g).consumers.append(Port(node.target, "linear_in", 1))
                    classifier_groups.add(g)
                else:
                    raise UnsupportedLayerError(name, what, "its input is not (N, features)")
                out = groups.new(module.out_features, "linear", pos)
                groups.get(out).producers.append(Port(node.target, "linear_out"))
                rows = math.prod(meta.shape) // module.out_features
                terms.append((node.target, g, out, factor, rows * factor,
                              module.bias is not None, call_index[node] == 0))
                flat[node] = (out, 1)
                continue
            if isinstance(module, PadShortcut):
                if x not in chan:
                    raise UnsupportedLayerError(name, what, "its input has no channel group")
                out = groups.new(module.out_channels, "conv", pos)
                groups.get(chan[x]).consumers.append(Port(node.target, "shortcut_in"))
                groups.get(out).producers.append(Port(node.target, "shortcut_out"))
                chan[node] = out
                continue
            if isinstance(module, _PASS_MODULES):
                if x in chan:
                    chan[node] = chan[x]
                elif x in flat:
                    flat[node] = flat[x]
                continue
            if isinstance(module, nn.Flatten):
                if x in chan and module.start_dim == 1 and module.end_dim == -1:
                    in_shape = _tensor_meta(x).shape
                    flat[node] = (chan[x], math.prod(in_shape[2:]))
                    continue
                raise UnsupportedLayerError(name, what, "flattens other than from dim 1")
            if inputs:
                raise UnsupportedLayerError(name, what, "unknown module type")
            continue

        # call_function / call_method / get_attr
        if not inputs:
            continue
        if meta is None:  # x.size(), x.shape, x.dim(): no tensor comes out
            continue
        target = node.target
        is_method = node.op == "call_method"
        if (not is_method and target in _PASS_FUNCTIONS) or (is_method and target in _PASS_METHODS):
            if len(inputs) == 1 and inputs[0] is x:
                if x in chan:
                    chan[node] = chan[x]
                else:
                    flat[node] = flat[x]
                continue
        if (not is_method and target in _ADD_FUNCTIONS) or (is_method and target in _ADD_METHODS):
            tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if all(a in chan for a in tensors) and len(tensors) == 2:
                chan[node] = groups.union(chan[tensors[0]], chan[tensors[1]], name)
                add_nodes.append(node)
                continue
            if len(tensors) == 1 and tensors[0] in chan:  # x + constant
                chan[node] = chan[tensors[0]]
                continue
        if (not is_method and target in _SCALE_FUNCTIONS) or (is_method and target in _SCALE_METHODS):
            tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            others = [a for a in node.args[:2] if not isinstance(a, fx.Node)]
            if len(tensors) == 1 and tensors[0] is x and x in chan and all(
                    isinstance(a, (int, float)) for a in others):  # x * scalar
                chan[node] = chan[x]
                continue
        if (is_method and target in _FLATTEN_METHODS) or (not is_method and target is torch.flatten):
            if x in chan and len(meta.shape) == 2:
                in_shape = _tensor_meta(x).shape
                if int(meta.shape[1]) == math.prod(in_shape[1:]):
                    flat[node] = (chan[x], math.prod(in_shape[2:]))
                    continue
        if (is_method and target == "mean") or (not is_method and target is torch.mean):
            if x in chan and len(meta.shape) == 2 and int(meta.shape[1]) == _tensor_meta(x).shape[1]:
                flat[node] = (chan[x], 1)
                continue
        if not is_method and target is operator.getitem and x in chan:
            index = node.args[1]
            if isinstance(index, tuple) and len(index) >= 2 and index[1] == slice(None):
                chan[node] = chan[x]
                continue
        raise UnsupportedLayerError(name, what, "an operation the structural pruner cannot "
                                    "follow (it might mix or reorder channels)")

    # Residual blocks: the innermost module around each add.
    add_block = {}
    for node in add_nodes:
        stack = list(node.meta.get("nn_module_stack", {}).keys())
        add_block[node] = stack[-1] if stack else ""
    blocks = list(dict.fromkeys(b for b in add_block.values() if b))

    # Finalise the groups: names, sites, prunability.
    roots = sorted({groups.find(i) for i in range(len(groups.parent))}, key=lambda r: groups.first[r])
    id_to_name: dict[int, str] = {}
    final: list[ChannelGroup] = []
    relu_site = _site_finder(nodes, modules, call_index, calls)
    classifier_roots = {groups.find(i) for i in classifier_groups}
    output_roots = {groups.find(i) for i in output_groups}
    for root in roots:
        g = groups.data[root]
        members = [i for i in range(len(groups.parent)) if groups.find(i) == root]
        convs = [n for i in members for n in producer_node.get(i, [])]
        adds = [n for n in add_nodes if groups.find(chan[n]) == root]
        if g.kind == "stream" and adds:
            g.name = _common_prefix([add_block[n] for n in adds]) or g.convs[0]
        elif g.convs:
            g.name = g.convs[0]
        elif g.producers:
            g.name = g.producers[0].module
        else:
            g.name = "input" if g.kind == "input" else f"group{root}"
        sites = []
        for conv in sorted(convs, key=position.get):
            site = relu_site(conv)
            if site is not None:
                sites.append(site)
        for add in adds:
            site = relu_site(add)
            if site is not None:
                sites.append(site)
        g.sites = list(dict.fromkeys(sites))
        if g.kind == "conv" and g.convs:
            owners = [b for b in blocks if g.convs[0].startswith(b + ".")]
            g.block = max(owners, key=len) if owners else ""
        g.prunable, g.reason = _prunable(g, root in output_roots, root in classifier_roots,
                                         residual, prune_classifier_input)
        id_to_name[root] = g.name
        final.append(g)
    if len({g.name for g in final}) != len(final):
        seen: dict[str, int] = {}
        for g in final:
            seen[g.name] = seen.get(g.name, 0) + 1
            if seen[g.name] > 1:
                g.name = f"{g.name}#{seen[g.name] - 1}"
        id_to_name = {r: g.name for r, g in zip(roots, final)}

    cost_terms = []
    widths = {g.name: g.width for g in final}
    for module, gin, gout, weight_coef, mac_coef, bias, first_call in terms:
        n_in = id_to_name[groups.find(gin)] if gin is not None else None
        n_out = id_to_name[groups.find(gout)] if gout is not None else None
        cost_terms.append(CostTerm(module, n_in, n_out, widths.get(n_in, 0), widths.get(n_out, 0),
                                   weight_coef, mac_coef, bias, first_call))
    norms = [(id_to_name[groups.find(g)], widths[id_to_name[groups.find(g)]], per_channel)
             for g, per_channel in norm_calls]
    return PruningGraph(model, final, cost_terms, tuple(input_size), residual, blocks,
                        prune_classifier_input, norms)


def _prunable(g: ChannelGroup, is_output, is_classifier_input, residual, prune_classifier_input):
    if g.kind == "input":
        return False, "the model's input"
    if g.kind == "linear" or not g.convs:
        return False, "not a conv's output (pccfast prunes conv channels)"
    if is_output:
        return False, "the model's output"
    if is_classifier_input and not prune_classifier_input:
        return False, "read by the classifier (CHIP keeps it; prune_classifier_input=True prunes it)"
    if g.kind == "stream" and residual == "inner":
        return False, "a residual stream (residual='inner')"
    if not g.sites:
        return False, "no scored activation (no ReLU module after its conv/BN)"
    return True, ""


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return ".".join(prefix)


def _site_finder(nodes, modules, call_index, calls):
    """node -> the CHIP site of its output: [BN] -> ReLU -> [MaxPool2d], or None."""

    def only_user(node):
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def is_relu(node):
        if node.op == "call_module":
            return isinstance(modules[node.target], _RELU_MODULES)
        if node.op == "call_function":
            return node.target in _RELU_FUNCTIONS
        return node.op == "call_method" and node.target in ("relu", "relu_")

    def site_of(node, hooked, conv, norm, apply_relu):
        index = call_index[hooked]
        name = hooked.target if calls[hooked.target] == 1 else f"{hooked.target}:{index}"
        return Site(name, hooked.target, index, conv, norm, apply_relu)

    def find(start: fx.Node):
        conv = start.target if start.op == "call_module" else ""
        node, norm = start, ""
        nxt = only_user(node)
        if nxt is not None and nxt.op == "call_module" and isinstance(modules[nxt.target], _NORMS):
            node, norm = nxt, nxt.target
            nxt = only_user(node)
        if nxt is None or not is_relu(nxt):
            return None
        if nxt.op != "call_module":  # functional ReLU: hook the module before it
            if node.op != "call_module":
                return None
            return site_of(nxt, node, conv, norm, True)
        relu = nxt
        pool = only_user(relu)
        if pool is not None and pool.op == "call_module" and isinstance(
                modules[pool.target], nn.MaxPool2d):
            return site_of(pool, pool, conv, norm, False)
        return site_of(relu, relu, conv, norm, False)

    return find
