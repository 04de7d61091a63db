"""Models outside the zoo, as a user meets them: the classifier is never pruned, what cannot
be pruned is refused with a reason, and the README flow (CICollector -> scores -> prune to a
FLOPs target -> save/load) works on the torchvision and timm families listed in the README."""

import warnings

import pytest
import torch
from torch import nn

import pccfast
from pccfast.prune.graph import build_graph
from cases import randomize_bn


def random_scores(graph, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {x.name: torch.rand(x.width, generator=g, dtype=torch.float64) for x in graph.prunable}


class ConvClassifierNet(nn.Module):
    """SqueezeNet's head in small: the class scores come out of a Conv2d, through ReLU and a
    global pool; a channel flip forces the Torch-Pruning engine."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.classifier = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return torch.relu(self.classifier(x)).mean((2, 3))


@pytest.mark.parametrize("engine", ["pccfast", "torch_pruning"])
def test_a_conv_classifier_is_never_pruned(engine):
    if engine == "torch_pruning":
        pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = ConvClassifierNet()
    size = (1, 3, 8, 8)
    graph = build_graph(model, size, engine=engine)
    assert graph.group("classifier").prunable is False
    assert "output" in graph.group("classifier").reason
    pruned, plan = pccfast.prune(model, random_scores(graph), rates=0.3, input_size=size,
                                 engine=engine, verify=False)
    assert pruned.classifier.out_channels == 10
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert plan.widths["conv1"] < 16  # the rest is pruned


def test_a_model_torch_pruning_fails_on_is_refused_with_the_part_named():
    """ShuffleNet's channel shuffle (view, transpose, view) reorders channels: pccfast's
    pruner stops there, and Torch-Pruning raises a bare ZeroDivisionError on it."""
    pytest.importorskip("torch_pruning")
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.shufflenet_v2_x0_5(weights=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"cannot prune through stage2\.0.*Torch-Pruning"
                                             r".*fails on ShuffleNetV2.*ZeroDivisionError"
                                             r".*cannot be pruned"):
            build_graph(model, (1, 3, 32, 32))
        with pytest.raises(ValueError, match=r"Torch-Pruning fails on ShuffleNetV2.*"
                                             r"ZeroDivisionError.*stops at stage2\.0"):
            build_graph(model, (1, 3, 32, 32), engine="torch_pruning")


class FlipNet(nn.Module):
    """A channel flip: pccfast's graph stops there, so the Torch-Pruning fallback runs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).flip(1))


def test_the_torch_pruning_fallback_is_bounded_in_time(monkeypatch):
    """Torch-Pruning's grouping runs for hours on some graphs (swin_v2_s, coatnet_0_rw_224):
    past tp_engine.TIME_LIMIT_S the model is refused, saying where pccfast stopped and why."""
    pytest.importorskip("torch_pruning")
    import time

    from pccfast.prune import tp_engine

    monkeypatch.setattr(tp_engine, "TIME_LIMIT_S", 1e-3)
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"cannot prune through flip.*Torch-Pruning.*"
                                             r"no result within 0\.001 s.*TIME_LIMIT_S"):
            build_graph(FlipNet(), (1, 3, 8, 8))
        with pytest.raises(ValueError, match=r"within 0\.001 s"):
            build_graph(FlipNet(), (1, 3, 8, 8), engine="torch_pruning")
    assert time.monotonic() - start < 60  # refused, not hung
    monkeypatch.setattr(tp_engine, "TIME_LIMIT_S", 120.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert build_graph(FlipNet(), (1, 3, 8, 8)).engine == "torch_pruning"  # in time: runs


def test_weight_standardised_convs_are_refused_by_both_engines():
    """timm's ScaledStdConv2d (NFNet) has a per-channel gain and standardises each filter over
    its inputs: sliced as a plain conv it would be wrong (issue 20: a raw RuntimeError), so it
    is refused, naming the layer type and why."""
    pytest.importorskip("timm")
    pytest.importorskip("torch_pruning")
    from timm.layers import ScaledStdConv2dSame, StdConv2d

    for conv, why in ((ScaledStdConv2dSame(8, 8, 3), "gain.*standardised"),
                      (StdConv2d(8, 8, 3), "standardised over their input channels")):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), conv, nn.ReLU(), nn.Conv2d(8, 4, 1))
        for engine in ("auto", "pccfast", "torch_pruning"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with pytest.raises(ValueError, match=rf"cannot prune through 2 "
                                                     rf"\({type(conv).__name__}\): .*{why}.*"
                                                     r"register a rule"):
                    build_graph(model, (1, 3, 16, 16), engine=engine)


@pytest.mark.parametrize("name, refused", [("ghostnet_100", "conv_stem")])
def test_timm_models_prune_through_torch_pruning(name, refused, tmp_path):
    """ghostnet_100's ghost modules (a concat cut back by a slice) go to Torch-Pruning;
    groups it refuses to halve are kept with that
    reason (issue 20: the build-time cost probe raised a bare "refuses to prune conv_stem" out
    of CICollector.update), the rest meet the target."""
    timm = pytest.importorskip("timm")
    pytest.importorskip("torch_pruning")
    from pccfast.prune.plan import BUDGET_TOLERANCE

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    size, images = (1, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        col = pccfast.CICollector(model, progress=False)
        col.update(images)
        graph = build_graph(model, size)
        assert graph.engine == "torch_pruning"
        if refused:
            assert "Torch-Pruning refuses to prune it to" in graph.group(refused).reason
        pruned, plan = pccfast.prune(model, col.scores(), target_flops=0.5, input_size=size)
    col.remove()
    assert abs(plan.removed["flops"] - 0.5) <= BUDGET_TOLERANCE
    counted = pccfast.count(pruned, size)
    assert (counted["flops"], counted["params"]) == (plan.after["flops"], plan.after["params"])
    pccfast.save(pruned, tmp_path / "pruned.pt")
    loaded = pccfast.load(tmp_path / "pruned.pt", allow_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), pruned.eval()(images), rtol=0, atol=0)


def test_nfnet_is_refused_clearly():
    timm = pytest.importorskip("timm")
    pytest.importorskip("torch_pruning")
    model = timm.create_model("nfnet_l0", pretrained=False, num_classes=10)
    col = pccfast.CICollector(model, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"cannot prune through stem\.conv1 "
                                             r"\(ScaledStdConv2d\).*gain"):
            col.update(torch.randn(1, 3, 32, 32))
    col.remove()


# ----------------------------------------------------------------------------- block kinds
def direct_ci(model, module, images, fn=lambda t: t):
    """Mean CI per channel of ``fn(output of module)``, from a hook of the test's own."""
    out = {}
    handle = module.register_forward_hook(lambda m, a, o: out.__setitem__("a", fn(o.detach())))
    with torch.no_grad():
        model.eval()(images)
    handle.remove()
    return pccfast.channel_independence(out["a"], backend="torch").mean(0)


def collect(model, images):
    col = pccfast.CICollector(model, progress=False, backend="torch")
    col.update(images)
    scores = col.scores()
    col.remove()
    return col, scores


class ConvAct(nn.Module):
    def __init__(self, act, functional=False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24)
        self.conv2, self.bn2 = nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.act, self.functional = act, functional
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = self.act(x) if not self.functional else self.act(x)
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


ACTIVATIONS = {
    "ReLU6": (nn.ReLU6(), None), "LeakyReLU": (nn.LeakyReLU(0.2), None), "SiLU": (nn.SiLU(), None),
    "GELU": (nn.GELU(), None), "Hardswish": (nn.Hardswish(), None), "Mish": (nn.Mish(), None),
    "F.silu": (torch.nn.functional.silu, torch.nn.functional.silu),
    "F.gelu-tanh": (lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
                    lambda t: torch.nn.functional.gelu(t, approximate="tanh")),
    "F.leaky_relu": (lambda t: torch.nn.functional.leaky_relu(t, 0.3),
                     lambda t: torch.nn.functional.leaky_relu(t, 0.3)),
}


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
def test_the_activation_after_a_conv_is_scored_whatever_it_is(kind):
    act, fn = ACTIVATIONS[kind]
    torch.manual_seed(0)
    model = randomize_bn(ConvAct(act, functional=fn is not None))
    images = torch.randn(4, 3, 8, 8)
    col, scores = collect(model, images)
    site = col.sites[0]
    if fn is None:  # the activation module's own output
        assert (site.module, site.apply_relu) == ("act", False)
        expected = direct_ci(model, model.act, images)
    else:  # a function call: hooked at bn1, applied in the hook
        assert (site.module, site.apply_relu) == ("bn1", True)
        expected = direct_ci(model, model.bn1, images, fn)
    torch.testing.assert_close(scores["conv1"], expected, rtol=1e-6, atol=1e-9)
    pruned, plan = pccfast.prune(model, scores, rates=0.5, input_size=(1, 3, 8, 8),
                                 prune_classifier_input=False)  # verify=True
    assert pruned.conv1.out_channels == 12
    # The regulariser hooks the same tensor.
    assert [s.name for s in pccfast.sites.find_sites(model)][0] == site.name


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's bundled norm + activation, in small: a BatchNorm2d subclass holding ``act``."""

    def __init__(self, n, act=True):
        super().__init__(n)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(super().forward(x))


def test_bundled_norm_activation_is_scored_at_its_output():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), BatchNormAct2d(16), nn.Conv2d(16, 12, 3, padding=1),
        BatchNormAct2d(12, act=False), nn.Conv2d(12, 8, 3, padding=1), BatchNormAct2d(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)))
    images = torch.randn(4, 3, 8, 8)
    col, scores = collect(model, images)
    assert col.groups == {"0": ["1"], "4": ["5"]}  # "2" has no activation: not scored
    torch.testing.assert_close(scores["0"], direct_ci(model, model[1], images))
    graph = build_graph(model, (1, 3, 8, 8))
    assert graph.group("2").reason.startswith("no scored activation")
    pruned, _ = pccfast.prune(model, scores, rates=0.5, input_size=(1, 3, 8, 8))
    assert pruned[1].num_features == pruned[0].out_channels == 8


