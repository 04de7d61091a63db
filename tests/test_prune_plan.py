"""Plans: the safe rate-list parser, CHIP's layouts, top-k/tau choices, budgets, JSON."""

import json

import pytest
import torch

import pccfast
from pccfast.models import resnet50, resnet56_cifar, vgg16_cifar
from pccfast.prune import Plan, parse_rates, rate_layout
from pccfast.prune.graph import build_graph
from pccfast.prune.plan import kept_indices, keep_from_tau

CIFAR = (1, 3, 32, 32)


def random_scores(graph, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {x.name: torch.rand(x.width, generator=g, dtype=torch.float64) for x in graph.groups
            if x.prunable}


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    model = vgg16_cifar(width=0.25)
    graph = build_graph(model, CIFAR)
    return model, graph, random_scores(graph)


@pytest.mark.parametrize("text,expected", [
    ("[0.21]*7+[0.75]*5", [0.21] * 7 + [0.75] * 5),
    ("[0.]+[0.15]*2+[0.4]*27", [0.0] + [0.15] * 2 + [0.4] * 27),
    (" [0.1, 0.2] * 2 + [.5] ", [0.1, 0.2, 0.1, 0.2, 0.5]),
    ("[0]*3", [0.0, 0.0, 0.0]),
    ("[1e-1]", [0.1]),
])
def test_parse_rates(text, expected):
    assert parse_rates(text) == expected


@pytest.mark.parametrize("text", [
    "", "[0.1]*2.5", "[0.1]+", "[0.1]*-1", "0.5", "[0.1]*7+[__import__('os')]",
    "[0.1]*7+[exec('x')]", "(0.1)*2", "[0.1]*2*3", "[0.1,]", "[0.1] [0.2]",
])
def test_parse_rates_rejects_everything_else(text):
    with pytest.raises(ValueError, match="rates"):
        parse_rates(text)
    with pytest.raises(TypeError, match="rates"):
        parse_rates([0.1])


def test_rate_layouts_follow_chip():
    vgg = rate_layout(build_graph(vgg16_cifar(width=0.125), CIFAR))
    assert len(vgg) == 12 and vgg[0].groups == ("features.conv0",)
    r56 = rate_layout(build_graph(resnet56_cifar(width=0.25), CIFAR))
    assert len(r56) == 30  # stem + 2 stage streams + 27 blocks
    assert [s.label for s in r56[:3]] == ["stem (in layer1)", "layer1", "layer2"]
    assert r56[3].groups == ("layer1.0.conv1",)
    r50 = rate_layout(build_graph(resnet50(width=0.125), (1, 3, 64, 64)))
    assert len(r50) == 20  # stem + 3 stage streams + 16 blocks
    assert r50[0].groups == ("conv1",) and r50[3].groups == ("layer3",)
    assert r50[4].groups == ("layer1.0.conv1", "layer1.0.conv2")


def test_wrong_length_names_the_expected_count(vgg):
    model, graph, scores = vgg
    with pytest.raises(ValueError, match="expects 12"):
        pccfast.prune(model, scores, rates="[0.21]*7+[0.75]*4")
    with pytest.raises(ValueError, match=r"rates\[3\].*\[0, 1\)"):
        pccfast.prune(model, scores, rates=[0.1] * 3 + [1.0] + [0.1] * 8)


def test_rates_keep_chips_counts_and_the_top_ci_channels(vgg):
    model, graph, scores = vgg
    pruned, plan = pccfast.prune(model, scores, rates="[0.21]*7+[0.75]*5")
    for layer, rate in zip(plan.layers, [0.21] * 7 + [0.75] * 5):
        assert layer.width_after == int(layer.width_before * (1 - rate))
        order = torch.argsort(scores[layer.name], descending=True)
        assert layer.kept_indices == sorted(order[: layer.width_after].tolist())
        assert layer.rate == rate
    assert plan.method == "rates" and plan.setting == {"rates": "[0.21]*7+[0.75]*5"}


def test_kept_indices_ties_go_to_the_lower_index_and_stay_in_order():
    score = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 0.0], dtype=torch.float64)
    assert kept_indices(score, 2) == [1, 3]
    assert kept_indices(score, 3) == [1, 2, 3]  # 2 and 4 tie: the lower index wins
    assert kept_indices(score, 4) == [1, 2, 3, 4]


