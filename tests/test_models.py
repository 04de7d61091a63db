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
    assert model.classifier.linear1.in_features == 512 and model.classifier.linear1.out_features == 512
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
