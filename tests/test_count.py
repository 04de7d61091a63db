"""Counting: the conventions of SPEC section 3 and the published CHIP/HRank figures.

Conventions (pccfast.count): params = conv + linear weights and biases (BN excluded);
params_all = every parameter; flops = MACs of conv + linear (no bias); flops_bn = BatchNorm's
own ops as thop counts them (2 per output element), reported apart.
"""

import math

import pytest
import torch
from torch import nn

import pccfast
from pccfast.models import VGG16_CFG, VGGCifar, resnet50, resnet56_cifar, vgg16_cifar
from pccfast.prune.graph import build_graph

CIFAR = (1, 3, 32, 32)
IMAGENET = (1, 3, 224, 224)


def random_scores(graph, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {x.name: torch.rand(x.width, generator=g, dtype=torch.float64) for x in graph.groups
            if x.prunable}


def test_count_small_model_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 5))
    c = pccfast.count(model, (2, 3, 8, 8))
    assert c["params"] == (3 * 4 * 9 + 4) + (4 * 6 * 9) + (96 * 5 + 5)
    assert c["params_all"] == c["params"] + 2 * 4
    assert c["flops"] == 2 * (4 * 64 * 27 + 6 * 16 * 36 + 5 * 96)  # batch of 2
    assert c["flops_bn"] == 2 * (2 * 4 * 64)


def test_count_restores_mode_and_rejects_bad_sizes():
    model = vgg16_cifar(width=0.125).train()
    pccfast.count(model, CIFAR)
    assert model.training
    with pytest.raises(TypeError, match="input_size"):
        pccfast.count(model, 32)
    with pytest.raises(ValueError, match="input_size"):
        pccfast.count(model, (1, 3, 0, 32))
    with pytest.raises(TypeError, match="model"):
        pccfast.count("vgg", CIFAR)


def test_published_baselines_cifar():
    vgg = pccfast.count(vgg16_cifar(), CIFAR)
    assert vgg["params"] == 14_982_474  # 14.98M (BN excluded; 14.99M with BN)
    assert round(vgg["flops"] / 1e6, 1) == 313.5  # ~313.5M MACs (HRank/CHIP print 313.73M)
    resnet = pccfast.count(resnet56_cifar(), CIFAR)
    assert round(resnet["params"] / 1e6, 2) == 0.85 and round(resnet["params_all"] / 1e6, 2) == 0.85
    assert round(resnet["flops"] / 1e6, 2) == 125.49


def test_published_baseline_resnet50():
    c = pccfast.count(resnet50(), IMAGENET)
    # 25.56M is every parameter (BN included); conv + linear alone are 25.50M.
    assert round(c["params_all"] / 1e6, 2) == 25.56
    assert round(c["params"] / 1e6, 2) == 25.50
    # ~4.11G is MACs plus BN (thop); conv + linear MACs alone are 4.09G.
    assert round((c["flops"] + c["flops_bn"]) / 1e9, 2) == 4.11
    assert round(c["flops"] / 1e9, 2) == 4.09


def vgg_with_widths(widths):
    it = iter(widths)
    return VGGCifar(tuple(v if v == "M" else next(it) for v in VGG16_CFG))


@pytest.mark.parametrize("rates,params_m,params_removed,flops_removed", [
    # CHIP's published table (params, BN excluded, as their 14.98M; FLOPs reduction in MACs).
    ("[0.21]*7+[0.75]*5", 2.76, 0.816, 0.581),
    ("[0.3]*7+[0.75]*5", 2.50, 0.833, 0.666),
    ("[0.45]*7+[0.78]*5", 1.90, 0.873, 0.786),
])
def test_chip_vgg16_rate_lists_reproduce_published_counts(rates, params_m, params_removed,
                                                          flops_removed):
    model = vgg16_cifar()
    graph = build_graph(model, CIFAR)
    pruned, plan = pccfast.prune(model, random_scores(graph), rates=rates, verify=False)
    counts = pccfast.count(pruned, CIFAR)
    assert counts == plan.after  # the plan's closed-form counts are the real ones
    assert round(counts["params"] / 1e6, 2) == params_m
    assert round(plan.removed["params"], 3) == params_removed
    assert abs(plan.removed["flops"] - flops_removed) <= 0.003  # within 0.3 points


