"""Which channels move together: the pruning graph of a CNN (the structure part of pruning).

The model is traced with ``torch.fx`` (as it trains: every branch a training step runs) and run
once on an example input (for shapes). Every tensor with channels belongs to one or more
*channel groups* (several after a concatenation: one *segment* per group); a group is a set of
channel positions that must be pruned with one index set:

- a conv's output channels, carried through BatchNorm, activations, pooling, gates and
  depthwise convs (whose output channel ``c`` reads only input channel ``c``), read by the next
  conv (its input channels) or, after a flatten, by a Linear layer (``factor`` features per
  channel); a pointwise ``nn.Linear`` on a channels-last map (ConvNeXt's MLP) or on tokens
  (ViT's and Swin's MLP: ``(N, tokens, C)``) is a 1x1 conv;
- attention (``nn.MultiheadAttention``, Swin's window attention) is not pruned: the groups it
  reads and writes are kept whole, and its projections and ``QK^T``/``AV`` products are a
  constant cost (:func:`pccfast.prune.counting.attention_cost`), so a transformer prunes only
  its MLP hidden units;
- a *residual stream*: tensors added together share one group, so the stem, every block's last
  conv and the downsample convs of a stage keep aligned indices; a squeeze-excitation gate
  multiplies its input channel by channel, so the gate's last conv joins the input's group;
- a concatenation (DenseNet, Inception, SqueezeNet's Fire) keeps each input as a segment at its
  channel offset, read by the next layers' inputs;
- a grouped conv's input and output groups keep the same number of channels in each of the
  conv's groups (``chunks``), so the conv keeps its ``groups`` (ResNeXt, RegNet);
- an option-A shortcut (:class:`pccfast.models.PadShortcut`) reads one group and writes another
  (channel ``c`` to ``c + pad``), so the two stages' streams stay separate groups.

Each group also knows its *scored sites* (SPEC section 3): the activation output that follows
each conv producing it (:func:`pccfast.sites.scored_sites`; the max-pool output where a pool
follows, as CHIP), and for a stream the activation after every residual add. A group's score is
the mean over its sites (an inverted-residual block's expanded channels: after the expansion
and after the depthwise conv).

Groups are kept whole, with the reason, when they are the model's input or output, read by the
classifier (unless ``prune_classifier_input``), normalised over their channels (LayerNorm:
removing a channel changes the others), scaled by a per-channel tensor, computed from globally
pooled 1x1 maps (squeeze-excitation's reduced channels: CI needs a spatial map), or have no
activation to score. Anything else that touches a prunable tensor (channel shuffles, slices
along channels, unknown modules) is an :class:`UnsupportedLayerError` naming it;
:func:`build_graph` with ``engine="auto"`` then hands the model to Torch-Pruning (see
:mod:`pccfast.prune.tp_engine`).
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.nn.modules.batchnorm import _BatchNorm

from ..models._common import eval_mode
from ..models.resnet_cifar import PadShortcut
from ..sites import ACTIVATION_FUNCTIONS, ACTIVATION_MODULES, ACTIVATION_METHODS, Site
from ..sites import _flags as site_flags
from ..sites import eval_modules, scored_sites, trace
from .counting import attention_cost, check_input_size, is_window_attention

ENGINES = ("auto", "pccfast", "torch_pruning")
RESIDUAL_MODES = ("stream", "inner")

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
_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                  nn.modules.instancenorm._InstanceNorm)
_CHANNEL_NORM_FUNCTIONS = (F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm)


class UnsupportedLayerError(ValueError):
    """The structural pruner met a layer it cannot prune through; ``layer`` names it."""

    def __init__(self, layer: str, what: str, why: str, hint: str | None = None):
        self.layer, self.what, self.why = layer, what, why
        if hint is None:
            hint = ("pccfast's own pruner follows convs (grouped and depthwise too), BatchNorm, "
                    "activations, pooling, residual adds, gates, concatenations, flatten and "
                    "Linear; other models go through Torch-Pruning (engine='torch_pruning', "
                    "pip install torch-pruning)")
        super().__init__(f"cannot prune through {layer} ({what}): {why}. {hint}")


class TorchPruningFailure(ValueError):
    """Torch-Pruning raised inside its own code; ``detail`` says what and where."""

    def __init__(self, message: str, detail: str):
        self.detail = detail
        super().__init__(message)


@dataclass(frozen=True)
class Port:
    """Where a module touches a group.

    role: ``conv_out``, ``conv_in``, ``dw`` (a depthwise conv: input and output channels),
    ``bn``, ``linear_in``, ``linear_out``, ``shortcut_in`` or ``shortcut_out``.
    factor: features per channel of a Linear input (after a flatten).
    offset: where the group's channels start among the module's (after a concatenation).
    dim: the channel dimension of the module's output (-1: channels-last).
    """

    module: str
    role: str
    factor: int = 1
    offset: int = 0
    dim: int = 1


@dataclass
class ChannelGroup:
    """Channel positions pruned with one index set.

    name: the conv's name, or for a residual stream the stage's name (e.g. ``layer1``).
    kind: ``conv`` (one conv's outputs), ``stream`` (tensors added together), ``linear``,
    ``input`` or ``other``.
    producers / consumers: the module ports that write / read these channels.
    sites: the scored activations (:class:`pccfast.sites.Site`).
    block: the residual block holding an inner conv ("" outside blocks).
    prunable: whether plans may remove channels; ``reason`` says why not.
    chunks: the group is cut into this many equal runs of channels (a grouped conv's groups),
    and every run keeps the same number of channels.
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
    chunks: int = 1

    @property
    def convs(self) -> list[str]:
        """The convs (and pointwise Linears on maps) writing these channels."""
        pointwise = self.kind != "linear"
        return list(dict.fromkeys(
            p.module for p in self.producers
            if p.role in ("conv_out", "dw") or (pointwise and p.role == "linear_out")))

    def round_keep(self, k: int) -> int:
        """``k`` rounded up to a multiple of ``chunks`` (at least one channel per chunk)."""
        c = self.chunks
        return min(self.width, max(c, -(-int(k) // c) * c))

    def keep_indices(self, score: torch.Tensor, k: int) -> list[int]:
        """The ``round_keep(k)`` highest-scoring channels, the same count in every chunk (ties:
        lower index), in original order."""
        k = self.round_keep(k)
        size, per_chunk = self.width // self.chunks, k // self.chunks
        out = []
        for start in range(0, self.width, size):
            part = score[start:start + size]
            out += [start + i for i in torch.argsort(-part, stable=True)[:per_chunk].tolist()]
        return sorted(out)


@dataclass(frozen=True)
class CostTerm:
    """One conv/linear layer's params and MACs as bilinear functions of its group widths:
    ``params = w_in * w_out * weight_coef / groups + w_out * bias``,
    ``macs = w_in * w_out * mac_coef / groups``. A group of None has a fixed width
    (``fixed_in`` / ``fixed_out``)."""

    module: str
    in_group: str | None
    out_group: str | None
    fixed_in: int
    fixed_out: int
    weight_coef: int
    mac_coef: int
    bias: bool
    count_params: bool  # False for the second and later calls of a shared module
    groups: int = 1
    count_flops: bool = True  # False for layers an eval-mode forward skips (auxiliary heads)


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
        self.limits = ""  # what the model keeps by design (attention), for budget errors
        self.fallback_reason = ""  # why pccfast's engine gave way to Torch-Pruning's

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
        widths (groups not named keep their width; widths round up to whole chunks, as plans
        keep them): :func:`pccfast.count` of the pruned model."""
        widths = {k: self._by_name[k].round_keep(v) if k in self._by_name else v
                  for k, v in widths.items()}
        params = flops = flops_bn = 0
        for group, width, per_channel in self.norms:
            flops_bn += 2 * widths.get(group, width) * per_channel
        for t in self.terms:
            w_in = widths.get(t.in_group, t.fixed_in) if t.in_group else t.fixed_in
            w_out = widths.get(t.out_group, t.fixed_out) if t.out_group else t.fixed_out
            if t.count_flops:
                flops += w_in * w_out * t.mac_coef // t.groups
            if t.count_params:
                params += w_in * w_out * t.weight_coef // t.groups + (w_out if t.bias else 0)
        return {"params": params, "flops": flops, "flops_bn": flops_bn}

    def why_nothing_to_score(self) -> str:
        """Why no channel group has a scored activation / is prunable: the reasons, counted."""
        counts: dict[str, int] = {}
        for g in self.groups:
            if g.kind not in ("input", "linear"):
                reason = g.reason or "prunable"
                counts[reason] = counts.get(reason, 0) + 1
        listed = "; ".join(f"{n} x {r}" for r, n in sorted(counts.items(), key=lambda x: -x[1]))
        first = (f"{self.fallback_reason}; so Torch-Pruning built the graph, and "
                 if self.fallback_reason else "")
        return (f"{first}{type(self.model).__name__}'s channel groups ({self.engine} engine): "
                f"{listed or 'none (no conv)'}. pccfast scores the activation after a conv "
                "(or after a pointwise Linear on a channels-last map or on tokens, as in "
                "ConvNeXt's and transformers' MLPs)")

    def __repr__(self) -> str:
        lines = [f"PruningGraph({type(self.model).__name__}, residual={self.residual!r})"]
        for g in self.groups:
            flag = "prunable" if g.prunable else f"kept: {g.reason}"
            lines.append(f"  {g.name:<28} {g.kind:<6} width {g.width:<5} {flag}")
        return "\n".join(lines)


class _Groups:
    """Union-find over group ids, each root holding a ChannelGroup being built and the
    builder's notes on it: ``pooled`` (made from globally pooled maps) and ``kept`` (a reason
    it must stay whole)."""

    def __init__(self):
        self.parent: list[int] = []
        self.data: list[ChannelGroup] = []
        self.first: list[int] = []  # node position of the first producer (for ordering)
        self.pooled: list[bool] = []
        self.kept: list[str] = []

    def new(self, width: int, kind: str, position: int, pooled: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.data.append(ChannelGroup("", width, kind))
        self.first.append(position)
        self.pooled.append(pooled)
        self.kept.append("")
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def get(self, i: int) -> ChannelGroup:
        return self.data[self.find(i)]

    def keep(self, i: int, reason: str) -> None:
        root = self.find(i)
        self.kept[root] = self.kept[root] or reason

    def add_chunks(self, i: int, chunks: int, node: str, what: str) -> None:
        g = self.get(i)
        combined = math.lcm(g.chunks, chunks)
        if g.width % combined:
            raise UnsupportedLayerError(node, what, f"its {chunks} conv groups do not divide "
                                        f"the {g.width} channels into equal runs")
        g.chunks = combined

    def union(self, a: int, b: int, node: str, what: str, stream: bool) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        ga, gb = self.data[a], self.data[b]
        if ga.width != gb.width:
            raise UnsupportedLayerError(node, what, f"combines {ga.width} with {gb.width} channels")
        if self.first[b] < self.first[a]:
            a, b, ga, gb = b, a, gb, ga
        self.parent[b] = a
        ga.producers += gb.producers
        ga.consumers += gb.consumers
        ga.sites += gb.sites
        kinds = {ga.kind, gb.kind}
        if "input" in kinds:
            ga.kind = "input"
        elif stream or "stream" in kinds:
            ga.kind = "stream"
        ga.chunks = math.lcm(ga.chunks, gb.chunks)
        if ga.width % ga.chunks:
            raise UnsupportedLayerError(node, what, "joins channels that grouped convs cut "
                                        "into runs of different sizes")
        self.pooled[a] = self.pooled[a] and self.pooled[b]
        self.kept[a] = self.kept[a] or self.kept[b]
        return a


@dataclass(frozen=True)
class _Layout:
    """The channels of a tensor: its segments (group ids, in channel order) and channel dim."""

    segs: tuple[int, ...]
    dim: int = 1


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
            part, what = _describe(prop.current, dict(model.named_modules()))
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
        return result


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
            graph = build_tp_graph(model, input_size, residual, prune_classifier_input)
            graph.fallback_reason = (f"pccfast's engine cannot prune through {exc.layer} "
                                     f"({exc.what}): {exc.why}")
            return graph
        except TorchPruningFailure as failure:
            raise UnsupportedLayerError(
                exc.layer, exc.what, exc.why,
                f"Torch-Pruning, pccfast's fallback, fails on {type(model).__name__} too "
                f"({failure.detail}), so this model cannot be pruned"
            ) from failure


def _is(node: fx.Node, functions=(), methods=(), names=()) -> bool:
    if node.op == "call_method":
        return node.target in methods
    if node.op == "call_function":
        return node.target in functions or getattr(node.target, "__name__", None) in names
    return False


def _dims(node: fx.Node, first: int = 1):
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


def _build_fx_graph(model, input_size, residual, prune_classifier_input) -> PruningGraph:
    gm = _trace(model, input_size)
    modules = dict(model.named_modules())
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    pooled_nodes, _ = site_flags(gm.graph, modules)
    groups = _Groups()
    chan: dict[fx.Node, _Layout] = {}  # node -> its channel segments
    flat: dict[fx.Node, tuple[tuple[int, ...], int]] = {}  # node -> (segments, features/channel)
    gated: set[fx.Node] = set()  # removed channels would read nonzero in the masked original
    calls: dict[str, int] = {}
    call_index: dict[fx.Node, int] = {}
    first_call: dict[str, tuple[_Layout, int | None]] = {}  # shared module -> (input, output)
    producer_node: dict[int, list[fx.Node]] = {}  # group id -> conv/linear nodes writing it
    add_nodes: list[fx.Node] = []
    terms: list[tuple] = []  # (module, in id, out id, weight coef, mac coef, bias, first, groups)
    norm_calls: list[tuple] = []  # (group id, output elements per channel, module)
    classifier_groups: set[int] = set()  # group ids read by a Linear layer
    output_groups: set[int] = set()  # group ids of the model's outputs
    attention_tuples: set[fx.Node] = set()  # attention calls returning tuples
    attention_seen: set[str] = set()  # attention modules called as functions
    attention_widths: set[int] = set()
    attention_count = 0

    def width(layout_segs) -> int:
        return sum(groups.get(s).width for s in layout_segs)

    def offsets(layout_segs):
        out, at = [], 0
        for s in layout_segs:
            out.append((s, at))
            at += groups.get(s).width
        return out

    def single(layout: _Layout, name, what) -> int:
        if len(layout.segs) != 1:
            raise UnsupportedLayerError(name, what, "it reads a concatenation this layer cannot "
                                        "split")
        return layout.segs[0]

    def read_gated(node, reason):
        if node in gated:
            for s in (chan[node].segs if node in chan else flat[node][0]):
                groups.keep(s, reason)

    def grouped(a) -> bool:
        return isinstance(a, fx.Node) and (a in chan or a in flat)

    def share(node, name, what, layout_in: _Layout | None, out: int | None):
        """A module called again must prune its channels as in its first call."""
        if call_index[node] == 0:
            first_call[node.target] = (layout_in, out)
            return
        before_in, before_out = first_call[node.target]
        if layout_in is not None and before_in is not None:
            if len(layout_in.segs) != len(before_in.segs):
                raise UnsupportedLayerError(name, what, "called again on differently "
                                            "concatenated channels")
            for a, b in zip(layout_in.segs, before_in.segs):
                groups.union(a, b, name, what, stream=False)
        if out is not None and before_out is not None:
            groups.union(out, before_out, name, what, stream=False)

    for node in nodes:
        if node.op == "call_module":
            call_index[node] = calls.get(node.target, 0)
            calls[node.target] = call_index[node] + 1
        meta = _tensor_meta(node)
        pos = position[node]
        if node.op == "placeholder":
            if meta is not None and len(meta.shape) >= 2:
                chan[node] = _Layout((groups.new(int(meta.shape[1]), "input", pos),))
            continue
        if node.op == "output":
            for a in node.all_input_nodes:
                if a in chan:
                    output_groups.update(chan[a].segs)
                elif a in flat:
                    output_groups.update(flat[a][0])
            continue
        inputs = [a for a in node.all_input_nodes if grouped(a)]
        name, what = _describe(node, modules)
        x = node.args[0] if node.args else None
        xl = chan.get(x) if isinstance(x, fx.Node) else None

        is_attention = (node.op == "call_module" and isinstance(modules[node.target],
                                                                _ATTENTION_MODULES)) or (
            _is(node, names=_ATTENTION_FUNCTION_NAMES))
        if is_attention or (node.op == "call_function" and node.target is operator.getitem
                            and x in attention_tuples):
            why = (f"read or written by the attention {name} ({what}): pccfast keeps attention "
                   "heads and the stream they read")
            for a in inputs:
                for s in (chan[a].segs if a in chan else flat[a][0]):
                    groups.keep(s, why)
            owner = node.target if node.op == "call_module" else (
                list(node.meta.get("nn_module_stack", {}) or [""])[-1])
            module = modules.get(owner)
            if is_attention and (isinstance(module, nn.MultiheadAttention) or (
                    module is not None and is_window_attention(module))):
                given = list(node.args) + [node.kwargs[k] for k in ("query", "key", "value", "x")
                                           if k in node.kwargs]
                shapes = [tuple(_tensor_meta(a).shape) for a in given[:3]
                          if _tensor_meta(a) is not None]
                params, macs = attention_cost(module, shapes)
                first = calls.get(owner, 1) == 1 if node.op == "call_module" else (
                    owner not in attention_seen)
                attention_seen.add(owner)
            if is_attention:
                attention_count += 1
                attention_widths.update(int(_tensor_meta(a).shape[-1]) for a in inputs[:1]
                                        if _tensor_meta(a) is not None)
                terms.append((owner, None, None, params, macs, False, first, 1))
            if meta is None:
                attention_tuples.add(node)  # MultiheadAttention's (output, weights)
            elif len(meta.shape) >= 2:
                out = groups.new(int(meta.shape[-1]), "other", pos)
                groups.keep(out, why)
                chan[node] = _Layout((out,), len(meta.shape) - 1)
            continue

        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, nn.Conv2d):
                if xl is None or xl.dim != 1:
                    raise UnsupportedLayerError(name, what, "its input has no channel group")
                g_count, c_in, c_out = module.groups, module.in_channels, module.out_channels
                spatial = math.prod(meta.shape) // c_out
                kernel = math.prod(module.kernel_size)
                bias = module.bias is not None
                first = call_index[node] == 0
                if g_count > 1 and g_count == c_in == c_out:  # depthwise: channel c reads c
                    g = single(xl, name, what)
                    groups.get(g).producers.append(Port(node.target, "dw"))
                    producer_node.setdefault(g, []).append(node)
                    terms.append((node.target, None, g, kernel, spatial * kernel, bias, first, 1))
                    share(node, name, what, xl, None)
                    chan[node] = xl
                    continue
                if g_count > 1 and c_out != c_in and c_in == g_count:
                    raise UnsupportedLayerError(name, what, "a depthwise conv with a channel "
                                                "multiplier")
                read_gated(x, f"read by {name} through a gate")
                out = groups.new(c_out, "conv", pos, pooled=x in pooled_nodes)
                if g_count > 1:
                    groups.add_chunks(single(xl, name, what), g_count, name, what)
                    groups.add_chunks(out, g_count, name, what)
                for i, (s, offset) in enumerate(offsets(xl.segs)):
                    groups.get(s).consumers.append(Port(node.target, "conv_in", 1, offset))
                    terms.append((node.target, s, out, kernel, spatial * kernel,
                                  bias and i == 0, first, g_count))
                groups.get(out).producers.append(Port(node.target, "conv_out"))
                producer_node.setdefault(out, []).append(node)
                share(node, name, what, xl, out)
                chan[node] = _Layout((out,))
                continue
            if isinstance(module, _BatchNorm):
                per_channel = math.prod(meta.shape) // module.num_features
                layout = xl.segs if xl is not None and xl.dim == 1 else (
                    flat[x][0] if x in flat and flat[x][1] == 1 else None)
                if layout is None:
                    raise UnsupportedLayerError(name, what, "normalises a flattened tensor")
                for s, offset in offsets(layout):
                    groups.get(s).producers.append(Port(node.target, "bn", 1, offset))
                    norm_calls.append((s, per_channel, node.target))
                share(node, name, what, xl or _Layout(layout), None)
                if xl is not None:
                    chan[node] = xl
                else:
                    flat[node] = flat[x]
                continue  # the masked original zeroes a BN's removed outputs: no gate passes
            if isinstance(module, nn.Linear):
                first = call_index[node] == 0
                bias = module.bias is not None
                rows = math.prod(meta.shape) // module.out_features
                x_meta = _tensor_meta(x)
                x_shape = tuple(x_meta.shape) if x_meta is not None else ()
                pointwise = xl is not None and len(x_shape) >= 3 and xl.dim == len(x_shape) - 1
                if x in flat:
                    segs, factor = flat[x]
                elif xl is not None and (len(x_shape) == 2 or pointwise):
                    segs, factor = xl.segs, 1
                else:
                    raise UnsupportedLayerError(name, what, "its input is not (N, features) "
                                                "or a channels-last map")
                read_gated(x, f"read by {name} through a gate")
                out = groups.new(module.out_features, "conv" if pointwise else "linear", pos,
                                 pooled=x in pooled_nodes)
                for i, (s, offset) in enumerate(offsets(segs)):
                    groups.get(s).consumers.append(Port(node.target, "linear_in", factor, offset))
                    if not pointwise:
                        classifier_groups.add(s)
                    terms.append((node.target, s, out, factor, rows * factor, bias and i == 0,
                                  first, 1))
                dim = len(x_shape) - 1 if pointwise else 1
                groups.get(out).producers.append(
                    Port(node.target, "linear_out", dim=-1 if pointwise else 1))
                if pointwise:
                    producer_node.setdefault(out, []).append(node)
                share(node, name, what, _Layout(segs), out)
                if pointwise:
                    chan[node] = _Layout((out,), dim)
                else:
                    flat[node] = ((out,), 1)
                continue
            if isinstance(module, PadShortcut):
                if xl is None:
                    raise UnsupportedLayerError(name, what, "its input has no channel group")
                g = single(xl, name, what)
                out = groups.new(module.out_channels, "conv", pos)
                groups.get(g).consumers.append(Port(node.target, "shortcut_in"))
                groups.get(out).producers.append(Port(node.target, "shortcut_out"))
                chan[node] = _Layout((out,))
                continue
            if isinstance(module, _CHANNEL_NORMS) and xl is not None:
                shape = module.normalized_shape if isinstance(module, nn.LayerNorm) else None
                _keep_if_normalised_over_channels(groups, xl, len(meta.shape), shape, name, what)
                chan[node] = xl
                continue
            if isinstance(module, _PASS_MODULES + _GATE_MODULES):
                if isinstance(module, nn.PReLU) and module.num_parameters != 1:
                    raise UnsupportedLayerError(name, what, "per-channel slopes")
                if xl is not None:
                    chan[node] = xl
                elif x in flat:
                    flat[node] = flat[x]
                if x in gated or isinstance(module, _GATE_MODULES):
                    gated.add(node)
                continue
            if isinstance(module, nn.Flatten):
                if (xl is not None and xl.dim == 1 and module.start_dim == 1
                        and module.end_dim == -1):
                    in_shape = _tensor_meta(x).shape
                    flat[node] = (xl.segs, math.prod(in_shape[2:]))
                    if x in gated:
                        gated.add(node)
                    continue
                raise UnsupportedLayerError(name, what, "flattens other than from dim 1")
            if inputs:
                raise UnsupportedLayerError(name, what, "unknown module type")
            continue

        # call_function / call_method / get_attr
        if not inputs or meta is None:  # constants; x.size(), x.shape: no tensor comes out
            continue
        one = len(inputs) == 1 and inputs[0] is x
        if _is(node, _PASS_FUNCTIONS + _GATE_FUNCTIONS, _PASS_METHODS + _GATE_METHODS,
               _PASS_FUNCTION_NAMES) and one:
            if xl is not None:
                chan[node] = xl
            else:
                flat[node] = flat[x]
            if x in gated or _is(node, _GATE_FUNCTIONS, _GATE_METHODS):
                gated.add(node)
            continue
        if _is(node, _ADD_FUNCTIONS + _MUL_FUNCTIONS + _DIV_FUNCTIONS,
               _ADD_METHODS + _MUL_METHODS + _DIV_METHODS):
            operands = list(node.args[:2])
            is_add = _is(node, _ADD_FUNCTIONS, _ADD_METHODS)
            is_div = _is(node, _DIV_FUNCTIONS, _DIV_METHODS)
            tracked = [a for a in operands if isinstance(a, fx.Node) and a in chan]
            if len(tracked) == 2:
                la, lb = chan[tracked[0]], chan[tracked[1]]
                if is_div:
                    raise UnsupportedLayerError(name, what, "divides by a tensor with channels")
                wa, wb = width(la.segs), width(lb.segs)
                if la.dim != lb.dim:
                    raise UnsupportedLayerError(name, what, "combines different channel dims")
                if not is_add and 1 in (wa, wb) and wa != wb:  # a (N, 1, H, W) spatial gate
                    wide = tracked[0] if wb == 1 else tracked[1]
                    chan[node] = chan[wide]
                    if wide in gated:
                        gated.add(node)
                    continue
                if len(la.segs) != 1 or len(lb.segs) != 1:
                    raise UnsupportedLayerError(name, what, "combines concatenated channels")
                root = groups.union(la.segs[0], lb.segs[0], name, what, stream=is_add)
                chan[node] = _Layout((root,), la.dim)
                if is_add:
                    add_nodes.append(node)
                    if tracked[0] in gated or tracked[1] in gated:
                        gated.add(node)
                elif tracked[0] in gated and tracked[1] in gated:
                    gated.add(node)
                continue
            if len(tracked) == 1 and (tracked[0] is operands[0] or not is_div):
                t = tracked[0]
                other = operands[1] if operands[0] is t else operands[0]
                layout = chan[t]
                other_meta = _tensor_meta(other)
                if other_meta is not None and len(other_meta.shape) > 0:
                    shape = tuple(other_meta.shape)
                    rank = len(meta.shape)
                    at = layout.dim - (rank - len(shape))
                    if 0 <= at < len(shape) and shape[at] != 1:
                        for s in layout.segs:
                            groups.keep(s, f"scaled by a per-channel tensor at {name}, which "
                                        "pccfast does not slice")
                elif isinstance(other, fx.Node):
                    raise UnsupportedLayerError(name, what, "an operand of unknown shape")
                chan[node] = layout
                zero = isinstance(other, (int, float)) and other == 0
                if t in gated or (is_add and not zero):
                    gated.add(node)  # x + c: a removed channel reads c in the masked original
                continue
        if _is(node, names=("_patch_merging_pad",)) and one and xl is not None:
            # Swin's patch merging: zero-pads H and W, concatenates 4 strided views on channels
            chan[node] = _Layout(xl.segs * 4, xl.dim)
            if x in gated:
                gated.add(node)
            continue
        if node.op == "call_function" and node.target is torch.cat:
            tensors = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if isinstance(tensors, (list, tuple)) and all(
                    isinstance(a, fx.Node) and a in chan for a in tensors):
                layouts = [chan[a] for a in tensors]
                rank = len(meta.shape)
                dim = dim % rank
                if all(lay.dim == dim for lay in layouts):
                    chan[node] = _Layout(tuple(s for lay in layouts for s in lay.segs), dim)
                    if any(a in gated for a in tensors):
                        gated.add(node)
                    continue
            if isinstance(tensors, (list, tuple)) and all(
                    isinstance(a, fx.Node) for a in tensors):
                # along tokens (ViT's class token): one group; an untracked part keeps it whole
                tracked = [a for a in tensors if a in chan]
                rank = len(meta.shape)
                layouts = [chan[a] for a in tracked]
                if tracked and all(lay.dim not in (dim % rank,) and lay.dim == layouts[0].dim
                                   and len(lay.segs) == 1 for lay in layouts):
                    root = layouts[0].segs[0]
                    for lay in layouts[1:]:
                        root = groups.union(root, lay.segs[0], name, what, stream=False)
                    if len(tracked) < len(tensors):
                        groups.keep(root, f"concatenated with a tensor the pruner does not "
                                    f"slice (a class token) at {name}")
                    chan[node] = _Layout((root,), layouts[0].dim)
                    if any(a in gated for a in tracked):
                        gated.add(node)
                    continue
            raise UnsupportedLayerError(name, what, "concatenates along another dim or with "
                                        "untracked tensors")
        if _is(node, (torch.permute,), ("permute",)) and xl is not None:
            dims = _dims(node)
            if dims is not None:
                dims = tuple(d % len(meta.shape) for d in dims)
                chan[node] = _Layout(xl.segs, dims.index(xl.dim))
                if x in gated:
                    gated.add(node)
                continue
        if _is(node, (torch.flatten,), _FLATTEN_METHODS) and xl is not None and xl.dim == 1:
            in_shape = _tensor_meta(x).shape
            if len(meta.shape) == 2 and int(meta.shape[1]) == math.prod(in_shape[1:]):
                flat[node] = (xl.segs, math.prod(in_shape[2:]))
                if x in gated:
                    gated.add(node)
                continue
            if tuple(meta.shape[:2]) == tuple(in_shape[:2]):  # merges H and W (ViT's tokens)
                chan[node] = xl
                if x in gated:
                    gated.add(node)
                continue
            if len(meta.shape) > 2 and tuple(meta.shape[2:]) != tuple(in_shape[2:]):
                raise UnsupportedLayerError(name, what, f"reshapes the {in_shape[1]} channels "
                                            f"into {tuple(meta.shape[1:])} (a channel shuffle "
                                            "or split regroups channels)")
        if _is(node, (torch.mean, torch.amax), ("mean", "amax")) and xl is not None:
            in_shape = _tensor_meta(x).shape
            dims = {d % len(in_shape) for d in (_dims(node) or ())}
            if xl.dim not in dims and dims and 0 not in dims:
                if len(meta.shape) == len(in_shape):
                    chan[node] = xl  # keepdim
                elif len(meta.shape) == 2 and xl.dim == 1:
                    flat[node] = (xl.segs, 1)
                else:
                    raise UnsupportedLayerError(name, what, "reduces to an unexpected shape")
                if x in gated:
                    gated.add(node)
                continue
        if node.op == "call_function" and node.target is operator.getitem and xl is not None:
            index = node.args[1]
            at = _index_channel_dim(index, len(_tensor_meta(x).shape), xl.dim)
            if at is not None:
                chan[node] = _Layout(xl.segs, at)
                if x in gated:
                    gated.add(node)
                continue
        if _is(node, _CHANNEL_NORM_FUNCTIONS) and xl is not None:
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
            if node.target is not F.layer_norm or not isinstance(shape, (tuple, list)):
                shape = None
            _keep_if_normalised_over_channels(groups, xl, len(meta.shape), shape, name, what)
            chan[node] = xl
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
    roots = sorted({groups.find(i) for i in range(len(groups.parent))},
                   key=lambda r: groups.first[r])
    id_to_name: dict[int, str] = {}
    final: list[ChannelGroup] = []
    site_of = scored_sites(gm.graph, modules, chip_pool=True)
    evaluated = eval_modules(model)
    if evaluated is not None:  # scores come from eval-mode passes: no training-only sites
        site_of = {n: s for n, s in site_of.items() if s.module in evaluated}
    classifier_roots = {groups.find(i) for i in classifier_groups}
    output_roots = {groups.find(i) for i in output_groups}
    members: dict[int, list[int]] = {}
    for i in range(len(groups.parent)):
        members.setdefault(groups.find(i), []).append(i)
    for root in roots:
        g = groups.data[root]
        g.producers = list(dict.fromkeys(g.producers))
        g.consumers = list(dict.fromkeys(g.consumers))
        producers = [n for i in members[root] for n in producer_node.get(i, [])]
        adds = [n for n in add_nodes if groups.find(chan[n].segs[0]) == root]
        if g.kind == "stream" and adds:
            g.name = _common_prefix([add_block[n] for n in adds]) or g.convs[0]
        elif g.convs:
            g.name = g.convs[0]
        elif g.producers:
            g.name = g.producers[0].module
        else:
            g.name = "input" if g.kind == "input" else f"group{root}"
        sites = [site_of[n] for n in sorted(producers, key=position.get) if n in site_of]
        sites += [site_of[n] for n in adds if n in site_of]
        g.sites = list(dict.fromkeys(sites))
        if g.kind == "conv" and g.convs:
            owners = [b for b in blocks if g.convs[0].startswith(b + ".")]
            g.block = max(owners, key=len) if owners else ""
        g.prunable, g.reason = _prunable(g, root in output_roots, root in classifier_roots,
                                         residual, prune_classifier_input, groups.kept[root],
                                         groups.pooled[root])
        id_to_name[root] = g.name
        final.append(g)
    if len({g.name for g in final}) != len(final):
        seen: dict[str, int] = {}
        for g in final:
            seen[g.name] = seen.get(g.name, 0) + 1
            if seen[g.name] > 1:
                g.name = f"{g.name}#{seen[g.name] - 1}"
        id_to_name = {r: g.name for r, g in zip(roots, final)}

    # FLOPs are of one eval-mode forward (pccfast.count): training-only layers have params only.
    counted = (lambda module: True) if evaluated is None else evaluated.__contains__
    cost_terms = []
    widths = {g.name: g.width for g in final}
    for module, gin, gout, weight_coef, mac_coef, bias, first_call_, g_count in terms:
        n_in = id_to_name[groups.find(gin)] if gin is not None else None
        n_out = id_to_name[groups.find(gout)] if gout is not None else None
        cost_terms.append(CostTerm(module, n_in, n_out, widths.get(n_in, 1),
                                   widths.get(n_out, 0) if gout is not None or gin is not None
                                   else 1,  # attention: a constant
                                   weight_coef, mac_coef, bias, first_call_, g_count,
                                   counted(module) or module in attention_seen))
    norms = [(id_to_name[groups.find(g)], widths[id_to_name[groups.find(g)]], per_channel)
             for g, per_channel, module in norm_calls if counted(module)]
    graph = PruningGraph(model, final, cost_terms, tuple(input_size), residual, blocks,
                         prune_classifier_input, norms)
    if attention_count:
        streams = "/".join(str(w) for w in sorted(attention_widths))
        graph.limits = (
            f"{type(model).__name__} has {attention_count} attention layers: only the MLP hidden "
            f"units are pruned (scored by CI on each image's tokens x hidden map); attention "
            f"(heads, q/k/v and output projections, QK^T and AV, all counted in the flops) and "
            f"the {streams}-wide residual stream it reads are kept whole")
    return graph


def _keep_if_normalised_over_channels(groups, xl, rank: int, layer_norm_shape, name, what):
    """A norm whose statistics run over the channels (GroupNorm, a LayerNorm covering the
    channel dim) ties them together: their group is kept whole. A LayerNorm over trailing dims
    that leave the channels out (``layer_norm_shape`` shorter than the dims after them) does not."""
    if layer_norm_shape is not None and xl.dim < rank - len(layer_norm_shape):
        return
    for s in xl.segs:
        groups.keep(s, f"normalised over its channels by {name} ({what}): "
                    "removing a channel changes the others")


def _prunable(g: ChannelGroup, is_output, is_classifier_input, residual, prune_classifier_input,
              kept: str = "", pooled: bool = False):
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
    if kept:
        return False, kept
    if pooled:
        return False, ("computed from globally pooled 1x1 maps (a squeeze-excitation's reduced "
                       "channels): CI needs a spatial map")
    if not g.sites:
        return False, "no scored activation (no activation after its conv/BN)"
    return True, ""


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


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return ".".join(prefix)
