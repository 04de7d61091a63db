"""A layer type of one's own joins pccfast's pruning graph with one registry entry
(pccfast.prune.layer_rules), as the zoo's PadShortcut does: its graph rule, its surgery and
the tracer's leaf flag."""

import pytest
import torch
from torch import nn

import pccfast
from pccfast.prune import layer_rules
from pccfast.prune.graph import build_graph
from pccfast.prune.graph_types import Port
from pccfast.prune.surgery import mask_hooks


class ChannelScale(nn.Module):
    """A learnable per-channel gain: without a rule, pccfast keeps the channels it scales."""

    def __init__(self, channels: int):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.gain.view(1, -1, 1, 1)


def _scale_graph(builder, n):
    group = builder.single(n.xl, n)
    builder.group(group).producers.append(Port(n.node.target, "scale"))
    builder.follow(n)


def _scale_slice(module, kept):
    module.gain = nn.Parameter(module.gain.detach()[kept["scale"]].clone())


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), ChannelScale(12),
        nn.Conv2d(12, 10, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(10, 5))


@pytest.fixture
def registry(monkeypatch):
    """The rules as they are, restored after the test."""
    monkeypatch.setattr(layer_rules, "_RULES", dict(layer_rules._RULES))


def test_an_unregistered_per_channel_layer_keeps_its_channels(registry):
    graph = build_graph(_model(), (1, 3, 8, 8), engine="pccfast")
    assert "per-channel tensor" in graph.group("0").reason


def test_a_registered_layer_prunes_and_matches_the_masked_original(registry):
    layer_rules.register_layer(ChannelScale, graph=_scale_graph, slice=_scale_slice, leaf=True)
    model = _model()
    size = (1, 3, 8, 8)
    graph = build_graph(model, size, engine="pccfast")
    group = graph.group("0")
    assert group.prunable and Port("3", "scale") in group.producers
    g = torch.Generator().manual_seed(1)
    scores = {x.name: torch.rand(x.width, generator=g, dtype=torch.float64)
              for x in graph.prunable}
    pruned, plan = pccfast.prune(model, scores, rates=0.5, input_size=size, engine="pccfast")
    assert pruned[3].gain.numel() == plan.widths["0"] < 12
    kept = {layer.name: torch.tensor(layer.kept_indices) for layer in plan.layers
            if layer.width_after < layer.width_before}
    x = torch.randn(3, 3, 8, 8)
    handles = mask_hooks(model, graph, kept)
    try:
        with torch.no_grad():
            reference = model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(pruned.eval()(x), reference)


def test_register_layer_checks_its_arguments():
    with pytest.raises(TypeError, match="cls must be a module class"):
        layer_rules.register_layer("ChannelScale", graph=_scale_graph)
    with pytest.raises(TypeError, match="callables"):
        layer_rules.register_layer(ChannelScale, graph=None)


def test_the_zoo_shortcut_is_one_registered_leaf():
    from pccfast.models import PadShortcut

    rule = layer_rules.rule_for(PadShortcut(4, 8, 2))
    assert rule is not None and rule.leaf and rule.slice is not None
    assert PadShortcut in layer_rules.leaf_types()
