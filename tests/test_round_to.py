"""round_to=N: every pruned channel group keeps a multiple of N channels (at least N), grouped
convs keep whole groups, counts round up (tau's share and a rate's bound still hold), budgets
are met over the rounded counts or refused with the reachable range."""

import json
import math
import warnings

import pytest
import torch

import pccfast
from pccfast.prune.graph import ChannelGroup, build_graph
from pccfast.prune.plan import (BUDGET_TOLERANCE, Plan, check_round_to, keep_for_budget,
                                keep_from_rate, keep_from_tau, round_keep_to, step_keep)
from test_model_families import TORCHVISION, GroupedNet, random_scores


def group(width, chunks=1):
    return ChannelGroup("g", width, "conv", chunks=chunks)


@pytest.mark.parametrize("width, chunks, round_to, k, expected", [
    (64, 1, 8, 1, 8), (64, 1, 8, 8, 8), (64, 1, 8, 9, 16), (64, 1, 8, 57, 64), (64, 1, 8, 64, 64),
    (12, 1, 8, 5, 8), (12, 1, 8, 9, 12),  # rounding past the width keeps the group whole
    (4, 1, 8, 1, 4),  # narrower than one step: whole
    (64, 1, 1, 37, 37),
    (16, 4, 8, 5, 8), (16, 4, 8, 11, 16),  # 4 groups of 4: steps of lcm(8, 4) = 8
    (48, 3, 8, 1, 24), (128, 32, 8, 40, 64),  # lcm(8, 3) = 24; lcm(8, 32) = 32
])
def test_keep_counts_round_up_to_whole_steps(width, chunks, round_to, k, expected):
    assert round_keep_to(group(width, chunks), k, round_to) == expected


@pytest.mark.parametrize("width, chunks, round_to, k, down, up", [
    (64, 1, 8, 16, 8, 24), (64, 1, 8, 8, None, 16), (64, 1, 8, 64, 56, None),
    (60, 1, 8, 60, 56, None), (60, 1, 8, 56, 48, 60),  # the full width is on the grid
    (16, 4, 8, 8, None, 16), (48, 3, 8, 48, 24, None), (10, 1, 1, 5, 4, 6),
])
def test_the_refinement_steps_on_the_rounded_grid(width, chunks, round_to, k, down, up):
    g = group(width, chunks)
    assert step_keep(g, k, -1, round_to) == down and step_keep(g, k, +1, round_to) == up


@pytest.mark.parametrize("value, error", [(0, ValueError), (-8, ValueError), (2.5, TypeError),
                                          (True, TypeError), ("8", TypeError)])
def test_bad_round_to_is_named(value, error):
    with pytest.raises(error, match="round_to must be a positive integer"):
        check_round_to(value)
    model = pccfast.models.vgg16_cifar(width=0.25)
    with pytest.raises(error, match="round_to"):
        pccfast.prune(model, {}, rates=0.5, round_to=value)


def assert_rounded(plan, round_to, graph):
    """Every pruned group keeps a multiple of its step (whole groups of a grouped conv)."""
    for layer in plan.layers:
        g = graph.group(layer.name)
        step = math.lcm(round_to, g.chunks)
        if layer.width_after < layer.width_before:
            assert layer.width_after % step == 0 and layer.width_after >= step, layer
        assert len(layer.kept_indices) == layer.width_after


def test_vgg_rate_list_rounds_up_and_the_model_matches():
    torch.manual_seed(0)
    model = pccfast.models.vgg16_cifar(width=0.5).eval()
    graph = build_graph(model, (1, 3, 32, 32))
    scores = random_scores(graph)
    rates = "[0.51]*7+[0.90]*5"
    _, plain = pccfast.prune(model, scores, rates=rates)
    pruned, plan = pccfast.prune(model, scores, rates=rates, round_to=8)  # verify=True
    assert plan.round_to == 8
    assert_rounded(plan, 8, graph)
    for a, b in zip(plain.layers, plan.layers):  # up, by less than one step
        assert a.width_after <= b.width_after < a.width_after + 8
        assert b.width_after >= keep_from_rate(a.width_before, b.rate)
        assert set(a.kept_indices) <= set(b.kept_indices)  # the same ranking, more of it
    assert any(a.width_after != b.width_after for a, b in zip(plain.layers, plan.layers))
    convs = [m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs[:12]] == [layer.width_after for layer in plan.layers]
    again = Plan.from_json(plan.to_json())
    assert again.round_to == 8 and json.loads(plan.to_json())["round_to"] == 8
    older = {k: v for k, v in plan.to_dict().items() if k != "round_to"}  # plans before round_to
    assert Plan.from_dict(older).round_to == 1