class SqueezeExcite(nn.Module):
    def __init__(self, channels, reduced):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce, self.expand = nn.Conv2d(channels, reduced, 1), nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    """An inverted residual block: 1x1 expansion, depthwise 3x3, squeeze-excitation, 1x1
    projection, residual add (MobileNetV2/V3, EfficientNet)."""

    def __init__(self, channels=8, expand=4):
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False),
                                    nn.BatchNorm2d(hidden), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden,
                                          bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.se = SqueezeExcite(hidden, 4)
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False),
                                     nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.project(self.se(self.dw(self.expand(x))))


class MBNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.block1, self.block2 = MBConv(), MBConv()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.block2(self.block1(self.stem(x))).mean((2, 3)))


def test_inverted_residual_scores_the_expanded_channels_and_keeps_squeeze_excitation():
    torch.manual_seed(0)
    model = randomize_bn(MBNet())
    graph = build_graph(model, (1, 3, 8, 8))
    hidden = graph.group("block1.expand.0")
    assert hidden.prunable and hidden.width == 32
    # Expansion, depthwise conv and the gate's last conv write the hidden channels.
    assert hidden.convs == ["block1.expand.0", "block1.dw.0", "block1.se.expand"]
    assert [s.module for s in hidden.sites] == ["block1.expand.2", "block1.dw.2"]
    reduced = graph.group("block1.se.reduce")
    assert not reduced.prunable and "globally pooled" in reduced.reason
    assert not graph.group("stem.0").prunable  # the residual stream: no activation to score
    images = torch.randn(4, 3, 8, 8)
    col, scores = collect(model, images)
    expected = (direct_ci(model, model.block1.expand[2], images)
                + direct_ci(model, model.block1.dw[2], images)) / 2
    torch.testing.assert_close(scores["block1.expand.0"], expected, rtol=1e-6, atol=1e-9)
    pruned, plan = pccfast.prune(model, scores, target_flops=0.4, input_size=(1, 3, 8, 8))
    k = plan.widths["block1.expand.0"]
    assert k < 32
    assert (pruned.block1.dw[0].groups, pruned.block1.dw[0].in_channels) == (k, k)
    assert pruned.block1.se.expand.out_channels == pruned.block1.se.reduce.in_channels == k
    assert pruned.block1.se.reduce.out_channels == 4
    assert plan.after["flops"] == pccfast.count(pruned, (1, 3, 8, 8))["flops"]


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, LayerNorm over channels (channels-last), pointwise MLP with
    GELU, layer scale, residual add."""

    def __init__(self, dim=8):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1, self.act, self.pwconv2 = (nn.Linear(dim, 4 * dim), nn.GELU(),
                                                nn.Linear(4 * dim, dim))
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.blocks = nn.Sequential(ConvNeXtBlock(), ConvNeXtBlock())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_convnext_scores_the_mlp_hidden_channels_after_gelu():
    torch.manual_seed(0)
    model = ConvNeXtNet()
    graph = build_graph(model, (1, 3, 8, 8))
    assert [g.name for g in graph.prunable] == ["blocks.0.pwconv1", "blocks.1.pwconv1"]
    site = graph.group("blocks.0.pwconv1").sites[0]
    assert (site.module, site.channels_last) == ("blocks.0.act", True)
    stream = build_graph(model, (1, 3, 8, 8), prune_classifier_input=True).group("blocks")
    assert "normalised over its channels by blocks.0.norm (LayerNorm)" in stream.reason
    images = torch.randn(4, 3, 8, 8)
    col, scores = collect(model, images)
    expected = direct_ci(model, model.blocks[0].act, images, lambda t: t.permute(0, 3, 1, 2))
    torch.testing.assert_close(scores["blocks.0.pwconv1"], expected, rtol=1e-6, atol=1e-9)
    pruned, plan = pccfast.prune(model, scores, rates="[0.]+[0.5]*2", input_size=(1, 3, 8, 8))
    assert pruned.blocks[0].pwconv1.out_features == pruned.blocks[0].pwconv2.in_features == 16
    assert plan.after["flops"] == pccfast.count(pruned, (1, 3, 8, 8))["flops"]
    # one rate for the whole model: the stem's entry (a kept stream) is 0, the rest 0.5
    same, same_plan = pccfast.prune(model, scores, rates=0.5, input_size=(1, 3, 8, 8))
    assert same_plan.kept == plan.kept and same_plan.setting == {"rates": [0.0, 0.5, 0.5]}
    with pytest.raises(ValueError, match=r"rates\[0\] \(stem \(in blocks\)\) must be 0: .* "
                       r"the residual stream blocks, which is kept whole"):
        pccfast.prune(model, scores, rates="[0.5]*3", input_size=(1, 3, 8, 8))


def test_taylor_scores_a_channels_last_activation_and_refuses_smooth_functional_ones():
    torch.manual_seed(0)
    model = ConvNeXtNet().double().eval()  # float64 both ways: other batch shapes agree
    images, labels = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    col = pccfast.ScoreCollector(model, "taylor", progress=False)
    col.update(images, labels)
    got = col.scores()["blocks.0.pwconv1"]
    col.remove()
    acts = {}
    handle = model.blocks[0].act.register_forward_hook(lambda m, a, o: acts.__setitem__("a", o))
    expected = 0
    for n in range(3):  # |sum_hw a * dL/da| per image, the (N, H, W, C) activation as it is
        loss = torch.nn.functional.cross_entropy(model(images[n:n + 1]), labels[n:n + 1])
        (grad,) = torch.autograd.grad(loss, acts["a"])
        expected = expected + (acts["a"].detach() * grad).sum((1, 2)).abs()[0].double() / 3
    handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * float(expected.max()))
    smooth = ConvAct(torch.nn.functional.silu, functional=True)
    with pytest.raises(ValueError, match="'taylor' cannot score bn1: the model applies silu"):
        pccfast.ScoreCollector(smooth, "taylor", input_size=(1, 3, 8, 8))
    relu = ConvAct(torch.relu, functional=True)  # z * dL/dz = a * dL/da for ReLU
    pccfast.ScoreCollector(relu, "taylor", input_size=(1, 3, 8, 8)).remove()


class GroupedNet(nn.Module):
    """A ResNeXt bottleneck in small: 1x1, grouped 3x3 (4 groups of 4), 1x1."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.relu(self.bn3(self.conv3(x))).mean((2, 3)))


