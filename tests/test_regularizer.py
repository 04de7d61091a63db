"""PCCRegularizer: which layers it hooks, what it computes, and that it leaves the model alone."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pccfast
from pccfast.sites import find_sites


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(12, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3),
    )


class FunctionalReLU(nn.Module):
    """ReLU as a function call and a module reused after a residual add (torchvision style)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.relu = nn.ReLU()

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        b = self.relu(self.bn2(self.conv2(a)))
        return self.relu(b + a)  # follows an add: not a scored site


def test_default_sites_are_relus_after_conv_or_bn():
    sites = find_sites(small_cnn())
    assert [s.name for s in sites] == ["2", "4", "8"]
    assert [s.conv for s in sites] == ["0", "3", "6"]
    assert [s.norm for s in sites] == ["1", "", "7"]


def test_sites_of_functional_and_reused_relus():
    sites = find_sites(FunctionalReLU())
    assert [(s.name, s.module, s.call_index, s.apply_relu) for s in sites] == [
        ("bn1", "bn1", 0, True),
        ("relu:0", "relu", 0, False),
    ]


def test_torchvision_resnet_sites():
    torchvision = pytest.importorskip("torchvision")
    sites = find_sites(torchvision.models.resnet18())
    names = [s.name for s in sites]
    assert names[0] == "relu" and names[1] == "layer1.0.relu:0"
    assert "layer1.0.relu:1" not in names  # the ReLU after the residual add
    assert len(sites) == 1 + 8  # the stem and the first ReLU of each basic block


def test_loss_is_signed_weighted_mean_of_layer_scores():
    torch.manual_seed(0)
    model = small_cnn()
    x = torch.randn(4, 3, 8, 8)
    with pccfast.PCCRegularizer(model, weight=0.1, backend="torch") as reg:
        model(x)
        loss = reg.loss()
        scores = reg.scores
    acts = {}
    hooks = [model[i].register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, o))
             for i in (2, 4, 8)]
    model(x)
    for h in hooks:
        h.remove()
    expect = torch.stack([pccfast.pcc(acts[i], backend="torch") for i in (2, 4, 8)]).mean()
    assert list(scores) == ["2", "4", "8"]
    assert loss.item() == pytest.approx(-0.1 * expect.item(), rel=1e-6)
    suppress = pccfast.PCCRegularizer(model, weight=0.1, mode="suppress", backend="torch")
    model(x)
    assert suppress.loss().item() == pytest.approx(0.1 * expect.item(), rel=1e-6)
    suppress.remove()


def test_mean_score_is_the_raw_score_whatever_the_weight():
    """What the training loop logs: mean_l S_l itself, not the loss divided back by the weight
    (which weight=0 would turn into NaN)."""
    torch.manual_seed(5)
    model = small_cnn()
    x = torch.randn(3, 3, 9, 7)
    for weight, mode in ((0.3, "promote"), (0.0, "promote"), (2.5, "suppress")):
        with pccfast.PCCRegularizer(model, weight=weight, mode=mode, backend="torch") as reg:
            model(x)
            expect = torch.stack(list(reg.scores.values())).mean()
            score = reg.mean_score
            assert not score.requires_grad and 0 < score.item() <= 1
            assert score.item() == pytest.approx(expect.item(), rel=1e-6)
            sign = -1.0 if mode == "promote" else 1.0
            assert reg.loss().item() == pytest.approx(sign * weight * expect.item(), rel=1e-6)
            model(x[:2])  # a new pass: a new mean
            assert reg.mean_score.item() == pytest.approx(
                torch.stack(list(reg.scores.values())).mean().item(), rel=1e-6)


def test_options_travel_as_one_value():
    from pccfast.ops.pcc_options import PCCOptions

    torch.manual_seed(6)
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    options = PCCOptions(orientation="pixel", penalty="square", eps=1e-4)
    one = pccfast.PCCRegularizer(model, options=options, backend="torch")
    model(x)
    by_value = one.mean_score
    one.remove()
    apart = pccfast.PCCRegularizer(model, orientation="pixel", penalty="square", eps=1e-4,
                                   backend="torch")
    model(x)
    assert apart.options == options and one.options is options
    assert torch.equal(apart.mean_score, by_value)
    apart.remove()
    assert PCCOptions(*options.op_args()) == options
    from pccfast.train.config import PCCConfig  # the training loop's regulariser gets this value

    assert PCCConfig(orientation="pixel", penalty="square").options == PCCOptions(
        "pixel", penalty="square")
    with pytest.raises(TypeError, match="not both"):
        pccfast.PCCRegularizer(model, options=options, group="batch_mean")
    with pytest.raises(TypeError, match="options must be a"):
        pccfast.PCCRegularizer(model, options={"orientation": "pixel"})
    loss = pccfast.PCCLoss(orientation="pixel", penalty="square", eps=1e-4, backend="torch")
    assert loss.options == options
    torch.testing.assert_close(loss(x), pccfast.pcc(x, "pixel", penalty="square", eps=1e-4,
                                                   backend="torch"))


