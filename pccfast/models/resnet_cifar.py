"""ResNet-20/56/110 for CIFAR with option-A (zero-padding) shortcuts, as He et al., HRank and
CHIP use them: a 16-channel stem, three stages of basic blocks at 16, 32 and 64 channels.

Module names follow CHIP's code (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.bn1``,
``layer1.0.relu1``, ``layer1.0.conv2``, ``layer1.0.bn2``, ``layer1.0.relu2``, ``fc``), so their
ResNet-56 checkpoints load with ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..prune.graph_types import Port
from ..prune.layer_rules import register_layer
from ._common import channel_kwargs, checked_channels, init_resnet_weights, record_recipe, scaled


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride``, then put input channel ``source[i]`` at output
    channel ``target[i]`` and zeros everywhere else (no parameters).

    Unpruned, ``source = 0..in-1`` and ``target = source + (out - in) // 2`` (the input is padded
    with zero channels on both sides, as CHIP's ``F.pad``). Pruning keeps the same rule on the
    surviving channels, so the indices are buffers; they stay out of the state dict (rebuilt
    from the pruning plan) so that plain CHIP/HRank checkpoints load.
    x: (N, in, H, W) -> (N, out_channels, ceil(H/stride), ceil(W/stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"PadShortcut pads channels: out_channels ({out_channels}) must be >= "
                f"in_channels ({in_channels})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        source = torch.arange(in_channels)
        self.register_buffer("source", source, persistent=False)
        self.register_buffer("target", source + (out_channels - in_channels) // 2,
                             persistent=False)

    def forward(self, x):
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        out = x.new_zeros((x.shape[0], self.out_channels, x.shape[2], x.shape[3]))
        return out.index_copy(1, self.target, x.index_select(1, self.source))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, "
                f"mapped={self.source.numel()}")

    def keep(self, kept_in: torch.Tensor | None, kept_out: torch.Tensor | None) -> None:
        """Keeps the pairs (source -> target) whose both ends survive the pruning of its input
        (``kept_in``) and output (``kept_out``) channels (None: all kept), renumbered."""
        in_pos = torch.full((self.in_channels,), -1, dtype=torch.long)
        out_pos = torch.full((self.out_channels,), -1, dtype=torch.long)
        kept_in = torch.arange(self.in_channels) if kept_in is None else kept_in
        kept_out = torch.arange(self.out_channels) if kept_out is None else kept_out
        in_pos[kept_in] = torch.arange(kept_in.numel())
        out_pos[kept_out] = torch.arange(kept_out.numel())
        source, target = in_pos[self.source.cpu()], out_pos[self.target.cpu()]
        both = (source >= 0) & (target >= 0)
        device = self.source.device
        self.source = source[both].to(device)
        self.target = target[both].to(device)
        self.in_channels = kept_in.numel()
        self.out_channels = kept_out.numel()


def _shortcut_graph(builder, n) -> None:
    """In pccfast's pruning graph, the shortcut reads one group and writes another (channel
    ``c`` to ``c + pad``), so the two stages' streams stay separate groups."""
    if n.xl is None:
        raise n.error("its input has no channel group")
    g = builder.single(n.xl, n)
    out = builder.new_group(n.module.out_channels, "conv", n)
    builder.group(g).consumers.append(Port(n.node.target, "shortcut_in"))
    builder.group(out).producers.append(Port(n.node.target, "shortcut_out"))
    builder.write(n, out)


def _shortcut_slice(module: PadShortcut, kept: dict) -> None:
    module.keep(kept.get("shortcut_in"), kept.get("shortcut_out"))


register_layer(PadShortcut, graph=_shortcut_graph, slice=_shortcut_slice, leaf=True)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.
    x: (N, in, H, W) -> (N, out, H/s, W/s)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """x: (N, in_channels, H, W) -> logits (N, num_classes), any H, W (stride-2 convs round
    up, as the shortcuts do; the pool is global); depth = 6n + 2 (n blocks per stage)."""

    def __init__(self, depth: int = 56, num_classes: int = 10, widths=(16, 32, 64),
                 in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        channels = widths[0]
        for stage, width in enumerate(widths):
            layers = []
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(BasicBlock(channels, width, width, stride))
                channels = width
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_resnet_weights(self)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet_cifar(depth: int = 56, num_classes: int = 10, width: float = 1.0,
                 in_channels: int = 3) -> ResNetCifar:
    """CIFAR ResNet of the given depth; width multiplies the stage widths 16/32/64;
    in_channels: of the images (1: grey)."""
    widths = tuple(scaled(c, width) for c in (16, 32, 64))
    model = ResNetCifar(depth, num_classes, widths, checked_channels(in_channels))
    return record_recipe(model, "resnet_cifar", depth=depth, num_classes=num_classes, width=width,
                         **channel_kwargs(in_channels))


def resnet56_cifar(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> ResNetCifar:
    """ResNet-56 for CIFAR (0.85M params, 125.49M MACs at width 1)."""
    model = resnet_cifar(56, num_classes, width, in_channels)
    return record_recipe(model, "resnet56_cifar", num_classes=num_classes, width=width,
                         **channel_kwargs(in_channels))