def test_tau_still_reaches_its_share_of_the_scores():
    torch.manual_seed(1)
    model = pccfast.models.resnet56_cifar().eval()
    graph = build_graph(model, (1, 3, 32, 32))
    scores = random_scores(graph, seed=2)
    _, plan = pccfast.prune(model, scores, tau=0.6, round_to=16, verify=False)
    assert_rounded(plan, 16, graph)
    for layer in plan.layers:
        k = keep_from_tau(scores[layer.name], 0.6)
        assert layer.width_after == min(layer.width_before, -(-k // 16) * 16)


def test_grouped_conv_keeps_whole_groups_in_steps_of_round_to():
    torch.manual_seed(0)
    model = GroupedNet().eval()
    size = (1, 3, 8, 8)
    graph = build_graph(model, size)
    pruned, plan = pccfast.prune(model, random_scores(graph, seed=3), rates=0.6, input_size=size,
                                 round_to=8)
    # int(16 * 0.4) = 6 -> 8: two of each group's four channels
    assert plan.widths["conv1"] == plan.widths["conv2"] == 8
    assert pruned.conv2.groups == 4 and pruned.conv2.weight.shape == (8, 2, 3, 3)
    x = torch.randn(2, 3, 8, 8)
    assert pruned(x).shape == model(x).shape


def test_a_budget_is_met_over_the_rounded_counts():
    torch.manual_seed(0)
    model = pccfast.models.vgg16_cifar(width=0.5).eval()
    graph = build_graph(model, (1, 3, 32, 32))
    pruned, plan = pccfast.prune(model, random_scores(graph), target_flops=0.6, round_to=8)
    assert abs(plan.removed["flops"] - 0.6) <= BUDGET_TOLERANCE
    assert_rounded(plan, 8, graph)
    assert pccfast.count(pruned, (1, 3, 32, 32))["flops"] == plan.after["flops"]


@pytest.mark.parametrize("rates", [None, "[0.3]*7+[0.6]*5"])
def test_a_small_models_budget_is_met_by_refining_in_steps_of_round_to(rates):
    """A quarter-width VGG (16-128 channels): tau (or the rate scale) alone moves several layers
    by 8 channels at once and misses 0.4; the channel refinement finishes in steps of 8."""
    torch.manual_seed(0)
    model = pccfast.models.vgg16_cifar(width=0.25).eval()
    graph = build_graph(model, (1, 3, 32, 32))
    scores = random_scores(graph)
    keep, setting = keep_for_budget(graph, scores, "flops", 0.4, rates, round_to=8)
    assert setting["channels_moved"] > 0  # the search alone did not meet it
    assert setting["channels_moved"] % 8 == 0
    for name, k in keep.items():
        width = graph.group(name).width
        assert k == width or (k % 8 == 0 and k >= 8), (name, k)
    pruned, plan = pccfast.prune(model, scores, target_flops=0.4, rates=rates, round_to=8)
    assert abs(plan.removed["flops"] - 0.4) <= BUDGET_TOLERANCE
    assert_rounded(plan, 8, graph)


def test_an_unreachable_budget_is_refused_with_the_range():
    model = pccfast.models.vgg16_cifar(width=0.25).eval()  # 16..128 channels
    graph = build_graph(model, (1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"target_flops=0.99 cannot be met.*allow removing "
                                         r"0\.0000 to 0\.\d+"):
        pccfast.prune(model, random_scores(graph), target_flops=0.99, round_to=16)


FAMILIES = [pytest.param(name, size, id=name) for name, size, slow in TORCHVISION
            if not slow and name in ("resnet18", "resnext50_32x4d", "mobilenet_v2",
                                     "efficientnet_b0", "regnet_y_400mf", "densenet121",
                                     "convnext_tiny", "googlenet")]


@pytest.mark.parametrize("name, size", FAMILIES)
def test_round_to_invariants_over_the_model_families(name, size):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    shape = (1, 3, size, size)
    graph = build_graph(model, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to Torch-Pruning
        pruned, plan = pccfast.prune(model, random_scores(graph), target_flops=0.5,
                                     input_size=shape, round_to=8)  # verify=True
    assert abs(plan.removed["flops"] - 0.5) <= BUDGET_TOLERANCE
    assert_rounded(plan, 8, graph)
    assert pccfast.count(pruned, shape)["flops"] == plan.after["flops"]