@pytest.mark.parametrize("rates", [0.3, 0.6])
def test_grouped_conv_keeps_the_same_count_in_every_group(rates):
    torch.manual_seed(0)
    model = randomize_bn(GroupedNet())
    graph = build_graph(model, (1, 3, 8, 8))
    assert graph.group("conv1").chunks == graph.group("conv2").chunks == 4
    scores = random_scores(graph, seed=3)
    pruned, plan = pccfast.prune(model, scores, rates=rates, input_size=(1, 3, 8, 8))
    per_group = {0.3: 3, 0.6: 2}[rates]  # int(16 * (1 - rate)) = 11 / 6, up to a multiple of 4
    for name in ("conv1", "conv2"):
        kept = torch.tensor(plan.kept[name])
        assert len(kept) == 4 * per_group
        for g in range(4):  # the highest-scoring channels of each group
            mine = sorted(i for i in kept.tolist() if 4 * g <= i < 4 * g + 4)
            best = sorted(
                (4 * g + torch.argsort(-scores[name][4 * g:4 * g + 4])[:per_group]).tolist())
            assert mine == best
    assert (pruned.conv2.groups == 4
            and pruned.conv2.weight.shape == (4 * per_group, per_group, 3, 3))
    assert plan.after["flops"] == pccfast.count(pruned, (1, 3, 8, 8))["flops"]