def test_chip_leaves_the_last_vgg_conv_unpruned():
    """CHIP's 12-entry list skips one of the 13 convs: only skipping the last gives 2.76M."""
    convs = [v for v in VGG16_CFG if v != "M"]
    rates = [0.21] * 7 + [0.75] * 5

    def params_when_skipping(skipped):
        pruned_layers = [i for i in range(13) if i != skipped]
        widths = list(convs)
        for i, r in zip(pruned_layers, rates):
            widths[i] = int(convs[i] * (1 - r))
        return pccfast.count(vgg_with_widths(widths), CIFAR)["params"]

    assert round(params_when_skipping(12) / 1e6, 2) == 2.76
    assert round(params_when_skipping(0) / 1e6, 2) != 2.76
    graph = build_graph(vgg16_cifar(), CIFAR)
    assert [g.name for g in graph.prunable][-1] == "features.conv15"
    assert not graph.group("features.conv16").prunable


@pytest.mark.parametrize("rates,params_all_m,flops_g,published_flops_removed", [
    ("[0.]+[0.1]*3+[0.35]*16", 15.09, 2.26, 0.448),
    ("[0.]+[0.25]*3+[0.5]*16", 11.05, 1.52, 0.628),
    ("[0.]+[0.5]*3+[0.6]*16", 8.02, 0.95, 0.767),
])
def test_chip_resnet50_rate_lists(rates, params_all_m, flops_g, published_flops_removed):
    """CHIP's ImageNet table counts all params and MACs + BN (thop); stage streams aligned."""
    model = resnet50()
    graph = build_graph(model, IMAGENET)
    _, plan = pccfast.prune(model, random_scores(graph), rates=rates, input_size=IMAGENET,
                            verify=False)
    after, before = plan.after, plan.before
    assert round(after["params_all"] / 1e6, 2) == params_all_m
    assert round((after["flops"] + after["flops_bn"]) / 1e9, 2) == flops_g
    thop_removed = 1 - (after["flops"] + after["flops_bn"]) / (before["flops"] + before["flops_bn"])
    assert abs(thop_removed - published_flops_removed) <= 0.005


def test_chip_resnet56_rate_list():
    """[0.]+[0.15]*2+[0.4]*27: 0.48M params as published. FLOPs land 0.9 points above CHIP's
    47.4% because aligned streams also prune the stem (CHIP keeps it at 16 and crops)."""
    model = resnet56_cifar()
    graph = build_graph(model, CIFAR)
    _, plan = pccfast.prune(model, random_scores(graph), rates="[0.]+[0.15]*2+[0.4]*27",
                            verify=False)
    assert round(plan.after["params"] / 1e6, 2) == 0.48
    assert plan.widths["layer1"] == 13 and plan.widths["layer2"] == 27
    assert plan.widths["layer1.0.conv1"] == 9 and plan.widths["layer3.8.conv1"] == 38
    assert abs(plan.removed["flops"] - 0.474) <= 0.01


def test_graph_cost_equals_count_after_surgery():
    for model, size in [(vgg16_cifar(width=0.25), CIFAR), (resnet56_cifar(width=0.5), CIFAR),
                        (resnet50(width=0.25), (1, 3, 64, 64))]:
        graph = build_graph(model, size)
        pruned, plan = pccfast.prune(model, random_scores(graph, 3), tau=0.5, input_size=size,
                                     verify=False)
        assert pccfast.count(pruned, size) == plan.after
        assert pccfast.count(model, size) == plan.before
        assert math.isclose(plan.removed["params"],
                            1 - plan.after["params"] / plan.before["params"])


def test_attention_counts_its_projections_and_token_products():
    """nn.MultiheadAttention runs its projections as functions (no Linear hook fires): the
    count adds q/k/v/out projections (4 L E^2) and QK^T, AV (2 L^2 E) per sequence, whether
    called with keywords or sequence-first."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(16, 2, batch_first=True)
            self.b = nn.MultiheadAttention(16, 4)

        def forward(self, x):
            y = self.a(query=x, key=x, value=x, need_weights=False)[0].permute(1, 0, 2)
            return self.b(y, y, y)[0]

    n, length, e = 2, 5, 16
    counted = pccfast.count(Two(), (n, length, e))
    per_layer = n * (4 * length * e * e + 2 * length * length * e)
    assert counted["flops"] == 2 * per_layer
    assert counted["params"] == 2 * (4 * e * e + 4 * e)  # in_proj and out_proj, with biases
    # the pruner's closed form: the same
    graph = build_graph(Two(), (n, length, e), engine="pccfast")
    assert graph.cost({})["flops"] == counted["flops"]
    assert graph.cost({})["params"] == counted["params"]
