"""Models outside the zoo, as a user meets them: the classifier is never pruned, what cannot
be pruned is refused with a reason, and the README flow (CICollector -> scores -> prune to a
FLOPs target -> save/load) works on the torchvision and timm families listed in the README."""

import warnings

import pytest
import torch
from torch import nn

import pccfast
from pccfast.prune.graph import build_graph


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