def test_gradients_flow_and_promote_raises_correlation():
    torch.manual_seed(0)
    model = small_cnn()
    reg = pccfast.PCCRegularizer(model, weight=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(8, 3, 8, 8)
    model(x)
    first = sum(reg.scores.values()).item()
    for _ in range(15):
        opt.zero_grad()
        model(x)
        reg.loss().backward()
        opt.step()
    model(x)
    assert sum(reg.scores.values()).item() > first + 0.01
    reg.remove()


def test_remove_restores_the_model_and_no_scores_without_grad():
    model = small_cnn()
    before = {n: len(m._forward_hooks) for n, m in model.named_modules()}
    reg = pccfast.PCCRegularizer(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(RuntimeError, match="forward pass"):
        reg.loss()
    reg.remove()
    assert {n: len(m._forward_hooks) for n, m in model.named_modules()} == before
    assert len(model._forward_pre_hooks) == 0


def test_layer_selection_by_names_and_predicate():
    model = small_cnn()
    reg = pccfast.PCCRegularizer(model, layers=["4"])
    model(torch.randn(2, 3, 8, 8))
    assert list(reg.scores) == ["4"]
    reg.remove()
    reg = pccfast.PCCRegularizer(model, layers=lambda name, m: isinstance(m, nn.Conv2d))
    model(torch.randn(2, 3, 8, 8))
    assert list(reg.scores) == ["0", "3", "6"]  # conv outputs, scored as they are
    reg.remove()
    with pytest.raises(ValueError, match="layers"):
        pccfast.PCCRegularizer(model, layers=["no.such.layer"])
    with pytest.raises(TypeError, match="layers"):
        pccfast.PCCRegularizer(model, layers=3)


def test_reused_module_and_functional_relu_are_scored_per_call():
    torch.manual_seed(0)
    model = FunctionalReLU()
    reg = pccfast.PCCRegularizer(model, backend="torch")
    x = torch.randn(2, 3, 6, 6)
    model(x)
    a = F.relu(model.bn1(model.conv1(x)))
    b = model.relu(model.bn2(model.conv2(a)))
    # The auto backend against the regulariser's torch one: another fp32 code path.
    assert reg.scores["bn1"].item() == pytest.approx(pccfast.pcc(a).item(), rel=1e-5, abs=1e-6)
    assert reg.scores["relu:0"].item() == pytest.approx(pccfast.pcc(b).item(), rel=1e-5, abs=1e-6)
    model(x)  # a second pass replaces, not accumulates
    assert len(reg.scores) == 2
    reg.remove()


def test_nan_activation_is_reported_by_layer():
    model = small_cnn()
    reg = pccfast.PCCRegularizer(model)
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    model(x)
    with pytest.raises(ValueError, match="NaN"):
        reg.loss()
    reg.remove()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(weight=-1.0), ValueError, "weight"),
        (dict(weight=float("inf")), ValueError, "weight must be a finite"),
        (dict(weight=float("nan")), ValueError, "weight"),
        (dict(weight="big"), TypeError, "weight"),
        (dict(mode="boost"), ValueError, "mode"),
        (dict(orientation="row"), ValueError, "orientation"),
        (dict(backend="gpu"), ValueError, "backend"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        pccfast.PCCRegularizer(small_cnn(), **kwargs)


def test_model_without_scored_layers():
    with pytest.raises(ValueError, match=r"no activation \(ReLU, SiLU"):
        pccfast.PCCRegularizer(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    with pytest.raises(TypeError, match="model"):
        pccfast.PCCRegularizer("resnet")


def test_layers_with_single_feature_rows_are_left_out_with_one_warning():
    """At 2x2 input the last conv of small_cnn gives 1x1 maps: its channel-orientation PCC is 0
    by definition (each row is one value), so it is left out of the mean instead of diluting it."""
    import warnings

    torch.manual_seed(0)
    model = small_cnn()
    x = torch.randn(4, 3, 2, 2)
    reg = pccfast.PCCRegularizer(model, weight=0.1, backend="torch")
    with pytest.warns(UserWarning, match=r"8 has 1x1 maps.*PCC is 0 by definition"):
        model(x)
    assert set(reg.scores) == {"2", "4"}
    mean = torch.stack(list(reg.scores.values())).mean()
    assert reg.loss().item() == pytest.approx(-0.1 * mean.item(), rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer, not every step
        model(x)
    reg.remove()
    # group="batch" rows run over the N*P values of the batch: those layers are scored
    with pccfast.PCCRegularizer(model, group="batch", backend="torch") as batch:
        model(x)
        assert set(batch.scores) == {"2", "4", "8"} and batch.scores["8"] > 0
    with pccfast.PCCRegularizer(model, layers=["8"], backend="torch") as only:
        with pytest.warns(UserWarning, match="1x1 maps"):
            model(x)
        with pytest.raises(RuntimeError, match="every hooked layer has rows of a single feature"):
            only.loss()


def test_regularizer_on_a_compiled_model_finds_the_sites_of_the_original():
    """torch.compile(model) is traced through to the original module: the functional ReLU and
    the reused module are found (module registration order would miss them), no warning."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = FunctionalReLU()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg = pccfast.PCCRegularizer(compiled, backend="torch")
    assert reg.layer_names == ["_orig_mod.bn1", "_orig_mod.relu:0"]
    compiled(x)
    with pccfast.PCCRegularizer(model, backend="torch") as eager:
        model(x)
        torch.testing.assert_close(reg.loss(), eager.loss(), rtol=1e-6, atol=1e-7)
    assert reg.layer_names == ["_orig_mod." + n for n in eager.layer_names]
    reg.remove()
    torch._dynamo.reset()


def test_regularizer_created_after_the_model_ran_compiled_says_so():
    """Hooks added after a model has run under torch.compile are not seen: loss() says to
    create the regulariser before compiling, not just "needs a forward pass"."""
    torch._dynamo.reset()
    model = small_cnn()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 3, 8, 8)
    compiled(x)
    reg = pccfast.PCCRegularizer(compiled, backend="torch")
    compiled(x)
    with pytest.raises(RuntimeError, match="create the PCCRegularizer before compiling"):
        reg.loss()
    reg.remove()
    torch._dynamo.reset()
