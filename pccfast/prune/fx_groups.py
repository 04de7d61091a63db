"""The channel groups of pccfast's own engine as its walk builds them
(:mod:`pccfast.prune.fx_graph`): a union-find over group ids, the layout of a tensor's channels
(its groups in channel order and the channel dim), and what a handler is told about the node it
handles."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import fx, nn

from .graph_types import ChannelGroup, UnsupportedLayerError


class Groups:
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
class Layout:
    """The channels of a tensor: its segments (group ids, in channel order) and channel dim."""

    segs: tuple[int, ...]
    dim: int = 1


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
    xl: Layout | None
    inputs: list
    module: nn.Module | None = None

    def error(self, why: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(self.name, self.what, why)


def keep_if_normalised_over_channels(groups, xl, rank: int, layer_norm_shape, name, what):
    """A norm whose statistics run over the channels (GroupNorm, a LayerNorm covering the
    channel dim) ties them together: their group is kept whole. A LayerNorm over trailing dims
    that leave the channels out (``layer_norm_shape`` shorter than the dims after them) does not."""
    if layer_norm_shape is not None and xl.dim < rank - len(layer_norm_shape):
        return
    for s in xl.segs:
        groups.keep(s, f"normalised over its channels by {name} ({what}): "
                    "removing a channel changes the others")
