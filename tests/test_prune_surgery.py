"""Surgery: the pruned model is physically smaller and equals the original with the removed
channels zeroed, for every zoo model, torchvision's resnet50/vgg16_bn, and through
Torch-Pruning for models outside pccfast's own graph."""

import warnings

import pytest
import torch
from torch import nn

import pccfast
from pccfast.models import resnet50, resnet56_cifar, vgg16_cifar
from pccfast.prune.graph import UnsupportedLayerError, build_graph
from pccfast.prune.surgery import mask_hooks
from cases import randomize_bn

CIFAR = (1, 3, 32, 32)


def random_scores(graph, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {x.name: torch.rand(x.width, generator=g, dtype=torch.float64) for x in graph.groups
            if x.prunable}


def masked_reference(model, graph, plan, x):
    """The original forward with every removed channel zeroed where it is written."""
    kept = {layer.name: torch.tensor(layer.kept_indices) for layer in plan.layers
            if layer.width_after < layer.width_before}
    handles = mask_hooks(model, graph, kept)
    try:
        with torch.no_grad():
            return model.eval()(x)
    finally:
        for h in handles:
            h.remove()


def assert_matches_masked(model, size, seed=0, **kwargs):
    torch.manual_seed(seed)
    graph = build_graph(model, size, kwargs.get("residual", "stream"),
                        kwargs.get("prune_classifier_input", False))
    every = build_graph(model, size, prune_classifier_input=True)  # scores for every layer
    pruned, plan = pccfast.prune(model, random_scores(every, seed), input_size=size,
                                 verify=False, **kwargs)
    x = torch.randn((2,) + tuple(size[1:]))
    expected = masked_reference(model, graph, plan, x)
    with torch.no_grad():
        out = pruned.eval()(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    with torch.no_grad():  # and the channels did matter: the unmasked model differs
        assert not torch.allclose(model(x), expected)
    assert type(pruned) is type(model)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    return pruned, plan


@pytest.mark.parametrize("kwargs", [{"rates": "[0.21]*7+[0.75]*5"}, {"tau": 0.5},
                                    {"tau": 0.5, "prune_classifier_input": True}])
def test_vgg16_cifar(kwargs):
    model = randomize_bn(vgg16_cifar(width=0.25))
    pruned, plan = assert_matches_masked(model, CIFAR, **kwargs)
    # The slicing, spelled out: conv3 keeps (its kept outputs) x (conv1's kept outputs).
    k1, k3 = (torch.tensor(plan.kept[n]) for n in ("features.conv1", "features.conv3"))
    torch.testing.assert_close(pruned.features.conv3.weight,
                               model.features.conv3.weight[k3][:, k1])
    torch.testing.assert_close(pruned.features.norm3.running_mean,
                               model.features.norm3.running_mean[k3])
    if kwargs.get("prune_classifier_input"):
        k = torch.tensor(plan.kept["features.conv16"])
        torch.testing.assert_close(pruned.classifier.linear1.weight,
                                   model.classifier.linear1.weight[:, k])


@pytest.mark.parametrize("residual", ["stream", "inner"])
def test_resnet56_cifar(residual):
    model = randomize_bn(resnet56_cifar(width=0.5))
    rates = "[0.]+[0.3]*2+[0.5]*27" if residual == "stream" else "[0.]*3+[0.5]*27"
    pruned, plan = assert_matches_masked(model, CIFAR, rates=rates, residual=residual)
    if residual == "stream":
        # Stage streams keep one index set: the stem, every block's conv2 and bn2 agree.
        k1 = plan.kept["layer1"]
        assert pruned.conv1.out_channels == len(k1) == pruned.layer1[8].conv2.out_channels
        torch.testing.assert_close(pruned.layer1[4].bn2.weight, model.layer1[4].bn2.weight[k1])
        shortcut = pruned.layer2[0].shortcut  # option A between two pruned streams
        assert shortcut.in_channels == len(k1) and shortcut.out_channels == len(plan.kept["layer2"])
    else:
        assert pruned.layer1[0].conv2.out_channels == 8


@pytest.mark.parametrize("residual", ["stream", "inner"])
def test_resnet50(residual):
    model = randomize_bn(resnet50(num_classes=10, width=0.25))
    assert_matches_masked(model, (1, 3, 64, 64), tau=0.6, residual=residual)


def test_torchvision_resnet50_and_vgg16_bn():
    torchvision = pytest.importorskip("torchvision")
    model = randomize_bn(torchvision.models.resnet50(num_classes=10))
    _, plan = assert_matches_masked(model, (1, 3, 64, 64), rates="[0.]+[0.1]*3+[0.35]*16")
    assert plan.widths["layer1"] == 230 and plan.widths["layer2.0.conv1"] == 83
    vgg = randomize_bn(torchvision.models.vgg16_bn(num_classes=10))
    _, plan = assert_matches_masked(vgg, CIFAR, rates="[0.21]*7+[0.75]*5",
                                    prune_classifier_input=False)
    assert plan.widths["features.37"] == 128 and "features.40" not in plan.widths


def test_prune_leaves_the_original_alone_and_verifies():
    model = vgg16_cifar(width=0.125)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = build_graph(model, CIFAR)
    pruned, plan = pccfast.prune(model, random_scores(graph), tau=0.5)  # verify=True
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not model._forward_hooks and not pruned._forward_hooks
    assert pruned.features.conv0.weight.requires_grad
    out = pruned(torch.randn(4, 3, 32, 32))  # trains: gradients flow
    out.sum().backward()
    assert pruned.features.conv0.weight.grad is not None


class CatNet(nn.Module):
    """A concatenation behind shape-dependent control flow: torch.fx cannot trace it,
    Torch-Pruning (which follows autograd) can."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(10, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = self.stem(x)
        if x.shape[-1] > 4:
            x = torch.cat([self.a(x), self.b(x)], 1)
        return self.fc(self.c(x).mean((2, 3)))


class FlipNet(nn.Module):
    """Reverses the channel order: Torch-Pruning takes it for elementwise, pccfast refuses."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = (nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                            nn.ReLU())
        self.conv2, self.bn2, self.relu2 = (nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                            nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x))).flip(1)
        return self.fc(self.relu2(self.bn2(self.conv2(x))).mean((2, 3)))