def test_tau_keeps_the_fewest_channels_reaching_the_share():
    score = torch.tensor([1.0, 4.0, 2.0, 3.0], dtype=torch.float64)  # total 10
    assert keep_from_tau(score, 0.4) == 1
    assert keep_from_tau(score, 0.7) == 2  # 4 + 3 = 7 reaches 0.7 * 10
    assert keep_from_tau(score, 0.71) == 3
    assert keep_from_tau(score, 1.0) == 4
    assert keep_from_tau(torch.tensor([5.0, 0.0, 5.0], dtype=torch.float64), 1.0) == 2
    assert keep_from_tau(torch.zeros(4, dtype=torch.float64), 0.5) == 1


def test_tau_plan(vgg):
    model, graph, scores = vgg
    _, plan = pccfast.prune(model, scores, tau=0.6)
    for layer in plan.layers:
        assert layer.width_after == keep_from_tau(scores[layer.name], 0.6)
        assert layer.kept_indices == kept_indices(scores[layer.name], layer.width_after)


@pytest.mark.parametrize("kind,target", [("flops", 0.846), ("params", 0.9275), ("flops", 0.3)])
def test_budgets_are_met_within_half_a_point(kind, target):
    model = vgg16_cifar()
    graph = build_graph(model, CIFAR)
    pruned, plan = pccfast.prune(model, random_scores(graph, 1), **{f"target_{kind}": target})
    assert abs(plan.removed[kind] - target) <= 0.005
    assert plan.method == f"target_{kind}" and 0 < plan.setting["tau"] <= 1
    assert pccfast.count(pruned, CIFAR)[kind] == plan.after[kind]


def _lockstep_scores(graph):
    """Every layer's scores the same shares of its total, so tau moves all layers at once:
    the budget search must then finish channel by channel (issue 19: a small model on another
    machine's BLAS)."""
    return {g.name: 1 + 1e-9 * torch.arange(g.width, 0, -1, dtype=torch.float64)
            for g in graph.prunable}


LOCKSTEP_GAPS = [0.18, 0.39, 0.56, 0.70, 0.82, 0.907]  # 1.1-3.8 points from what tau reaches


@pytest.mark.parametrize("target", LOCKSTEP_GAPS + [0.5, 0.846])
def test_budgets_are_met_where_tau_alone_jumps_over_them(target):
    torch.manual_seed(0)
    model = vgg16_cifar(width=0.125)  # 8-64 channels a layer: one tau step moves every layer
    graph = build_graph(model, CIFAR)
    scores = _lockstep_scores(graph)
    pruned, plan = pccfast.prune(model, scores, target_flops=target)
    assert abs(plan.removed["flops"] - target) <= 0.005
    assert pccfast.count(pruned, CIFAR)["flops"] == plan.after["flops"]
    for layer in plan.layers:  # each layer still keeps its top-scored channels
        assert layer.kept_indices == kept_indices(scores[layer.name], layer.width_after)
    again = pccfast.prune(model, scores, target_flops=target)[1]
    assert again.widths == plan.widths  # deterministic


def test_tau_alone_misses_the_lockstep_budgets():
    """The test above would pass without the channel-by-channel step only by luck: show that
    the tau search by itself cannot meet one of its targets."""
    from pccfast.prune.plan import _removed, keep_from_tau_cumulative

    graph = build_graph(vgg16_cifar(width=0.125), CIFAR)
    scores = _lockstep_scores(graph)
    before = graph.cost({})
    cumulative = {n: torch.cumsum(s, 0) for n, s in scores.items()}
    reachable = [_removed(graph, {n: keep_from_tau_cumulative(c, tau) for n, c in
                                  cumulative.items()}, before, "flops")
                 for tau in torch.linspace(0.0, 1.0, 4001).tolist()]
    for target in LOCKSTEP_GAPS:
        assert min(abs(r - target) for r in reachable) > 0.01, target


