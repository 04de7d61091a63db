"""The pruning graph's types, shared by both engines (pccfast's own fx graph,
:mod:`pccfast.prune.fx_graph`, and Torch-Pruning's, :mod:`pccfast.prune.tp_engine`): channel
groups and the ports where layers touch them, the closed-form cost terms, the graph itself, and
the errors that say why a model cannot be pruned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # named in annotations only (postponed: from __future__ import annotations)
    from ..sites import Site

ENGINES = ("auto", "pccfast", "torch_pruning")
RESIDUAL_MODES = ("stream", "inner")


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
    site_offsets: site name -> where the group's channels start in that site's activation, for
    sites wider than the group (a conv's output that a later split reads apart; several starts
    for equal parts pruned with one index set, scored by their mean); 0 if absent.
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
    site_offsets: dict[str, tuple[int, ...]] = field(default_factory=dict)

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
        self.splits: list[tuple[str, list[list[str]]]] = []  # (module splitting channels, the
        #   groups of each part): told the parts' new widths after pruning

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

