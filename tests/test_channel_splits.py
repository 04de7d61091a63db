"""Splits along the channels on pccfast's own graph (MixNet's mixed kernels, Res2Net's scales,
CSPNet's cross-stage halves): the writer's output is cut into groups of their own, the module
that splits is told its parts' new widths, equal parts are pruned with one index set, and a
split pccfast cannot resize keeps its channels with the reason."""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import pccfast
from pccfast.prune.graph import build_graph
from pccfast.prune.layer_rules import register_split


class Mixed(nn.Module):
    """A mixed-kernel conv in small: the input split by a list of sizes, one conv per part."""

    def __init__(self, splits=(5, 7)):
        super().__init__()
        self.splits = list(splits)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2, groups=c)
                                   for c, k in zip(splits, (3, 5)))

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], 1)


register_split(Mixed, lambda module, widths: setattr(module, "splits", list(widths)))


class MixedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn1 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.mixed, self.bn2 = Mixed(), nn.BatchNorm2d(12)
        self.head, self.fc = nn.Conv2d(12, 9, 1), nn.Linear(9, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.stem(x)))
        x = F.relu(self.bn2(self.mixed(x)))
        return self.fc(F.relu(self.head(x)).mean((2, 3)))


class ChunkNet(nn.Module):
    """Res2Net in small: equal parts by torch.chunk, one through a conv added to the other."""

    def __init__(self, literal=False):
        super().__init__()
        self.literal = literal
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.conv4 = nn.Conv2d(16, 6, 1), nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        a, b = torch.split(x, [8, 8], 1) if self.literal else torch.chunk(x, 2, 1)
        a = F.relu(self.bn2(self.conv2(a)))
        x = torch.cat([a, F.relu(a + b)], 1)
        x = F.relu(self.conv3(x))
        return self.fc(F.relu(self.conv4(x)).mean((2, 3)))


def _random_scores(graph, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {x.name: torch.rand(x.width, generator=g, dtype=torch.float64)
            for x in graph.prunable}


def test_a_split_by_sizes_cuts_the_writer_and_resizes_the_splitter(tmp_path):
    torch.manual_seed(0)
    model = MixedNet().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    size = (1, 3, 11, 11)
    graph = build_graph(model, size, engine="pccfast")
    parts = {g.name: g for g in graph.groups if g.name.startswith("stem")}
    assert sorted(g.width for g in parts.values()) == [5, 7]  # the stem's output, cut 5 + 7
    assert all(g.prunable for g in parts.values())
    assert graph.splits == [("mixed", [[n] for n in parts])]
    pruned, plan = pccfast.prune(model, _random_scores(graph), rates=0.5, input_size=size)
    widths = [plan.widths[n] for n in parts]
    assert widths == [2, 3] and pruned.mixed.splits == widths  # verify=True: outputs match
    counted = pccfast.count(pruned, size)
    assert (counted["flops"], counted["params"]) == (plan.after["flops"], plan.after["params"])
    pccfast.save(pruned, tmp_path / "p.pt")
    x = torch.randn(3, 3, 13, 9)
    with torch.no_grad():
        loaded = pccfast.load(tmp_path / "p.pt", allow_pickle=True)
        torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)


def test_a_part_is_scored_on_its_slice_of_the_writers_activation():
    torch.manual_seed(0)
    model = MixedNet()
    images = torch.randn(3, 3, 12, 10)
    col = pccfast.CICollector(model, progress=False)
    col.update(images)
    scores = col.scores()
    col.remove()
    out = {}
    hooks = [bn.register_forward_hook(lambda m, a, o, k=k: out.__setitem__(k, F.relu(o)))
             for k, bn in enumerate((model.bn1, model.bn2))]
    with torch.no_grad():
        model.eval()(images)
    for h in hooks:
        h.remove()
    # each part's channels: after the stem and after its own depthwise conv (as an inverted
    # residual's expanded channels), at its offset in each
    ci = [pccfast.channel_independence(out[k], backend="torch").mean(0) for k in (0, 1)]
    graph = build_graph(model, (1, 3, 12, 10), prune_classifier_input=True)
    first, second = [g.name for g in graph.groups if g.name.startswith("stem")]
    torch.testing.assert_close(scores[first], (ci[0][:5] + ci[1][:5]) / 2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(scores[second], (ci[0][5:] + ci[1][5:]) / 2, rtol=1e-9,
                               atol=1e-9)


def test_equal_parts_are_pruned_with_one_index_set(tmp_path):
    torch.manual_seed(0)
    model = ChunkNet().eval()
    size = (1, 3, 9, 9)
    graph = build_graph(model, size, engine="pccfast")
    group = graph.group("conv1")  # both halves, and conv2's output added to the second
    assert group.width == 8 and group.prunable
    assert {(p.module, p.offset) for p in group.producers if p.role == "conv_out"} == {
        ("conv1", 0), ("conv1", 8), ("conv2", 0)}
    pruned, plan = pccfast.prune(model, _random_scores(graph), rates=0.5, input_size=size)
    kept = plan.kept["conv1"]
    assert len(kept) == 4
    both = kept + [8 + k for k in kept]
    torch.testing.assert_close(pruned.conv1.weight, model.conv1.weight[both])
    counted = pccfast.count(pruned, size)
    assert (counted["flops"], counted["params"]) == (plan.after["flops"], plan.after["params"])
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 7, 11)).shape == (2, 3)


def test_a_split_pccfast_cannot_resize_keeps_its_channels_with_the_reason():
    model = ChunkNet(literal=True)
    graph = build_graph(model, (1, 3, 9, 9), engine="pccfast")
    group = graph.group("conv1")
    assert not group.prunable
    assert "whose split sizes pccfast cannot change" in group.reason
    assert "register_split" in group.reason
    assert graph.group("conv3").prunable  # the rest still prunes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned, plan = pccfast.prune(model, _random_scores(graph), rates=0.5,
                                     input_size=(1, 3, 9, 9))
    assert plan.widths["conv3"] == 3 and pruned.conv1.out_channels == 16


def test_l1_scores_each_part_on_its_own_filters():
    """A part of a cut conv output: l1 reads that part's rows of the conv's weight (issue 20:
    "l1: no conv ... has 26 output filters" on Res2Net); equal parts: the mean over them."""
    torch.manual_seed(0)
    model = MixedNet()
    col = pccfast.ScoreCollector(model, criterion="l1", input_size=(1, 3, 9, 9), progress=False)
    scores = col.scores()
    filters = model.stem.weight.detach().double().abs().flatten(1).sum(1)
    dw = [c.weight.detach().double().abs().flatten(1).sum(1) for c in model.mixed.convs]
    graph = build_graph(model, (1, 3, 9, 9), prune_classifier_input=True)
    first, second = [g.name for g in graph.groups if g.name.startswith("stem")]
    torch.testing.assert_close(scores[first], (filters[:5] + dw[0]) / 2)
    torch.testing.assert_close(scores[second], (filters[5:] + dw[1]) / 2)
    chunked = ChunkNet()
    scores = pccfast.ScoreCollector(chunked, criterion="l1", input_size=(1, 3, 9, 9),
                                    progress=False).scores()
    rows = chunked.conv1.weight.detach().double().abs().flatten(1).sum(1)
    conv2 = chunked.conv2.weight.detach().double().abs().flatten(1).sum(1)
    torch.testing.assert_close(scores["conv1"], (rows[:8] + rows[8:] + conv2) / 3)
