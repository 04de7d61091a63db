"""The model zoo: the networks of the published PCC/CHIP/HRank tables.

    model = pccfast.models.vgg16_cifar()          # CHIP/HRank VGG-16 (BN, 512-unit head)
    model = pccfast.models.resnet56_cifar()       # option-A shortcuts
    model = pccfast.models.resnet50()             # torchvision names: its state dicts load
    model = pccfast.models.create("vgg16_cifar", width=0.25)

Every builder records how it was called, so :func:`pccfast.save` can rebuild the architecture.
"""

from __future__ import annotations

from .resnet import Bottleneck, ResNet, resnet50
from .resnet_cifar import BasicBlock, PadShortcut, ResNetCifar, resnet56_cifar, resnet_cifar
from .vgg import VGG16_CFG, VGGCifar, vgg16_cifar

BUILDERS = {
    "vgg16_cifar": vgg16_cifar,
    "resnet56_cifar": resnet56_cifar,
    "resnet_cifar": resnet_cifar,
    "resnet50": resnet50,
}


def create(name: str, **kwargs):
    """A zoo model by name (``vgg16_cifar``, ``resnet56_cifar``, ``resnet_cifar``, ``resnet50``)."""
    if name not in BUILDERS:
        raise ValueError(f"model must be one of {tuple(BUILDERS)}, got {name!r}")
    return BUILDERS[name](**kwargs)


__all__ = [
    "BUILDERS",
    "BasicBlock",
    "Bottleneck",
    "PadShortcut",
    "ResNet",
    "ResNetCifar",
    "VGG16_CFG",
    "VGGCifar",
    "create",
    "resnet50",
    "resnet56_cifar",
    "resnet_cifar",
    "vgg16_cifar",
]
