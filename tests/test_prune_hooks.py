"""The pruned model is a clean copy: none of the hooks pccfast put on the original (CICollector,
PCCRegularizer) travel with it, so it pickles (``pccfast.save``); the original keeps them."""

import torch
from torch import nn

import pccfast
from pccfast._hooks import is_marked


def _user_hook(module, args, output):  # a picklable hook of the user's own: it must stay
    return output


def _plain_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
        nn.Conv2d(48, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


def _hooks(model):
    return [fn for m in model.modules()
            for d in (m._forward_hooks, m._forward_pre_hooks) for fn in d.values()]


def test_readme_flow_saves_a_model_outside_the_zoo(tmp_path):
    model = _plain_cnn()
    model[1].register_forward_hook(_user_hook)
    images = torch.randn(6, 3, 12, 12)
    col = pccfast.CICollector(model, progress=False)
    col.update(images)
    reg = pccfast.PCCRegularizer(model)
    pruned, plan = pccfast.prune(model, col.scores(), target_flops=0.5, input_size=(1, 3, 12, 12))
    assert plan.layers and any(layer.width_after < layer.width_before for layer in plan.layers)
    assert not [fn for fn in _hooks(pruned) if is_marked(fn)]
    assert _user_hook in _hooks(pruned)  # the user's hook is copied as it was

    path = tmp_path / "pruned.pt"
    pccfast.save(pruned, path)
    loaded = pccfast.load(path, allow_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), pruned.eval()(images), rtol=0, atol=0)

    # The original keeps its hooks, in their order, and they still work.
    assert [fn for fn in _hooks(model) if is_marked(fn)]
    col.update(images)
    assert col.images == 12
    with torch.enable_grad():
        model.train()(images)
    assert reg.loss().requires_grad
    reg.remove()
    col.remove()
    assert _hooks(model) == [_user_hook]