def test_unsupported_layer_is_named_and_torch_pruning_takes_over():
    pytest.importorskip("torch_pruning")
    model = randomize_bn(CatNet())
    size = (1, 3, 16, 16)
    with pytest.raises(UnsupportedLayerError, match=r"cannot prune through CatNet \(torch.fx"):
        build_graph(model, size, engine="pccfast")
    with pytest.warns(UserWarning, match="Torch-Pruning"):
        graph = build_graph(model, size)
    assert graph.engine == "torch_pruning"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, plan = pccfast.prune(model, random_scores(graph), tau=0.6, input_size=size)
    assert plan.engine == "torch_pruning"
    assert pruned.c[0].in_channels == plan.widths["a.0"] + plan.widths["b.0"]
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(pruned.eval()(x), masked_reference(model, graph, plan, x))


def test_unsupported_layer_without_torch_pruning(monkeypatch):
    import dataclasses

    from pccfast.prune import engines

    monkeypatch.setattr(engines, "TORCH_PRUNING", dataclasses.replace(
        engines.TORCH_PRUNING, missing=lambda: "Torch-Pruning is not installed"))
    with pytest.raises(UnsupportedLayerError, match="flip.*not installed"):
        build_graph(FlipNet(), (1, 3, 8, 8))


def test_depthwise_conv_with_a_multiplier_is_named():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, groups=8), nn.ReLU())
    with pytest.raises(UnsupportedLayerError, match=r"cannot prune through 3 \(Conv2d\): a "
                                                    "depthwise conv with a channel multiplier"):
        build_graph(model, (1, 3, 16, 16), engine="pccfast")


def test_verify_catches_an_engine_that_mishandles_a_layer():
    pytest.importorskip("torch_pruning")
    model = FlipNet()
    graph = build_graph(model, (1, 3, 8, 8), engine="torch_pruning")
    with pytest.raises(RuntimeError, match="does not match"):
        pccfast.prune(model, random_scores(graph), rates=0.5, input_size=(1, 3, 8, 8),
                      engine="torch_pruning")


