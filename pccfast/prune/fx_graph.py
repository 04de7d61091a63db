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

The walk (:class:`GraphBuilder`, here) hands every node to one handler: a module to the rule of
its type (``register_layer``; the built-in types' rules are in :mod:`pccfast.prune.fx_layers`),
a function or method call to the handlers of :mod:`pccfast.prune.fx_calls` in order. The groups
it builds are in :mod:`pccfast.prune.fx_groups`, the traced graph in
:mod:`pccfast.prune.fx_trace`.

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

from torch import fx, nn

from ..sites import eval_modules, is_drop_path, pooled_and_last, scored_sites
from .fx_calls import CALL_HANDLERS, add_attention, channel_split, is_attention, split_piece
from .fx_groups import Groups, Layout, NodeInfo
from .fx_layers import pass_graph
from .fx_trace import describe_node, is_call, tensor_meta, trace_with_shapes
from .graph_types import ChannelGroup, CostTerm, PruningGraph
from .layer_rules import rule_for


class GraphBuilder:
    """Walks the traced graph node by node, each node handled by the rule of its module type
    (:mod:`pccfast.prune.layer_rules`) or of its function/method (``CALL_HANDLERS``), building
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
        self.groups = Groups()
        self.chan: dict[fx.Node, Layout] = {}  # node -> its channel segments
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

    def single(self, layout: Layout, n: NodeInfo) -> int:
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

    def cut(self, layout: Layout, bounds, n: NodeInfo) -> None:
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

    def split(self, layout: Layout, bounds, n: NodeInfo) -> list[Layout]:
        """The layouts of the parts of ``layout`` between consecutive ``bounds``."""
        self.cut(layout, bounds, n)
        offsets = self.offsets(layout.segs)
        return [Layout(tuple(s for s, o in offsets if a <= o < b), layout.dim)
                for a, b in zip(bounds, bounds[1:])]

    def group(self, i: int) -> ChannelGroup:
        return self.groups.get(i)

    def write(self, n: NodeInfo, *segs: int, dim: int = 1) -> None:
        """The node's output carries these groups' channels along ``dim``."""
        self.chan[n.node] = Layout(tuple(segs), dim)

    def follow(self, n: NodeInfo, source=None, layout: Layout | None = None) -> None:
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

    def share(self, n: NodeInfo, layout_in: Layout | None, out: int | None) -> None:
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
        meta = tensor_meta(node)
        if node.op == "placeholder":
            if meta is not None and len(meta.shape) >= 2:
                self.chan[node] = Layout((self.groups.new(int(meta.shape[1]), "input",
                                                           self.position[node]),))
            return
        if node.op == "output":
            for a in node.all_input_nodes:
                if a in self.chan:
                    self.output_groups.update(self.chan[a].segs)
                elif a in self.flat:
                    self.output_groups.update(self.flat[a][0])
            return
        name, what = describe_node(node, self.modules)
        x = node.args[0] if node.args else None
        n = NodeInfo(node, meta, self.position[node], name, what, x,
                     self.chan.get(x) if isinstance(x, fx.Node) else None,
                     [a for a in node.all_input_nodes if self.grouped(a)],
                     self.modules[node.target] if node.op == "call_module" else None)
        if is_attention(self, n):
            add_attention(self, n)
            return
        if node.op == "call_module":
            rule = rule_for(n.module)
            if rule is not None:
                rule.graph(self, n)
            elif is_drop_path(n.module):
                pass_graph(self, n)
            elif n.inputs:
                raise n.error("unknown module type")
            return
        # call_function / call_method / get_attr
        if channel_split(self, n) or split_piece(self, n):
            return
        if not n.inputs or meta is None:  # constants; x.size(), x.shape: no tensor comes out
            return
        for (functions, methods, names), handler in CALL_HANDLERS:
            if is_call(node, functions, methods, names) and handler(self, n):
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
    gm = trace_with_shapes(model, input_size)
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


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return ".".join(prefix)


from . import timm_layers  # noqa: E402,F401  (registers timm's layer types by name)