class CatNet(nn.Module):
    """Two branches concatenated, read by a BN and a conv (Inception, DenseNet)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.norm = nn.BatchNorm2d(18)
        self.c = nn.Sequential(nn.Conv2d(18, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12 * 4, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.norm(torch.cat([self.a(x), x, self.b(x)], 1))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.c(x), 2), 1))


def test_concatenated_branches_keep_their_offsets():
    torch.manual_seed(0)
    model = randomize_bn(CatNet())
    graph = build_graph(model, (1, 3, 8, 8), engine="pccfast")
    assert [g.name for g in graph.prunable] == ["stem.0", "a.0", "b.0"]
    pruned, plan = pccfast.prune(model, random_scores(graph), rates=0.5, input_size=(1, 3, 8, 8))
    k = plan.kept
    index = torch.tensor(k["a.0"] + [6 + i for i in k["stem.0"]] + [14 + i for i in k["b.0"]])
    torch.testing.assert_close(pruned.c[0].weight, model.c[0].weight[:, index])
    torch.testing.assert_close(pruned.norm.running_mean, model.norm.running_mean[index])
    assert plan.after["flops"] == pccfast.count(pruned, (1, 3, 8, 8))["flops"]


class AuxNet(nn.Module):
    """An auxiliary head that runs only in training (GoogLeNet, Inception v3)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * 64, 3))
        self.conv2, self.bn2 = nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        out = self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))
        return (out, self.aux(x)) if self.training else out