@pytest.mark.parametrize("target", LOCKSTEP_GAPS)
def test_a_scaled_rate_profile_meets_budgets_whatever_the_scores(target):
    """The fixed allocation of the study: a rate profile scaled to the target gives the same
    keep counts for any scores, and meets the target within the tolerance."""
    torch.manual_seed(0)
    model = vgg16_cifar(width=0.125)
    graph = build_graph(model, CIFAR)
    profile = "[0.5]*7+[0.9]*5"
    plans = [pccfast.prune(model, scores, rates=profile, target_flops=target)[1]
             for scores in (_lockstep_scores(graph), random_scores(graph, 3))]
    assert plans[0].widths == plans[1].widths
    for plan in plans:
        assert abs(plan.removed["flops"] - target) <= 0.005


def test_a_budget_out_of_reach_says_the_range():
    graph = build_graph(vgg16_cifar(width=0.125), CIFAR)
    with pytest.raises(ValueError, match=r"target_flops=0\.997 cannot be met.*allow removing "
                                         r"0\.0000 to 0\.990"):  # one channel a layer: 0.9900
        pccfast.prune(vgg16_cifar(width=0.125), _lockstep_scores(graph), target_flops=0.997)


def test_budget_with_rates_scales_them(vgg):
    model, graph, scores = vgg
    _, plan = pccfast.prune(model, scores, rates="[0.21]*7+[0.75]*5", target_flops=0.7)
    assert abs(plan.removed["flops"] - 0.7) <= 0.005
    scale = plan.setting["rate_scale"]
    first = plan.layers[0]
    assert first.width_after == int(first.width_before * (1 - 0.21 * scale))


def test_unreachable_budget_and_conflicting_settings(vgg):
    model, graph, scores = vgg
    with pytest.raises(ValueError, match="cannot be met"):
        pccfast.prune(model, scores, target_params=0.999)
    with pytest.raises(ValueError, match="target_flops"):
        pccfast.prune(model, scores, target_flops=1.5)
    with pytest.raises(ValueError, match="not both"):
        pccfast.prune(model, scores, target_flops=0.5, target_params=0.5)
    with pytest.raises(ValueError, match="tau"):
        pccfast.prune(model, scores, tau=0.5, rates=0.1)
    with pytest.raises(ValueError, match="tau"):
        pccfast.prune(model, scores, tau=0.0)
    with pytest.raises(ValueError, match="how much"):
        pccfast.prune(model, scores)


def test_scores_are_checked(vgg):
    model, graph, scores = vgg
    with pytest.raises(ValueError, match="lack layer 'features.conv3'"):
        pccfast.prune(model, {k: v for k, v in scores.items() if k != "features.conv3"}, tau=0.5)
    with pytest.raises(ValueError, match="has 3 values"):
        pccfast.prune(model, {**scores, "features.conv0": torch.rand(3)}, tau=0.5)
    bad = scores["features.conv0"].clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pccfast.prune(model, {**scores, "features.conv0": bad}, tau=0.5)
    with pytest.raises(ValueError, match="lacks"):
        pccfast.prune(model, {**scores, "layer9.conv": torch.rand(3)}, tau=0.5)
    with pytest.raises(TypeError, match="scores"):
        pccfast.prune(model, list(scores.values()), tau=0.5)
    # A rate of 0 needs no score for that layer.
    rates = [0.0] * 12
    rates[1] = 0.5
    _, plan = pccfast.prune(model, {"features.conv1": scores["features.conv1"]}, rates=rates)
    assert plan.widths["features.conv1"] == 8 and plan.widths["features.conv0"] == 16


