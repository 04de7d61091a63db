"""VGG-16 for CIFAR as CHIP and HRank define it: 13 conv-BN-ReLU layers, 4 max-pools, a 2x2
average pool and a 512-unit Linear-BN-ReLU-Linear head (the 'cfg' VGG of their code).

Other input sizes: the max-pools round up (``ceil_mode``: an odd size keeps its last row and
column) and the last pool averages whatever is left (global average), so the network runs on
any image, e.g. 28x28 (28 -> 14 -> 7 -> 4 -> 2 -> 1), with the head unchanged. Where the size
is a multiple of 16 (CIFAR's 32x32) this is exactly their network: same outputs, same weights.

Module names follow their code (``features.conv0``, ``features.norm0``, ``features.pool2``, ...,
``classifier.linear1``, ``classifier.norm1``, ``classifier.linear2``), so their checkpoints load
into :func:`vgg16_cifar` with ``load_state_dict``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ._common import channel_kwargs, checked_channels, record_recipe, scaled

# 'M' is a 2x2 max-pool; numbers are conv widths (3x3, padding 1). The head's hidden width is
# separate (HRank's cfg appends it as a last 512).
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
HEAD_WIDTH = 512


class VGGCifar(nn.Module):
    """x: (N, in_channels, H, W) -> logits (N, num_classes), any H, W (see the module docstring).

    cfg: conv widths and 'M' (max-pool) in order; head_width: the hidden Linear's width.
    """

    def __init__(self, cfg=VGG16_CFG, num_classes: int = 10, head_width: int = HEAD_WIDTH,
                 in_channels: int = 3):
        super().__init__()
        layers: list[tuple[str, nn.Module]] = []
        channels = in_channels
        for i, v in enumerate(cfg):
            if v == "M":
                layers.append((f"pool{i}", nn.MaxPool2d(kernel_size=2, stride=2,
                                                              ceil_mode=True)))
                continue
            layers.append((f"conv{i}", nn.Conv2d(channels, v, kernel_size=3, padding=1)))
            layers.append((f"norm{i}", nn.BatchNorm2d(v)))
            layers.append((f"relu{i}", nn.ReLU(inplace=True)))
            channels = v
        self.features = nn.Sequential(OrderedDict(layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = CHIP's AvgPool2d(2) on their 2x2 maps
        self.classifier = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(channels, head_width)),
            ("norm1", nn.BatchNorm1d(head_width)),
            ("relu1", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(head_width, num_classes)),
        ]))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = x.flatten(1)
        return self.classifier(x)


def vgg16_cifar(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> VGGCifar:
    """CHIP/HRank's VGG-16 for CIFAR (14.98M params, 313.5M MACs at width 1).

    width: multiplies every conv width and the head's hidden width (rounded, at least 1), for
    small test models; 1.0 is the published network. in_channels: of the images (1: grey).
    """
    cfg = tuple(v if v == "M" else scaled(v, width) for v in VGG16_CFG)
    model = VGGCifar(cfg, num_classes=num_classes, head_width=scaled(HEAD_WIDTH, width),
                     in_channels=checked_channels(in_channels))
    return record_recipe(model, "vgg16_cifar", num_classes=num_classes, width=width,
                         **channel_kwargs(in_channels))