def test_training_only_branches_are_pruned_but_not_scored():
    torch.manual_seed(0)
    model = randomize_bn(AuxNet())
    col, scores = collect(model, torch.randn(2, 3, 8, 8))  # eval passes: the head never runs
    assert "aux.0" not in col.groups
    pruned, plan = pccfast.prune(model, scores, rates=0.5, input_size=(1, 3, 8, 8))
    assert pruned.aux[0].in_channels == plan.widths["conv1"] == 8
    out, aux = pruned.train()(torch.randn(2, 3, 8, 8))  # the head reads the pruned channels
    (out.sum() + aux.sum()).backward()


def test_a_model_with_nothing_to_prune_is_refused_with_the_reasons():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.GELU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(ValueError, match=r"Sequential has no prunable layer: .*1 x normalised "
                                         r"over its channels by 1 \(GroupNorm\).*1 x the model's "
                                         r"output"):
        pccfast.prune(model, {}, target_flops=0.5, input_size=(1, 3, 8, 8))


# ----------------------------------------------------------------------------- the README flow
# (model, input size, slow): the smallest input at which the model runs and 50% of its MACs
# lie in prunable layers (alexnet's and mobilenet_v3_small's classifiers dominate below that).
TORCHVISION = [
    ("resnet18", 32, False), ("resnet50", 32, False), ("resnext50_32x4d", 32, False),
    ("wide_resnet50_2", 32, True), ("mobilenet_v2", 32, False), ("mobilenet_v3_small", 64, False),
    ("efficientnet_b0", 32, False), ("densenet121", 32, False), ("regnet_y_400mf", 32, False),
    ("squeezenet1_0", 32, False), ("googlenet", 32, False), ("convnext_tiny", 32, False),
    ("vgg11_bn", 32, True), ("alexnet", 128, True), ("mnasnet0_5", 32, False),
]  # slow: the largest (68M-133M parameters to copy and save)
TIMM = [("resnet18", 32, False), ("efficientnet_b0", 32, False),
        ("mobilenetv3_small_100", 32, False), ("convnext_atto", 32, False),
        ("regnetx_002", 32, False), ("mixnet_s", 32, False), ("res2net50_26w_4s", 32, False),
        ("cspdarknet53", 32, False), ("cspresnet50", 32, False),  # these four split channels
        ("resnest14d", 32, False)]


def _params(table, prefix):
    return [pytest.param(name, size, id=prefix + name, marks=[pytest.mark.slow] if slow else [])
            for name, size, slow in table]