def test_resnet56_stem_entry_is_the_stage1_stream():
    model = resnet56_cifar(width=0.5)
    graph = build_graph(model, CIFAR)
    scores = random_scores(graph)
    with pytest.raises(ValueError, match=r"rates\[0\] \(stem"):
        pccfast.prune(model, scores, rates="[0.1]+[0.15]*2+[0.4]*27")
    _, same = pccfast.prune(model, scores, rates="[0.15]*3+[0.4]*27")
    _, zero = pccfast.prune(model, scores, rates="[0.]+[0.15]*2+[0.4]*27")
    assert same.kept == zero.kept and zero.widths["layer1"] == 6


def test_inner_mode_keeps_streams_whole():
    model = resnet56_cifar(width=0.5)
    graph = build_graph(model, CIFAR, residual="inner")
    scores = random_scores(build_graph(model, CIFAR))
    with pytest.raises(ValueError, match="residual='inner'"):
        pccfast.prune(model, scores, rates="[0.]+[0.15]*2+[0.4]*27", residual="inner")
    pruned, plan = pccfast.prune(model, scores, rates="[0.]*3+[0.4]*27", residual="inner")
    assert "layer1" not in plan.widths and len(plan.layers) == 27
    assert pruned.layer1[0].conv2.out_channels == 8 and pruned.layer1[0].conv1.out_channels == 4
    assert graph.group("layer1").reason.startswith("a residual stream")
    _, scalar = pccfast.prune(model, scores, rates=0.4, residual="inner")  # 0 where it must be
    assert scalar.kept == plan.kept and scalar.setting["rates"] == [0.0] * 3 + [0.4] * 27


def test_plan_json_roundtrip_and_replay(vgg, tmp_path):
    model, graph, scores = vgg
    pruned, plan = pccfast.prune(model, scores, rates="[0.21]*7+[0.75]*5")
    data = json.loads(plan.to_json())
    assert data["format"] == "pccfast.plan" and data["method"] == "rates"
    first = data["layers"][0]
    assert {"name", "width_before", "width_after", "kept_indices"} <= set(first)
    assert first["width_after"] == len(first["kept_indices"])
    assert data["removed"]["params"] == pytest.approx(plan.removed["params"])
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.kept == plan.kept and again.after == plan.after
    replayed = pccfast.prune.apply_plan(model, again)
    for (n1, p1), (n2, p2) in zip(pruned.state_dict().items(), replayed.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    with pytest.raises(ValueError, match="not a pccfast plan"):
        Plan.from_json('{"layers": []}')
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        Plan.load(tmp_path / "bad.json")
    other = resnet56_cifar(width=0.25)
    with pytest.raises(ValueError, match="does not have"):
        pccfast.prune.apply_plan(other, Plan.from_dict({**data, "input_size": [1, 3, 32, 32]}))


@pytest.mark.parametrize("count", ["3000000", "99999999999999999999999", "9" * 5000])
def test_repeat_counts_are_bounded_before_anything_is_expanded(vgg, count):
    """'[0.5]*10**9' used to build the list (gigabytes) before the length check; a 23-digit
    count was an OverflowError. Now both are ValueErrors found from the counts alone."""
    import tracemalloc

    model, _, scores = vgg
    text = f"[0.5]*{count}+[0.1]"
    tracemalloc.start()
    try:
        with pytest.raises(ValueError,
                           match=r"rates has (\d+|about 10\^\d+) entries but VGGCifar expects 12"):
            pccfast.prune(model, scores, rates=text, verify=False)
        with pytest.raises(ValueError, match=r"more than the 100000 a rate list may have"):
            parse_rates(text)
        with pytest.raises(ValueError, match=r"more than the 12 a rate list may have"):
            parse_rates("[0.5]*13", max_entries=12)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # bytes: nothing of the repeat count's size was built
    assert parse_rates("[0.5]*12", max_entries=12) == [0.5] * 12
