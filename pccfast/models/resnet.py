"""ResNet-50 for ImageNet with torchvision's module names and initialisation, so torchvision
state dicts (``ResNet50_Weights``) load with ``load_state_dict``; no torchvision needed.
"""

from __future__ import annotations

from torch import nn

from ._common import channel_kwargs, checked_channels, init_resnet_weights, record_recipe, scaled


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as torchvision v1.5), 1x1 expand (x4), plus the shortcut.

    One ``relu`` module runs three times per forward (after bn1, after bn2, after the residual
    add), exactly as in torchvision.
    """

    expansion = 4

    def __init__(self, in_channels: int, mid_channels: int, stride: int = 1,
                 downsample: nn.Module | None = None, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or mid_channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, mid_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """x: (N, in_channels, H, W) -> logits (N, num_classes), any H, W (the pool is global).
    layers: bottleneck blocks per stage."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000, base_width: int = 64,
                 in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, base_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = base_width
        for stage, blocks in enumerate(layers):
            mid = base_width * 2**stage
            out = mid * Bottleneck.expansion
            stride = 1 if stage == 0 else 2
            downsample = None
            if stride != 1 or channels != out:
                downsample = nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False),
                                           nn.BatchNorm2d(out))
            stage_blocks = [Bottleneck(channels, mid, stride, downsample)]
            stage_blocks += [Bottleneck(out, mid) for _ in range(1, blocks)]
            channels = out
            self.add_module(f"layer{stage + 1}", nn.Sequential(*stage_blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)
        init_resnet_weights(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet50(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> ResNet:
    """ResNet-50 (25.56M params with BN, 4.09G MACs at 224x224, width 1).

    width: multiplies the base width 64 (small test models); 1.0 is torchvision's network.
    in_channels: of the images (1: grey).
    """
    model = ResNet((3, 4, 6, 3), num_classes, scaled(64, width), checked_channels(in_channels))
    return record_recipe(model, "resnet50", num_classes=num_classes, width=width,
                         **channel_kwargs(in_channels))
