"""The model zoo: shapes, published module names, torchvision weights, option-A shortcuts."""

import pytest
import torch
import torch.nn.functional as F

import pccfast
from pccfast.models import PadShortcut, create, resnet50, resnet56_cifar, vgg16_cifar


def test_vgg16_cifar_is_chips_network():
    model = vgg16_cifar()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256] + [512] * 6
    # CHIP/HRank's state-dict names: features.conv{i}/norm{i} at cfg index i, then the head.
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    expected = set()
    for i, v in enumerate(cfg):
        if v != "M":
            expected |= {f"features.conv{i}.weight", f"features.conv{i}.bias"}
            expected |= {f"features.norm{i}.{k}" for k in
                         ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    expected |= {f"classifier.linear{j}.{k}" for j in (1, 2) for k in ("weight", "bias")}
    expected |= {f"classifier.norm1.{k}" for k in
                 ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert set(model.state_dict()) == expected
    assert (model.classifier.linear1.in_features == 512
            and model.classifier.linear1.out_features == 512)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_width_multiplier_scales_every_conv_and_the_head():
    model = vgg16_cifar(num_classes=7, width=0.25)
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [16, 16, 32, 32, 64, 64, 64] + [128] * 6
    assert model.classifier.linear1.out_features == 128
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    small = resnet56_cifar(width=0.5)
    assert small.conv1.out_channels == 8 and small.fc.in_features == 32
    with pytest.raises(ValueError, match="width"):
        vgg16_cifar(width=0)
    with pytest.raises(TypeError, match="width"):
        vgg16_cifar(width="1")


def test_resnet56_structure_and_names():
    model = resnet56_cifar()
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 9
    names = set(model.state_dict())
    assert {"conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.running_var",
            "layer3.8.conv2.weight", "fc.weight", "fc.bias"} <= names
    assert not any("shortcut" in n for n in names)  # option A has no state: CHIP checkpoints load
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        pccfast.models.resnet_cifar(depth=51)


@pytest.mark.parametrize("stride,cin,cout", [(2, 16, 32), (2, 5, 12), (1, 3, 8), (2, 7, 7)])
def test_pad_shortcut_is_chips_option_a(stride, cin, cout):
    x = torch.randn(2, cin, 9, 7)
    pad = cout - cin
    expected = F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, pad // 2, pad - pad // 2))
    assert torch.equal(PadShortcut(cin, cout, stride)(x), expected)
    with pytest.raises(ValueError, match="out_channels"):
        PadShortcut(8, 4)


def test_resnet50_loads_torchvision_weights_and_matches_its_forward():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(num_classes=10).eval()
    ours = resnet50(num_classes=10)
    ours.load_state_dict(reference.state_dict())  # strict: every name and shape agrees
    ours.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in reference.named_modules()]


def test_create_by_name():
    model = create("resnet50", num_classes=5, width=0.25)
    assert model.fc.out_features == 5 and model.conv1.out_channels == 16
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    with pytest.raises(ValueError, match="vgg16_cifar"):
        create("vgg19")


# ---------------------------------------------------------------- other images than CIFAR's

@pytest.mark.parametrize("builder", [vgg16_cifar, resnet56_cifar, resnet50])
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 5, 7), (4, 1, 1), (3, 64, 48)])
def test_zoo_models_take_the_images_channels_and_any_size(builder, shape):
    torch.manual_seed(0)
    model = builder(num_classes=7, width=0.125, in_channels=shape[0]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == shape[0]
    with pytest.raises(ValueError, match="in_channels"):
        builder(in_channels=0)


def test_vgg_is_chips_network_exactly_at_32x32():
    """ceil_mode pools and the global last pool change nothing on CIFAR's images."""
    torch.manual_seed(0)
    model = vgg16_cifar(width=0.25).eval()
    chip = vgg16_cifar(width=0.25).eval()
    chip.load_state_dict(model.state_dict())
    for m in chip.features:
        if isinstance(m, torch.nn.MaxPool2d):
            m.ceil_mode = False
    with torch.no_grad():
        x = torch.randn(3, 3, 32, 32)
        chip.avgpool = torch.nn.AvgPool2d(2)  # CHIP's: 2x2 maps -> 1x1
        assert torch.equal(model(x), chip(x))
    assert pccfast.count(vgg16_cifar(), (1, 3, 32, 32))["flops"] == 313463808


def test_grey_28x28_models_prune_and_save(tmp_path):
    """The MNIST-shaped case end to end at the model level: CI, pruning (the pruned forward
    is checked against the masked original) and a saved file that rebuilds 1-channel."""
    torch.manual_seed(0)
    for model in (vgg16_cifar(width=0.125, in_channels=1),
                  resnet56_cifar(width=0.25, in_channels=1)):
        col = pccfast.CICollector(model, max_images=4, progress=False)
        col.update(torch.randn(4, 1, 28, 28))
        pruned, plan = pccfast.prune(model, col.scores(), target_flops=0.4,
                                     input_size=(1, 1, 28, 28))
        assert abs(plan.removed["flops"] - 0.4) <= 0.005
        pccfast.save(pruned, tmp_path / "m.pt")
        again = pccfast.load(tmp_path / "m.pt")
        x = torch.randn(2, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(again(x), pruned.eval()(x))


def test_state_dict_of_another_width_is_one_line_naming_the_shapes():
    from pccfast._modules import load_state_checked

    small, wide = vgg16_cifar(width=0.125), vgg16_cifar(width=0.25)
    with pytest.raises(ValueError) as exc:
        load_state_checked(small, wide.state_dict(), "checkpoint X.pt")
    text = str(exc.value)
    assert "\n" not in text and text.startswith("checkpoint X.pt does not fit this VGGCifar")
    assert "features.conv0.weight (16, 3, 3, 3) vs (8, 3, 3, 3)" in text
    fewer = dict(small.state_dict())
    del fewer["classifier.linear2.bias"]
    with pytest.raises(ValueError, match=r"1 missing: classifier.linear2.bias"):
        load_state_checked(small, fewer, "F")
    load_state_checked(small, vgg16_cifar(width=0.125).state_dict(), "F")  # fits: loads