def test_torch_pruning_engine_agrees_with_pccfast_engine():
    """The same kept channels through both engines give the same network."""
    pytest.importorskip("torch_pruning")
    torchvision = pytest.importorskip("torchvision")
    model = randomize_bn(torchvision.models.resnet18(num_classes=10))
    size = (1, 3, 64, 64)
    ours = build_graph(model, size)
    pruned, plan = pccfast.prune(model, random_scores(ours), tau=0.6, input_size=size, verify=False)
    theirs = build_graph(model, size, engine="torch_pruning")
    by_convs = {frozenset(g.convs): g.name for g in theirs.groups}
    tp_plan = pccfast.prune.Plan.from_dict(plan.to_dict())
    tp_plan.engine = "torch_pruning"
    for layer in tp_plan.layers:
        layer.name = by_convs[frozenset(ours.group(layer.name).convs)]
    other = pccfast.prune.apply_plan(model, tp_plan, theirs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), pruned.eval()(x))


def test_per_layer_modes_survive_every_entry_point():
    """A model training with a frozen (eval-mode) BN keeps exactly that after pccfast's calls."""
    model = vgg16_cifar(width=0.125).train()
    model.features.norm0.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    graph = build_graph(model, CIFAR)
    pccfast.count(model, CIFAR)
    pccfast.prune(model, random_scores(graph), tau=0.5)
    with pccfast.CICollector(model) as col:
        col.update(torch.randn(2, 3, 32, 32))
    assert {n: m.training for n, m in model.named_modules()} == modes


class FunctionalNet(nn.Module):
    """Functional ReLUs, a scalar scale, a strided slice, a reshape into the classifier."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x))) * 0.5
        x = torch.nn.functional.relu(self.bn2(self.conv2(x)))[:, :, ::2, ::2]
        return self.fc(x.reshape(x.size(0), -1))


def test_functional_layers_and_reshape_flatten():
    model = randomize_bn(FunctionalNet())
    graph = build_graph(model, (1, 3, 8, 8), prune_classifier_input=True)
    assert [g.name for g in graph.prunable] == ["conv1", "conv2"]
    assert graph.group("conv1").sites[0].apply_relu  # hooked at bn1, ReLU applied in the hook
    assert_matches_masked(model, (1, 3, 8, 8), tau=0.6, prune_classifier_input=True)


class DepthwiseFlatNet(nn.Module):
    """A concatenation, a depthwise conv and a Linear reading flattened maps (4 features per
    channel), behind control flow torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(32, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(56, 56, 3, padding=1, groups=56), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(56, 48, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(48 * 4 * 4, 10)

    def forward(self, x):
        x = self.stem(x)
        if x.shape[-1] > 4:
            x = torch.cat([self.a(x), x], 1)
        return self.fc(self.c(self.dw(x)).flatten(1))


def test_torch_pruning_budgets_are_searched_on_a_closed_form(monkeypatch):
    """The Torch-Pruning engine counts candidate plans without pruning copies (two probes at
    build time check the form), and the closed form equals the counts of real pruned copies."""
    pytest.importorskip("torch_pruning")
    from pccfast.prune import tp_engine

    size = (1, 3, 8, 8)
    model = DepthwiseFlatNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no fx trace: sites in registration order
        graph = build_graph(model, size, engine="torch_pruning", prune_classifier_input=True)
    assert graph.layers is not None
    assert {g.name for g in graph.prunable} == {"stem.0", "a.0", "c.0"}
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        widths = {x.name: int(torch.randint(1, x.width + 1, (1,), generator=g))
                  for x in graph.prunable}
        assert graph.cost(widths) == graph._pruned_cost(widths)
    pruned_copies = []
    real = tp_engine.apply_tp_plan
    monkeypatch.setattr(tp_engine, "apply_tp_plan",
                        lambda *a: pruned_copies.append(1) or real(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, plan = pccfast.prune(model, random_scores(graph), target_flops=0.6,
                                     input_size=size, engine="torch_pruning", verify=False,
                                     prune_classifier_input=True)
    assert len(pruned_copies) <= 2  # the build-time probe only (the final model is apart)
    counted = pccfast.count(pruned, size)
    assert (plan.after["flops"], plan.after["params"]) == (counted["flops"], counted["params"])
    assert abs(plan.removed["flops"] - 0.6) <= 0.005
