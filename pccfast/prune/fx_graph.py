"""pccfast's own pruning engine's graph: which channels move together in a CNN.

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
- a split along the channels (MixNet's mixed kernels, Res2Net's scales, CSPNet's cross-stage
  halves) cuts the output of the conv writing the channels into groups of its own, one per
  part (the walk runs again with the cut); the module that splits is told its parts' new
  widths after pruning (:func:`pccfast.prune.layer_rules.register_split`), equal parts split
  by one size are pruned with one index set, and a split it cannot resize keeps its channels;
- a grouped conv's input and output groups keep the same number of channels in each of the
  conv's groups (``chunks``), so the conv keeps its ``groups`` (ResNeXt, RegNet);
- a layer type of its own registers how it joins the groups (:mod:`pccfast.prune.layer_rules`;
  the zoo's option-A shortcut, :class:`pccfast.models.PadShortcut`, reads one group and writes
  another, so the two stages' streams stay separate groups).

The walk (:class:`GraphBuilder`) hands every node to one handler: a module to the rule of its
type (``register_layer``; the built-in types are registered below), a function or method call
to the handlers of ``_CALL_HANDLERS`` in order.

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
:func:`pccfast.prune.graph.build_graph` with ``engine="auto"`` then hands the model to
Torch-Pruning (see :mod:`pccfast.prune.tp_engine`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.nn.modules.batchnorm import _BatchNorm

from .._modules import eval_mode
from ..sites import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, ACTIVATION_MODULES
from ..sites import eval_modules, is_drop_path, pooled_and_last, scored_sites, trace
from .counting import attention_cost, is_map_attention, is_token_attention, is_window_attention
from .fx_surgery import UNPRUNABLE_CONV_HINT, unprunable_conv
from .graph_types import ChannelGroup, CostTerm, Port, PruningGraph, UnsupportedLayerError
from .layer_rules import register_layer, rule_for, split_rule_for

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
        elif isinstance(result, (tuple, list)) and result and all(
                isinstance(r, torch.Tensor) for r in result):
            n.meta["piece_shapes"] = [tuple(r.shape) for r in result]  # torch.split's pieces
        return result


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


@dataclass
class NodeInfo:
    """What a handler sees of one fx node: the node, its output's tensor metadata (None when
    it is not a tensor), its position, where it sits (``name``: the module or the call's place)
    and what it is (``what``), its first argument ``x`` and that argument's channel layout
    ``xl`` (None when it has none), the inputs carrying channels, and the called module."""

    node: fx.Node
    meta: object
    pos: int
    name: str
    what: str
    x: object
    xl: _Layout | None
    inputs: list
    module: nn.Module | None = None

    def error(self, why: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(self.name, self.what, why)


class GraphBuilder:
    """Walks the traced graph node by node, each node handled by the rule of its module type
    (:mod:`pccfast.prune.layer_rules`) or of its function/method (``_CALL_HANDLERS``), building
    channel groups (union-find), the cost terms and the notes that decide prunability."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, input_size, residual: str,
                 prune_classifier_input: bool, cuts=None):
        self.model, self.gm, self.input_size = model, gm, tuple(input_size)
        self.cuts: dict[str, tuple[int, ...]] = dict(cuts or {})  # node -> where its output
        #   channels are cut into groups of their own (a later split reads the parts apart)
        self.creator: dict[int, tuple[str, int, bool]] = {}  # group id -> (node, first channel
        #   within the node's output, whether the node's output may be cut)
        self.pieces: dict[fx.Node, list] = {}  # split node -> its pieces' layouts
        self.splits: list[tuple[str, list]] = []  # (owner module, each part's group ids)
        self.inner_sites: dict[int, list] = {}  # group id -> (Site, its starts) inside leaves
        self.residual, self.prune_classifier_input = residual, prune_classifier_input
        self.modules = dict(model.named_modules())
        self.nodes = list(gm.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.pooled_nodes, _ = pooled_and_last(gm.graph, self.modules)
        self.groups = _Groups()
        self.chan: dict[fx.Node, _Layout] = {}  # node -> its channel segments
        self.flat: dict[fx.Node, tuple[tuple[int, ...], int]] = {}  # node -> (segs, per channel)
        self.gated: set[fx.Node] = set()  # removed channels would read nonzero when masked
        self.calls: dict[str, int] = {}
        self.call_index: dict[fx.Node, int] = {}
        self.first_call: dict[str, tuple] = {}  # shared module -> (input layout, output id)
        self.producer_node: dict[int, list[fx.Node]] = {}  # group id -> conv/linear nodes
        self.add_nodes: list[fx.Node] = []
        self.terms: list[tuple] = []  # (module, in id, out id, weight coef, mac coef, bias,
        #                                first call, groups)
        self.norm_calls: list[tuple] = []  # (group id, output elements per channel, module)
        self.classifier_groups: set[int] = set()  # group ids read by a Linear layer
        self.output_groups: set[int] = set()  # group ids of the model's outputs
        self.attention_tuples: set[fx.Node] = set()  # attention calls returning tuples
        self.attention_seen: set[str] = set()  # attention modules called as functions
        self.attention_widths: set[int] = set()
        self.attention_count = 0
        self.from_input: set[fx.Node] = set()  # nodes computed from the model's inputs

    # -- helpers for handlers ---------------------------------------------------------------
    def width(self, segs) -> int:
        return sum(self.groups.get(s).width for s in segs)

    def offsets(self, segs):
        out, at = [], 0
        for s in segs:
            out.append((s, at))
            at += self.groups.get(s).width
        return out

    def single(self, layout: _Layout, n: NodeInfo) -> int:
        """The one group of a layout (a concatenation is an error for this layer)."""
        if len(layout.segs) != 1:
            raise n.error("it reads a concatenation this layer cannot split")
        return layout.segs[0]

    def new_group(self, width: int, kind: str, n: NodeInfo, pooled: bool = False) -> int:
        i = self.groups.new(width, kind, n.pos, pooled=pooled)
        self.creator[i] = (n.node.name, 0, False)
        return i

    def new_groups(self, width: int, kind: str, n: NodeInfo, pooled: bool = False
                   ) -> tuple[int, ...]:
        """The groups of a node's ``width`` output channels: one, or one per part where a
        later split reads them apart (``self.cuts``); each part's first channel is ``offset``."""
        bounds = (0,) + tuple(self.cuts.get(n.node.name, ())) + (width,)
        out = []
        for start, end in zip(bounds, bounds[1:]):
            i = self.groups.new(end - start, kind, n.pos, pooled=pooled)
            self.creator[i] = (n.node.name, start, True)
            out.append(i)
        return tuple(out)

    def cut(self, layout: _Layout, bounds, n: NodeInfo) -> None:
        """Makes every position in ``bounds`` a boundary between the layout's groups: where one
        falls inside a group, the nodes writing that group cut their outputs there and the walk
        starts again (:class:`_Recut`)."""
        wanted: dict[str, set[int]] = {}
        for s, offset in self.offsets(layout.segs):
            width = self.group(s).width
            inside = {p - offset for p in bounds if offset < p < offset + width}
            if not inside:
                continue
            root = self.groups.find(s)
            for m in range(len(self.groups.parent)):
                if self.groups.find(m) != root:
                    continue
                node, start, cuttable = self.creator.get(m, ("", 0, False))
                if not cuttable:
                    raise n.error(f"splits channels {node or 'a layer'} writes as one group "
                                  "(pccfast cuts the outputs of convs and pointwise Linears; "
                                  "other layers' outputs are kept whole)")
                wanted.setdefault(node, set()).update(start + p for p in inside)
        if wanted:
            raise _Recut({k: tuple(sorted(set(self.cuts.get(k, ())) | v))
                          for k, v in wanted.items()}, n)

    def split(self, layout: _Layout, bounds, n: NodeInfo) -> list[_Layout]:
        """The layouts of the parts of ``layout`` between consecutive ``bounds``."""
        self.cut(layout, bounds, n)
        offsets = self.offsets(layout.segs)
        return [_Layout(tuple(s for s, o in offsets if a <= o < b), layout.dim)
                for a, b in zip(bounds, bounds[1:])]

    def group(self, i: int) -> ChannelGroup:
        return self.groups.get(i)

    def write(self, n: NodeInfo, *segs: int, dim: int = 1) -> None:
        """The node's output carries these groups' channels along ``dim``."""
        self.chan[n.node] = _Layout(tuple(segs), dim)

    def follow(self, n: NodeInfo, source=None, layout: _Layout | None = None) -> None:
        """The node's output has the channels of ``source`` (default: its first argument), or
        ``layout``; a gated source makes it gated."""
        source = n.x if source is None else source
        if layout is not None:
            self.chan[n.node] = layout
        elif source in self.chan:
            self.chan[n.node] = self.chan[source]
        else:
            self.flat[n.node] = self.flat[source]
        if source in self.gated:
            self.gated.add(n.node)

    def read_gated(self, node, reason: str) -> None:
        if node in self.gated:
            for s in (self.chan[node].segs if node in self.chan else self.flat[node][0]):
                self.groups.keep(s, reason)

    def grouped(self, a) -> bool:
        return isinstance(a, fx.Node) and (a in self.chan or a in self.flat)

    def share(self, n: NodeInfo, layout_in: _Layout | None, out: int | None) -> None:
        """A module called again must prune its channels as in its first call."""
        node = n.node
        if self.call_index[node] == 0:
            self.first_call[node.target] = (layout_in, out)
            return
        before_in, before_out = self.first_call[node.target]
        if layout_in is not None and before_in is not None:
            if len(layout_in.segs) != len(before_in.segs):
                raise n.error("called again on differently concatenated channels")
            for a, b in zip(layout_in.segs, before_in.segs):
                self.groups.union(a, b, n.name, n.what, stream=False)
        if out is not None and before_out is not None:
            outs = out if isinstance(out, tuple) else (out,)
            befores = before_out if isinstance(before_out, tuple) else (before_out,)
            if len(outs) != len(befores):
                raise n.error("called again with its outputs cut differently")
            for a, b in zip(outs, befores):
                self.groups.union(a, b, n.name, n.what, stream=False)

    def constant(self, n: NodeInfo) -> bool:
        """Whether the node is computed from parameters and buffers only (not the input)."""
        return n.node not in self.from_input

    def first(self, n: NodeInfo) -> bool:
        """Whether this is the module's first call (later calls add no params)."""
        return self.call_index[n.node] == 0

    # -- the walk -----------------------------------------------------------------------------
    def run(self) -> PruningGraph:
        for node in self.nodes:
            self._visit(node)
        return self._finish()

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder" or any(a in self.from_input for a in node.all_input_nodes):
            self.from_input.add(node)
        if node.op == "call_module":
            self.call_index[node] = self.calls.get(node.target, 0)
            self.calls[node.target] = self.call_index[node] + 1
        meta = _tensor_meta(node)
        if node.op == "placeholder":
            if meta is not None and len(meta.shape) >= 2:
                self.chan[node] = _Layout((self.groups.new(int(meta.shape[1]), "input",
                                                           self.position[node]),))
            return
        if node.op == "output":
            for a in node.all_input_nodes:
                if a in self.chan:
                    self.output_groups.update(self.chan[a].segs)
                elif a in self.flat:
                    self.output_groups.update(self.flat[a][0])
            return
        name, what = _describe(node, self.modules)
        x = node.args[0] if node.args else None
        n = NodeInfo(node, meta, self.position[node], name, what, x,
                     self.chan.get(x) if isinstance(x, fx.Node) else None,
                     [a for a in node.all_input_nodes if self.grouped(a)],
                     self.modules[node.target] if node.op == "call_module" else None)
        if _is_attention(self, n):
            _attention(self, n)
            return
        if node.op == "call_module":
            rule = rule_for(n.module)
            if rule is not None:
                rule.graph(self, n)
            elif is_drop_path(n.module):
                _pass_graph(self, n)
            elif n.inputs:
                raise n.error("unknown module type")
            return
        # call_function / call_method / get_attr
        if _channel_split(self, n) or _split_piece(self, n):
            return
        if not n.inputs or meta is None:  # constants; x.size(), x.shape: no tensor comes out
            return
        for (functions, methods, names), handler in _CALL_HANDLERS:
            if _is(node, functions, methods, names) and handler(self, n):
                return
        raise n.error("an operation the structural pruner cannot follow (it might mix or "
                      "reorder channels)")

    # -- the result ---------------------------------------------------------------------------
    def _finish(self) -> PruningGraph:
        add_block = {}  # residual blocks: the innermost module around each add
        for node in self.add_nodes:
            stack = list(node.meta.get("nn_module_stack", {}).keys())
            add_block[node] = stack[-1] if stack else ""
        blocks = list(dict.fromkeys(b for b in add_block.values() if b))
        evaluated = eval_modules(self.model)
        if evaluated is not None:  # a leaf's submodules run with it (SplitAttn's conv)
            evaluated |= {f"{name}.{sub}" for name in list(evaluated) if name in self.modules
                          for sub, _ in self.modules[name].named_modules() if sub}
        final, id_to_name = self._final_groups(add_block, blocks, evaluated)
        # FLOPs are of one eval-mode forward (pccfast.count): training-only layers have params
        counted = (lambda module: True) if evaluated is None else evaluated.__contains__
        groups = self.groups
        cost_terms = []
        widths = {g.name: g.width for g in final}
        for module, gin, gout, weight_coef, mac_coef, bias, first_call, g_count in self.terms:
            n_in = id_to_name[groups.find(gin)] if gin is not None else None
            n_out = id_to_name[groups.find(gout)] if gout is not None else None
            cost_terms.append(CostTerm(module, n_in, n_out, widths.get(n_in, 1),
                                       widths.get(n_out, 0) if gout is not None or gin is not None
                                       else 1,  # attention: a constant
                                       weight_coef, mac_coef, bias, first_call, g_count,
                                       counted(module) or module in self.attention_seen))
        norms = [(id_to_name[groups.find(g)], widths[id_to_name[groups.find(g)]], per_channel)
                 for g, per_channel, module in self.norm_calls if counted(module)]
        graph = PruningGraph(self.model, final, cost_terms, tuple(self.input_size),
                             self.residual, blocks, self.prune_classifier_input, norms)
        graph.splits = [(owner, [[id_to_name[groups.find(s)] for s in part] for part in parts])
                        for owner, parts in self.splits]
        if self.attention_count:
            streams = "/".join(str(w) for w in sorted(self.attention_widths))
            graph.limits = (
                f"{type(self.model).__name__} has {self.attention_count} attention layers: only "
                "the MLP hidden units are pruned (scored by CI on each image's tokens x hidden "
                "map); attention (heads, q/k/v and output projections, QK^T and AV, all counted "
                f"in the flops) and the {streams}-wide residual stream it reads are kept whole")
        return graph

    def _site_offsets(self, root: int, g: ChannelGroup, sites: list) -> tuple[list, dict]:
        """The sites whose activation carries the group's channels, and where they start in
        each that is wider than the group (a conv's output cut into parts; several starts where
        equal parts are pruned with one index set)."""
        if not hasattr(self, "_hooked"):
            self._hooked = _site_nodes(self.gm)
        kept, offsets = [], {}
        for site in sites:
            node = self._hooked.get((site.module, site.call_index or 0))
            layout = self.chan.get(node)
            if layout is None or self.width(layout.segs) == g.width:
                kept.append(site)
                continue
            at = tuple(o for s, o in self.offsets(layout.segs) if self.groups.find(s) == root)
            if at:
                kept.append(site)
                offsets[site.name] = at
        return kept, offsets

    def _final_groups(self, add_block, blocks, evaluated):
        """The groups, named, with their sites and prunability; and root id -> name."""
        groups = self.groups
        roots = sorted({groups.find(i) for i in range(len(groups.parent))},
                       key=lambda r: groups.first[r])
        site_of = scored_sites(self.gm.graph, self.modules, chip_pool=True)
        if evaluated is not None:  # scores come from eval-mode passes: no training-only sites
            site_of = {n: s for n, s in site_of.items() if s.module in evaluated}
        classifier_roots = {groups.find(i) for i in self.classifier_groups}
        output_roots = {groups.find(i) for i in self.output_groups}
        members: dict[int, list[int]] = {}
        for i in range(len(groups.parent)):
            members.setdefault(groups.find(i), []).append(i)
        final: list[ChannelGroup] = []
        for root in roots:
            g = groups.data[root]
            g.producers = list(dict.fromkeys(g.producers))
            g.consumers = list(dict.fromkeys(g.consumers))
            producers = [n for i in members[root] for n in self.producer_node.get(i, [])]
            adds = [n for n in self.add_nodes
                    if any(groups.find(s) == root for s in self.chan[n].segs)]
            if g.kind == "stream" and adds:
                g.name = _common_prefix([add_block[n] for n in adds]) or g.convs[0]
            elif g.convs:
                g.name = g.convs[0]
            elif g.producers:
                g.name = g.producers[0].module
            else:
                g.name = "input" if g.kind == "input" else f"group{root}"
            sites = [site_of[n] for n in sorted(producers, key=self.position.get)
                     if n in site_of]
            sites += [site_of[n] for n in adds if n in site_of]
            g.sites, g.site_offsets = self._site_offsets(root, g, list(dict.fromkeys(sites)))
            for i in members[root]:  # sites inside a layer kept as one call (its rule's)
                for site, starts in self.inner_sites.get(i, ()):
                    if evaluated is None or site.module in evaluated:
                        g.sites.append(site)
                        g.site_offsets[site.name] = tuple(starts)
            if g.kind == "conv" and g.convs:
                owners = [b for b in blocks if g.convs[0].startswith(b + ".")]
                g.block = max(owners, key=len) if owners else ""
            g.prunable, g.reason = _prunable(g, root in output_roots, root in classifier_roots,
                                             self.residual, self.prune_classifier_input,
                                             groups.kept[root], groups.pooled[root])
            final.append(g)
        if len({g.name for g in final}) != len(final):
            seen: dict[str, int] = {}
            for g in final:
                seen[g.name] = seen.get(g.name, 0) + 1
                if seen[g.name] > 1:
                    g.name = f"{g.name}#{seen[g.name] - 1}"
        return final, {r: g.name for r, g in zip(roots, final)}


def _site_nodes(gm: fx.GraphModule) -> dict[tuple[str, int], fx.Node]:
    """(module name, call index) -> its call node."""
    out, calls = {}, {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            index = calls.get(node.target, 0)
            calls[node.target] = index + 1
            out[(node.target, index)] = node
    return out


class _Recut(Exception):
    """A split reads apart channels that some nodes write as one group: the walk starts again
    with those nodes' outputs cut (``cuts``: node name -> all its cut positions)."""

    def __init__(self, cuts: dict[str, tuple[int, ...]], n: NodeInfo):
        super().__init__(n.name)
        self.cuts, self.n = cuts, n


def build_fx_graph(model: nn.Module, input_size, residual: str = "stream",
                   prune_classifier_input: bool = False) -> PruningGraph:
    """pccfast's own pruning graph of ``model`` (arguments checked by
    :func:`pccfast.prune.graph.build_graph`); :class:`UnsupportedLayerError` where a layer
    cannot be followed.

    A split along the channels (MixNet's mixed kernels, Res2Net's scales, CSPNet's cross-stage
    halves, a slice) whose parts are not yet separate groups cuts the outputs of the convs that
    write them, and the walk runs again; every walk adds cut positions, so it ends."""
    gm = _trace(model, input_size)
    cuts: dict[str, tuple[int, ...]] = {}
    while True:
        try:
            return GraphBuilder(model, gm, input_size, residual, prune_classifier_input,
                                cuts).run()
        except _Recut as recut:
            if all(set(v) <= set(cuts.get(k, ())) for k, v in recut.cuts.items()):
                raise recut.n.error("splits channels at positions the pruner cannot cut "
                                    "apart") from None
            cuts.update(recut.cuts)


_SPLIT_FUNCTIONS = (torch.split, torch.chunk, torch.tensor_split)
_SPLIT_METHODS = ("split", "chunk", "tensor_split")


def _channel_split(b: GraphBuilder, n: NodeInfo) -> bool:
    """A split along the channels: each part carries the groups between its bounds (the
    writers' outputs cut where a bound falls inside one of them).

    The split's sizes live in the module whose forward splits (the *owner*); after pruning it
    is told its parts' widths by its rule (:func:`pccfast.prune.layer_rules.register_split`).
    A split into equal parts by one size (``torch.split(x, self.width, 1)``, ``chunk``) must
    stay equal: its parts are pruned with one index set. A split whose owner has no rule keeps
    its parts' channels (chunk needs none: equal parts stay equal)."""
    if n.xl is None or not _is(n.node, _SPLIT_FUNCTIONS, _SPLIT_METHODS):
        return False
    node = n.node
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    x_meta = _tensor_meta(n.x)
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
    chunked = _is(node, (torch.chunk,), ("chunk",))
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


def _split_piece(b: GraphBuilder, n: NodeInfo) -> bool:
    """``parts[i]`` of a split: that part's groups."""
    node = n.node
    if not (node.op == "call_function" and node.target is operator.getitem
            and n.x in b.pieces and isinstance(node.args[1], int)):
        return False
    b.follow(n, source=n.x, layout=b.pieces[n.x][node.args[1]])
    return True


# -- attention: kept whole, counted as a constant ---------------------------------------------
def _is_attention(b: GraphBuilder, n: NodeInfo) -> bool:
    node = n.node
    return (isinstance(n.module, _ATTENTION_MODULES) or is_token_attention(n.module)
            or _is(node, names=_ATTENTION_FUNCTION_NAMES)
            or (node.op == "call_function" and node.target is operator.getitem
                and n.x in b.attention_tuples))


def _attention(b: GraphBuilder, n: NodeInfo) -> None:
    node = n.node
    called = (isinstance(n.module, _ATTENTION_MODULES) or is_token_attention(n.module)
              or _is(node, names=_ATTENTION_FUNCTION_NAMES))
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
        shapes = [tuple(_tensor_meta(a).shape) for a in given[:3]
                  if _tensor_meta(a) is not None]
        params, macs = attention_cost(module, shapes)
        first = b.calls.get(owner, 1) == 1 if node.op == "call_module" else (
            owner not in b.attention_seen)
        b.attention_seen.add(owner)
        b.attention_count += 1
        b.attention_widths.update(int(_tensor_meta(a).shape[b.chan[a].dim if a in b.chan
                                                             else -1])
                                  for a in n.inputs[:1] if _tensor_meta(a) is not None)
        b.terms.append((owner, None, None, params, macs, False, first, 1))
    if n.meta is None:
        b.attention_tuples.add(node)  # MultiheadAttention's (output, weights)
    elif len(n.meta.shape) >= 2:
        map_attention = n.module is not None and is_map_attention(n.module)  # (N, C, H, W)
        dim = 1 if map_attention else len(n.meta.shape) - 1
        out = b.groups.new(int(n.meta.shape[dim]), "other", n.pos)
        b.groups.keep(out, why)
        b.chan[node] = _Layout((out,), dim)


# -- module handlers: one per layer type (pccfast.prune.layer_rules) --------------------------
def _conv_graph(b: GraphBuilder, n: NodeInfo) -> None:
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


def _batch_norm_graph(b: GraphBuilder, n: NodeInfo) -> None:
    x, xl, node = n.x, n.xl, n.node
    per_channel = math.prod(n.meta.shape) // n.module.num_features
    layout = xl.segs if xl is not None and xl.dim == 1 else (
        b.flat[x][0] if x in b.flat and b.flat[x][1] == 1 else None)
    if layout is None:
        raise n.error("normalises a flattened tensor")
    for s, offset in b.offsets(layout):
        b.group(s).producers.append(Port(node.target, "bn", 1, offset))
        b.norm_calls.append((s, per_channel, node.target))
    b.share(n, xl or _Layout(layout), None)
    if xl is not None:
        b.chan[node] = xl
    else:
        b.flat[node] = b.flat[x]
    # the masked original zeroes a BN's removed outputs: no gate passes


def _linear_graph(b: GraphBuilder, n: NodeInfo) -> None:
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
    x_meta = _tensor_meta(x)
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
    b.share(n, _Layout(segs), out)
    if pointwise:
        b.write(n, out, dim=dim)
    else:
        b.flat[node] = ((out,), 1)


def _channel_norm_graph(b: GraphBuilder, n: NodeInfo) -> None:
    if n.xl is None:
        if n.inputs:
            raise n.error("unknown module type")
        return
    shape = n.module.normalized_shape if isinstance(n.module, nn.LayerNorm) else None
    _keep_if_normalised_over_channels(b.groups, n.xl, len(n.meta.shape), shape, n.name, n.what)
    b.chan[n.node] = n.xl


def _pass_graph(b: GraphBuilder, n: NodeInfo) -> None:
    """Elementwise or spatial layers; gates (sigmoid) make their output gated."""
    if isinstance(n.module, nn.PReLU) and n.module.num_parameters != 1:
        raise n.error("per-channel slopes")
    if n.xl is not None:
        b.chan[n.node] = n.xl
    elif n.x in b.flat:
        b.flat[n.node] = b.flat[n.x]
    if n.x in b.gated or isinstance(n.module, _GATE_MODULES):
        b.gated.add(n.node)


def _flatten_graph(b: GraphBuilder, n: NodeInfo) -> None:
    xl, module = n.xl, n.module
    if xl is not None and xl.dim == 1 and module.start_dim == 1 and module.end_dim == -1:
        b.flat[n.node] = (xl.segs, math.prod(_tensor_meta(n.x).shape[2:]))
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
    register_layer(_cls, graph=_pass_graph)


# -- function and method handlers, tried in order; False: not this handler's case ----------
_CALL_HANDLERS: list = []


def _on_call(functions=(), methods=(), names=()):
    """Registers a handler of calls to these functions / methods / function names."""
    def register(handler):
        _CALL_HANDLERS.append(((tuple(functions), tuple(methods), tuple(names)), handler))
        return handler
    return register


@_on_call(_PASS_FUNCTIONS + _GATE_FUNCTIONS, _PASS_METHODS + _GATE_METHODS,
          _PASS_FUNCTION_NAMES)
def _pass_call(b: GraphBuilder, n: NodeInfo) -> bool:
    if not (len(n.inputs) == 1 and n.inputs[0] is n.x):
        return False
    b.follow(n)
    if _is(n.node, _GATE_FUNCTIONS, _GATE_METHODS):
        b.gated.add(n.node)
    return True


@_on_call(_ADD_FUNCTIONS + _MUL_FUNCTIONS + _DIV_FUNCTIONS,
          _ADD_METHODS + _MUL_METHODS + _DIV_METHODS)
def _arithmetic_call(b: GraphBuilder, n: NodeInfo) -> bool:
    """x + y joins two groups (a residual stream); x * y a gate; x * c, x + c keep x's."""
    node = n.node
    operands = list(node.args[:2])
    is_add = _is(node, _ADD_FUNCTIONS, _ADD_METHODS)
    is_div = _is(node, _DIV_FUNCTIONS, _DIV_METHODS)
    tracked = [a for a in operands if isinstance(a, fx.Node) and a in b.chan]
    if len(tracked) == 2:
        return _join(b, n, tracked, is_add, is_div)
    if len(tracked) == 1 and (tracked[0] is operands[0] or not is_div):
        t = tracked[0]
        other = operands[1] if operands[0] is t else operands[0]
        layout = b.chan[t]
        other_meta = _tensor_meta(other)
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


def _join(b: GraphBuilder, n: NodeInfo, tracked, is_add: bool, is_div: bool) -> bool:
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
def _patch_merging_call(b: GraphBuilder, n: NodeInfo) -> bool:
    """Swin's patch merging: zero-pads H and W, concatenates 4 strided views on channels."""
    if not (len(n.inputs) == 1 and n.inputs[0] is n.x) or n.xl is None:
        return False
    b.follow(n, layout=_Layout(n.xl.segs * 4, n.xl.dim))
    return True


@_on_call((torch.cat,))
def _cat_call(b: GraphBuilder, n: NodeInfo) -> bool:
    """Along channels: one segment per input; along tokens (ViT's class token): one group."""
    node = n.node
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = len(n.meta.shape)
    if isinstance(tensors, (list, tuple)) and all(
            isinstance(a, fx.Node) and a in b.chan for a in tensors):
        layouts = [b.chan[a] for a in tensors]
        if all(lay.dim == dim % rank for lay in layouts):
            b.chan[node] = _Layout(tuple(s for lay in layouts for s in lay.segs), dim % rank)
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
def _permute_call(b: GraphBuilder, n: NodeInfo) -> bool:
    dims = _dims(n.node)
    if n.xl is None or dims is None:
        return False
    dims = tuple(d % len(n.meta.shape) for d in dims)
    b.follow(n, layout=_Layout(n.xl.segs, dims.index(n.xl.dim)))
    return True


@_on_call((torch.transpose,), ("transpose",))
def _transpose_call(b: GraphBuilder, n: NodeInfo) -> bool:
    """Two dims swapped (timm's patch embedding: ``(N, C, HW) -> (N, HW, C)``)."""
    node = n.node
    dims = node.args[1:3] if len(node.args) >= 3 else (node.kwargs.get("dim0"),
                                                        node.kwargs.get("dim1"))
    if n.xl is None or not all(isinstance(d, int) for d in dims):
        return False
    rank = len(n.meta.shape)
    a, c = (d % rank for d in dims)
    dim = c if n.xl.dim == a else a if n.xl.dim == c else n.xl.dim
    b.follow(n, layout=_Layout(n.xl.segs, dim))
    return True


@_on_call((torch.flatten,), _FLATTEN_METHODS)
def _flatten_call(b: GraphBuilder, n: NodeInfo) -> bool:
    """(N, C, H, W) -> (N, C*H*W) for a classifier, or (N, C, H*W) tokens; else a regrouping."""
    xl, meta = n.xl, n.meta
    if xl is None or xl.dim != 1:
        return False
    in_shape = _tensor_meta(n.x).shape
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
def _channels_last_reshape_call(b: GraphBuilder, n: NodeInfo) -> bool:
    """A reshape of a channels-last tensor that keeps the channels last (timm's Swin windows),
    or merges the dims just before them into the channels (patch merging: one segment run per
    merged position)."""
    xl, out = n.xl, tuple(n.meta.shape)
    if xl is None or not isinstance(n.x, fx.Node) or _tensor_meta(n.x) is None:
        return False
    shape = tuple(_tensor_meta(n.x).shape)
    if xl.dim != len(shape) - 1 or len(out) < 2:
        return False
    if out[-1] == shape[-1]:
        b.follow(n, layout=_Layout(xl.segs, len(out) - 1))
        return True
    merged = out[-1] // shape[-1]
    for k in range(len(shape) - 1):
        if (out[-1] == merged * shape[-1] and math.prod(shape[k:-1]) == merged
                and shape[:k] == out[:-1]):
            b.follow(n, layout=_Layout(xl.segs * merged, len(out) - 1))
            return True
    return False


@_on_call((F.pad,))
def _pad_call(b: GraphBuilder, n: NodeInfo) -> bool:
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
def _roll_call(b: GraphBuilder, n: NodeInfo) -> bool:
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
def _reduce_call(b: GraphBuilder, n: NodeInfo) -> bool:
    """A mean/max over spatial dims (global pooling): channels stay."""
    if n.xl is None:
        return False
    in_shape = _tensor_meta(n.x).shape
    dims = {d % len(in_shape) for d in (_dims(n.node) or ())}
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
def _getitem_call(b: GraphBuilder, n: NodeInfo) -> bool:
    """Basic indexing that keeps every channel."""
    if n.xl is None:
        return False
    at = _index_channel_dim(n.node.args[1], len(_tensor_meta(n.x).shape), n.xl.dim)
    if at is None:
        return False
    b.follow(n, layout=_Layout(n.xl.segs, at))
    return True


@_on_call(_CHANNEL_NORM_FUNCTIONS)
def _channel_norm_call(b: GraphBuilder, n: NodeInfo) -> bool:
    if n.xl is None:
        return False
    node = n.node
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    if node.target is not F.layer_norm or not isinstance(shape, (tuple, list)):
        shape = None
    _keep_if_normalised_over_channels(b.groups, n.xl, len(n.meta.shape), shape, n.name, n.what)
    b.chan[node] = n.xl
    return True


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
        return False, ("read by the classifier (CHIP keeps it; prune_classifier_input=True "
                       "prunes it)")
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


from . import timm_layers  # noqa: E402,F401  (registers timm's layer types by name)
