"""CIImportance: pccfast's scores driving Torch-Pruning's own MetaPruner."""

from __future__ import annotations

import pytest
import torch

tp = pytest.importorskip("torch_pruning")
torchvision = pytest.importorskip("torchvision")

from pccfast.prune import CIImportance  # noqa: E402

SIZE = (1, 3, 64, 64)


def _model():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    for m in model.modules():  # distinct per-channel values, to find the kept channels again
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def _loader(n=12, batch=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, *SIZE[1:], generator=g),
             torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n // batch)]


def _kept(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Indices of the channels of ``before`` still present in ``after`` (by their values)."""
    return sorted(int((before == v).nonzero()[0]) for v in after)


@pytest.mark.parametrize("criterion", ["ci", "l1"])
def test_metapruner_keeps_the_highest_scoring_channels(criterion):
    model = _model()
    imp = CIImportance(model, _loader(), criterion=criterion, max_images=12)
    conv_scores = imp.scores["layer1.0.conv1"]
    stream_scores = imp.scores["layer1"]  # stem + layer1's block outputs, one index set
    inner_bn = model.layer1[0].bn1.weight.detach().clone()
    stream_bn = model.bn1.weight.detach().clone()
    pruner = tp.pruner.MetaPruner(model, torch.randn(SIZE), importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[model.fc])
    pruner.step()
    for before, after, scores in ((inner_bn, model.layer1[0].bn1.weight, conv_scores),
                                  (stream_bn, model.bn1.weight, stream_scores)):
        kept = _kept(before, after.detach())
        assert len(kept) == 32
        assert kept == sorted(torch.argsort(-scores, stable=True)[:32].tolist())
    assert model.fc.out_features == 10
    assert model(torch.randn(2, *SIZE[1:])).shape == (2, 10)


def test_scores_are_pccfasts_and_the_model_is_unchanged():
    import pccfast

    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    imp = CIImportance(model, _loader(), max_images=12)
    direct = pccfast.scores(model, _loader(), criterion="ci", max_images=12)
    assert imp.scores.keys() == direct.keys()
    for name in direct:
        torch.testing.assert_close(imp.scores[name], direct[name], rtol=0, atol=0)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())


def test_a_pruned_model_must_be_scored_again():
    model = _model()
    imp = CIImportance(model, _loader(), max_images=12)
    pruner = tp.pruner.MetaPruner(model, torch.randn(SIZE), importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[model.fc])
    pruner.step()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(SIZE))
    group = graph.get_pruning_group(model.layer1[0].conv1, tp.prune_conv_out_channels, [0])
    with pytest.raises(ValueError, match="score it again"):
        imp(group)


def test_data_criteria_need_a_loader():
    with pytest.raises(ValueError, match="needs a loader"):
        CIImportance(_model(), None, input_size=SIZE)
    imp = CIImportance(_model(), None, criterion="random", input_size=SIZE, seed=3)
    assert set(imp.scores) and all(s.dtype == torch.float64 for s in imp.scores.values())


# ---------------------------------------------------------------- misuse

def _small():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()


def _small_loader():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(4, 3, 11, 13, generator=g) for _ in range(2)]


def test_another_model_is_refused():
    """Scores of A, a pruner on a copy of A: nothing would be pruned, silently."""
    import copy

    model = _small()
    imp = CIImportance(model, _small_loader(), max_images=8)
    other = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(other, torch.randn(1, 3, 11, 13), importance=imp,
                                  pruning_ratio=0.5, ignored_layers=[other[8]])
    with pytest.raises(ValueError, match="are not its modules: the pruner prunes another model"):
        pruner.step()
    assert other[0].out_channels == 8


def test_a_conv_replaced_after_scoring_is_refused():
    model = _small()
    imp = CIImportance(model, _small_loader(), max_images=8)
    model[3] = torch.nn.Conv2d(8, 8, 3, padding=1)
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 11, 13), importance=imp,
                                  pruning_ratio=0.5, ignored_layers=[model[8]])
    with pytest.raises(ValueError, match="CIImportance scored 3, but 3 was replaced since"):
        pruner.step()


def test_global_pruning_needs_normalize():
    model = _small()
    imp = CIImportance(model, _small_loader(), max_images=8)
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 11, 13), importance=imp,
                                  pruning_ratio=0.5, global_pruning=True,
                                  ignored_layers=[model[8]])
    with pytest.raises(ValueError, match="pass normalize=True"):
        pruner.step()
    imp = CIImportance(model, _small_loader(), max_images=8, normalize=True)
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 11, 13), importance=imp,
                                  pruning_ratio=0.5, global_pruning=True,
                                  ignored_layers=[model[8]])
    pruner.step()
    assert model[0].out_channels + model[3].out_channels == 8