def readme_flow(model, size, tmp_path, target=0.5):
    """CICollector -> scores -> pccfast.prune(target_flops=target) -> save/load -> same
    outputs."""
    from pccfast.prune.plan import BUDGET_TOLERANCE

    torch.manual_seed(0)
    images = torch.randn(2, 3, size, size)
    col = pccfast.CICollector(model, progress=False)
    col.update(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to Torch-Pruning
        pruned, plan = pccfast.prune(model, col.scores(), target_flops=target,
                                     input_size=(1, 3, size, size))  # verify=True
    assert plan.engine == "pccfast"
    assert abs(plan.removed["flops"] - target) <= BUDGET_TOLERANCE
    counted = pccfast.count(pruned, (1, 3, size, size))  # the closed form the search used
    assert (counted["flops"], counted["params"]) == (plan.after["flops"], plan.after["params"])
    path = tmp_path / "pruned.pt"
    pccfast.save(pruned, path)
    loaded = pccfast.load(path, allow_pickle=True)
    with torch.no_grad():
        expected = pruned.eval()(images)
        torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)
        assert expected.shape == model.eval()(images).shape  # the classifier is whole
    out = pruned.train()(images)  # trains, training-only branches included
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    return pruned, plan


@pytest.mark.parametrize("name, size", _params(TORCHVISION, "torchvision."))
def test_readme_flow_on_torchvision_models(name, size, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    readme_flow(getattr(torchvision.models, name)(weights=None), size, tmp_path)


@pytest.mark.parametrize("name, size", _params(TIMM, "timm."))
def test_readme_flow_on_timm_models(name, size, tmp_path):
    timm = pytest.importorskip("timm")
    readme_flow(timm.create_model(name, pretrained=False), size, tmp_path)


# ----------------------------------------------------------------------------- PCC regulariser
REGULARISED = [("torchvision", "mobilenet_v2"), ("torchvision", "mobilenet_v3_small"),
               ("torchvision", "efficientnet_b0"), ("torchvision", "regnet_y_400mf"),
               ("torchvision", "densenet121"), ("torchvision", "googlenet"),
               ("torchvision", "convnext_tiny"), ("timm", "efficientnet_b0"),
               ("timm", "convnext_atto")]


@pytest.mark.parametrize("library, name", REGULARISED, ids=[f"{a}.{b}" for a, b in REGULARISED])
def test_pcc_regulariser_trains_every_family(library, name):
    """The regulariser hooks the activations CI scores (same rule), and a few steps on its
    loss alone raise the correlation it promotes."""
    lib = pytest.importorskip(library)
    torch.manual_seed(0)
    model = (lib.models.__dict__[name](weights=None, num_classes=10) if library == "torchvision"
             else lib.create_model(name, pretrained=False, num_classes=10))
    size = (1, 3, 64, 64)
    reg = pccfast.PCCRegularizer(model, weight=1.0)
    scored = {s.conv for s in build_graph(model, size).sites if s.conv}
    assert scored and scored <= {s.conv for s in reg.sites}
    losses = regulariser_steps(model, reg, torch.randn(4, 3, 64, 64))
    assert all(torch.isfinite(torch.tensor(losses)))
    # promote: the mean PCC went up (after some step: |t| is not smooth and BatchNorm sees a
    # batch of 4, so one step of a fixed size may overshoot on one BLAS and not another)
    assert min(losses[1:]) < losses[0]
    reg.remove()


def regulariser_steps(model, reg, x, steps: int = 3) -> list[float]:
    """``steps`` SGD steps on the regulariser's loss alone -> the losses; every site must fire."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(x)
        loss = reg.loss()
        assert len(reg.scores) == len(reg.sites)  # every site fired, training branches too
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- transformers
def small_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                              hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision starts it at zero
    return model


def small_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2],
                           window_size=[4, 4], num_classes=10)


def small_swin_v2():
    """Swin V2: post-norm blocks, cosine attention with a continuous position bias (cpb_mlp, a
    small MLP on a table of coordinates: a fixed cost, not a channel group)."""
    from torchvision.models.swin_transformer import (PatchMergingV2, SwinTransformer,
                                                     SwinTransformerBlockV2)

    return SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2],
                           window_size=[4, 4], num_classes=10, block=SwinTransformerBlockV2,
                           downsample_layer=PatchMergingV2)


TRANSFORMERS = {  # model, its MLP hidden groups, the GELU of the first, its map as (N, C, H, W)
    "vit": (small_vit, ["encoder.layers.encoder_layer_0.mlp.0",
                        "encoder.layers.encoder_layer_1.mlp.0"],
            lambda m: m.encoder.layers[0].mlp[1], lambda t: t.permute(0, 2, 1).unsqueeze(-1)),
    "swin": (small_swin, ["features.1.0.mlp.0", "features.1.1.mlp.0", "features.3.0.mlp.0",
                          "features.3.1.mlp.0"],
             lambda m: m.features[1][0].mlp[1], lambda t: t.permute(0, 3, 1, 2)),
    "swin_v2": (small_swin_v2, ["features.1.0.mlp.0", "features.1.1.mlp.0",
                                "features.3.0.mlp.0", "features.3.1.mlp.0"],
                lambda m: m.features[1][0].mlp[1], lambda t: t.permute(0, 3, 1, 2)),
}


@pytest.mark.parametrize("kind", list(TRANSFORMERS))
def test_transformers_prune_the_mlp_hidden_units_scored_on_tokens(kind, tmp_path):
    """Only the MLP hidden units are prunable, scored by CI on the (tokens x hidden) map of
    each image; the pruned model equals the original with the removed units zeroed, and its
    counted FLOPs (attention's projections and products too) are the plan's."""
    pytest.importorskip("torchvision")
    from pccfast.prune.surgery import mask_hooks

    make, hidden, gelu, as_map = TRANSFORMERS[kind]
    torch.manual_seed(0)
    model = make().eval()
    size = (1, 3, 32, 32)
    graph = build_graph(model, size, engine="pccfast")
    assert [g.name for g in graph.prunable] == hidden
    site = graph.group(hidden[0]).sites[0]
    assert site.channels_last and site.conv == hidden[0]
    assert "attention layers: only the MLP hidden units are pruned" in graph.limits
    images = torch.randn(3, 3, 32, 32)
    col, scores = collect(model, images)
    assert sorted(scores) == sorted(hidden)
    expected = direct_ci(model, gelu(model), images, as_map)
    torch.testing.assert_close(scores[hidden[0]], expected, rtol=1e-6, atol=1e-9)
    # every counted MAC is in the graph's closed form, attention included
    counted = pccfast.count(model, size)
    assert graph.cost({}) == {k: counted[k] for k in ("params", "flops", "flops_bn")}
    pruned, plan = pccfast.prune(model, scores, target_flops=0.25, input_size=size)
    assert abs(plan.removed["flops"] - 0.25) <= 0.005
    after = pccfast.count(pruned, size)
    assert (after["flops"], after["params"]) == (plan.after["flops"], plan.after["params"])
    masked = {layer.name: torch.tensor(layer.kept_indices) for layer in plan.layers
              if layer.width_after < layer.width_before}
    assert set(masked) == set(hidden)
    handles = mask_hooks(model, graph, masked)
    with torch.no_grad():
        reference = model(images)
    for h in handles:
        h.remove()
    path = tmp_path / "pruned.pt"
    pccfast.save(pruned, path)
    loaded = pccfast.load(path, allow_pickle=True)
    with torch.no_grad():
        out = loaded.eval()(images)
        assert not torch.allclose(model(images), reference)  # the removed units mattered
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


@pytest.mark.parametrize("kind", list(TRANSFORMERS))
def test_transformers_refuse_an_unreachable_target_saying_what_is_kept(kind):
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = TRANSFORMERS[kind][0]()
    scores = random_scores(build_graph(model, (1, 3, 32, 32)))
    with pytest.raises(ValueError, match=r"target_flops=0\.9 cannot be met.*allow removing "
                                         r"0\.0000 to 0\.\d+ of its flops.*attention layers: "
                                         r"only the MLP hidden units are pruned.*residual "
                                         r"stream it reads are kept whole"):
        pccfast.prune(model, scores, target_flops=0.9, input_size=(1, 3, 32, 32))


@pytest.mark.parametrize("name, kwargs, size, target", [
    ("vit_b_16", {"image_size": 32}, 32, 0.5), ("swin_t", {}, 64, 0.25)])
def test_torchvision_transformers_prune_to_a_reachable_target(name, kwargs, size, target,
                                                              tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    readme_flow(model, size, tmp_path, target=target)
    with pytest.raises(ValueError, match=r"cannot be met.*only the MLP hidden units"):
        pccfast.prune(model, random_scores(build_graph(model, (1, 3, size, size))),
                      target_flops=0.95, input_size=(1, 3, size, size))


@pytest.mark.parametrize("name, kwargs", [
    ("vit_tiny_patch16_224", {"depth": 2}), ("deit_tiny_patch16_224", {"depth": 2}),
    ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)})])
def test_timm_transformers_prune_their_mlps_at_224(name, kwargs, tmp_path):
    """timm's ViT, DeiT and Swin (fewer blocks, to stay cheap): the MLP hidden units (timm's
    Mlp: fc1, act, fc2) are scored and pruned on pccfast's own graph; attention is kept and
    counted (fused qkv, QK^T and AV)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    size = (1, 3, 224, 224)
    graph = build_graph(model, size, engine="pccfast")
    assert graph.prunable and all(g.name.endswith("mlp.fc1") for g in graph.prunable)
    assert "attention layers: only the MLP hidden units are pruned" in graph.limits
    counted = pccfast.count(model, size)
    assert graph.cost({}) == {k: counted[k] for k in ("params", "flops", "flops_bn")}
    readme_flow(model, 224, tmp_path, target=0.25)
    with pytest.raises(ValueError, match=r"cannot be met.*only the MLP hidden units"):
        pccfast.prune(model, random_scores(graph), target_flops=0.95, input_size=size)


@pytest.mark.parametrize("kind", list(TRANSFORMERS))
def test_pcc_regulariser_trains_the_transformer_mlps(kind):
    """The regulariser hooks the MLP activations CI scores, on their tokens x hidden maps."""
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = TRANSFORMERS[kind][0]()
    reg = pccfast.PCCRegularizer(model, weight=1.0)
    scored = {s.name for s in build_graph(model, (1, 3, 32, 32)).sites}
    assert {s.name for s in reg.sites} == scored and all(s.channels_last for s in reg.sites)
    losses = regulariser_steps(model, reg, torch.randn(4, 3, 32, 32))
    assert losses[-1] < losses[0]
    reg.remove()


def test_coatnet_prunes_on_pccfasts_graph_with_its_map_attention_kept(tmp_path):
    """coatnet_0_rw_224 (issue 20: Torch-Pruning's grouping ran past 300 s on the qkv conv of
    its Attention2d): on pccfast's own graph the attention is kept whole and counted, the
    MBConv and MLP hidden channels prune (64 px: its relative position tables follow img_size)."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("coatnet_0_rw_224", pretrained=False, num_classes=10, img_size=64)
    graph = build_graph(model, (1, 3, 64, 64), engine="pccfast")
    assert "attention stages.2.blocks.0.attn (Attention2d)" in graph.group("stages.2.blocks").reason
    readme_flow(model, 64, tmp_path)


def test_map_attention_flops_match_torchs_flop_counter():
    """CoAtNet's Attention2d: 1x1 conv projections plus QK^T and AV over the pixels, as
    torch.utils.flop_counter counts them (FLOPs = 2 MACs)."""
    pytest.importorskip("timm")
    from timm.models.maxxvit import Attention2d
    from torch.utils.flop_counter import FlopCounterMode

    model = Attention2d(24, 24, dim_head=8).eval()
    model.fused_attn = False  # explicit matmuls, which the counter sees (not CPU's fused kernel)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(2, 24, 5, 7))
    assert pccfast.count(model, (2, 24, 5, 7))["flops"] * 2 == counter.get_total_flops()


def test_resnest_split_attention_is_one_group_scored_on_every_radix_part():
    """resnest14d's SplitAttn (issue 20: ~66 s in Torch-Pruning's grouping): one group per
    layer, cut alike in the conv's, bn0's and fc2's radix parts, scored on act0 (both parts),
    its FLOPs counted although the layer is traced as one call."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnest14d", pretrained=False, num_classes=10)
    size = (1, 3, 32, 32)
    graph = build_graph(model, size, engine="pccfast")
    group = graph.group("layer1.0.conv2.conv")
    assert group.prunable and group.width == 64
    assert {(p.module, p.offset) for p in group.producers} == {
        (f"layer1.0.conv2.{m}", o) for m in ("conv", "bn0", "fc2") for o in (0, 64)}
    assert [s.name for s in group.sites] == ["layer1.0.conv2.act0"]
    assert group.site_offsets == {"layer1.0.conv2.act0": (0, 64)}
    assert graph.cost({}) == {k: v for k, v in pccfast.count(model, size).items()
                              if k != "params_all"}
    widths = {g.name: g.width // 2 for g in graph.prunable}
    pruned, plan = pccfast.prune(model, random_scores(graph), rates=0.5, input_size=size)
    assert graph.cost(widths)["flops"] == pccfast.count(pruned, size)["flops"]
