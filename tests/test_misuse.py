"""Misuse of the pruning API that once gave silent wrong answers or errors a user could not act
on: scores that cannot rank channels, CIImportance on a model it did not score, tied weights,
meta-device models, untraceable forwards, degenerate (1x1) maps, rates combined with a budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pccfast
from pccfast.prune import build_graph


class Chain(nn.Module):
    """Three conv+ReLU layers and a classifier: small enough for every test here."""

    def __init__(self, width: int = 8, tie: bool = False):
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.c3 = nn.Conv2d(width, width, 3, padding=1)
        if tie:
            self.c3.weight = self.c2.weight
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


SIZE = (1, 3, 9, 11)


def _scores(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {grp.name: torch.rand(grp.width, generator=g, dtype=torch.float64) + 0.1
            for grp in build_graph(model, SIZE).prunable}


# ---------------------------------------------------------------- scores that cannot rank

@pytest.mark.parametrize("how", ["tau", "target", "rates"])
def test_negative_scores_are_refused_naming_the_scores(how):
    model = Chain().eval()
    scores = {k: -v for k, v in _scores(model).items()}
    kwargs = {"tau": dict(tau=0.5), "target": dict(target_flops=0.4),
              "rates": dict(rates=0.5)}[how]
    with pytest.raises(ValueError, match=r"scores\['c1'\] holds 8 negative value\(s\)"):
        pccfast.prune(model, scores, input_size=SIZE, **kwargs)


def test_one_negative_score_is_refused():
    model = Chain().eval()
    scores = _scores(model)
    scores["c2"][5] = -1e-3
    with pytest.raises(ValueError, match=r"scores\['c2'\] holds 1 negative .*channel 5"):
        pccfast.prune(model, scores, input_size=SIZE, tau=0.5)


@pytest.mark.parametrize("how", [dict(tau=0.5), dict(target_flops=0.4)])
def test_all_zero_scores_are_refused(how):
    model = Chain().eval()
    scores = {k: torch.zeros_like(v) for k, v in _scores(model).items()}
    with pytest.raises(ValueError, match="scores are 0 for every channel"):
        pccfast.prune(model, scores, input_size=SIZE, **how)


def test_one_dead_layer_still_prunes():
    """A layer whose channels are all dead scores 0 everywhere: it keeps one channel."""
    model = Chain().eval()
    scores = _scores(model)
    scores["c2"] = torch.zeros(8, dtype=torch.float64)
    _, plan = pccfast.prune(model, scores, input_size=SIZE, tau=0.9)
    assert plan.widths["c2"] == 1 and plan.widths["c1"] > 1


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_scores_are_refused(value):
    model = Chain().eval()
    scores = _scores(model)
    scores["c1"][3] = value
    with pytest.raises(ValueError, match=r"scores\['c1'\] holds 1 NaN or Inf value\(s\) "
                                         r"\(channel 3"):
        pccfast.prune(model, scores, input_size=SIZE, tau=0.5)


# ---------------------------------------------------------------- rates with a budget

def test_one_rate_with_a_budget_scales_it():
    """rates=0.5 with target_flops (documented: a global scale of the rate list) works (the
    scale, and so the keep counts, do not depend on the scores or the machine)."""
    model = Chain(width=32).eval()
    pruned, plan = pccfast.prune(model, _scores(model), input_size=SIZE, rates=0.5,
                                 target_flops=0.3)
    assert plan.method == "target_flops" and plan.setting["rates"] == 0.5
    assert abs(plan.removed["flops"] - 0.3) <= 0.005 + 1e-12
    assert pccfast.prune.Plan.from_json(plan.to_json()).setting == plan.setting


# ---------------------------------------------------------------- models pruning cannot take

def test_tied_weights_are_refused_not_untied():
    model = Chain(tie=True).eval()
    with pytest.raises(ValueError, match=r"c2.weight and c3.weight are one tensor \(tied weights\)"
                                         r".*pruning would untie them"):
        pccfast.prune(model, _scores(model), input_size=SIZE, tau=0.6)
    untied = Chain().eval()  # the same model untied prunes
    pccfast.prune(untied, _scores(untied), input_size=SIZE, tau=0.6)


def test_meta_device_models_are_refused():
    with torch.device("meta"):
        model = Chain()
    scores = _scores(Chain())
    with pytest.raises(ValueError, match="meta device .* parameter c1.weight: load its weights"):
        pccfast.prune(model, scores, input_size=SIZE, tau=0.5)
    with pytest.raises(ValueError, match="meta device"):
        pccfast.CICollector(model)


class DataDependent(Chain):
    """A data-dependent ``if``: torch.fx cannot trace it."""

    def forward(self, x):
        x = torch.relu(self.c1(x))
        if x.sum() > 0:
            x = torch.relu(self.c2(x))
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))


def test_an_untraceable_forward_is_named_by_fx():
    """fx's reason (the data-dependent if) comes first, not Torch-Pruning's."""
    col = pccfast.CICollector(DataDependent().eval(), progress=False)
    with pytest.warns(UserWarning), pytest.raises(
            ValueError, match="has no scored layer: pccfast's engine cannot prune through "
                              "DataDependent .*cannot be used as inputs to control flow"):
        col.update(torch.randn(2, 3, 9, 11))


@pytest.mark.parametrize("criterion", ["ci", "hrank"])
def test_one_by_one_maps_warn(criterion):
    """Scores of 1x1 maps say little (as the regulariser warns for PCC): a warning per layer."""
    import warnings

    model = Chain().eval()
    col = pccfast.ScoreCollector(model, criterion, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        col.update(torch.randn(3, 3, 1, 1))
        col.update(torch.randn(3, 3, 1, 1))  # once per layer
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3 and all(f"its {criterion} score says little" in m
                                      for m in messages), messages
    assert [m.split(" has 1x1 maps")[0] for m in messages] == [
        f"ScoreCollector: {name}" for name in ("c1", "c2", "c3")]
    assert set(col.scores()) == {"c1", "c2", "c3"}
