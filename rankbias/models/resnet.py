"""CIFAR ResNet-18 (3x3 stem, no max-pool), for images or 1-D signals, any width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankbias.models.convnet import as_channels_first, channels_first, nd_layers, scaled
from rankbias.utils import RankbiasError


class BasicBlock(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU.

    The shortcut is a 1x1 conv (stride) -> BN when the shape changes, else the identity;
    its module name contains "shortcut" so rank measurements can exclude it.
    """

    def __init__(self, Conv: type, BatchNorm: type, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = Conv(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm(out_ch)
        self.conv2 = Conv(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = BatchNorm(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                Conv(in_ch, out_ch, 1, stride=stride, bias=False), BatchNorm(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """stem conv3x3 -> BN -> ReLU, four stages of BasicBlocks (the first block of stages
    2-4 has stride 2), global average pool, Linear head (`fc`)."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, blocks: list[int],
        channels: list[int],
    ) -> None:
        super().__init__()
        self.shape = channels_first(input_shape)
        Conv, BatchNorm, _ = nd_layers(self.shape)
        self.conv1 = Conv(self.shape[0], channels[0], 3, padding=1, bias=False)
        self.bn1 = BatchNorm(channels[0])
        in_ch = channels[0]
        stages = []
        for i, (n, out_ch) in enumerate(zip(blocks, channels)):
            stride = 1 if i == 0 else 2  # 3x3/pad 1/stride 2 maps size s to ceil(s/2): 1 -> 1
            layers = []
            for j in range(n):
                layers.append(BasicBlock(Conv, BatchNorm, in_ch, out_ch, stride if j == 0 else 1))
                in_ch = out_ch
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(as_channels_first(x, self.shape))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.flatten(2).mean(dim=2))


def build_resnet18(
    input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0
) -> ResNet:
    """CIFAR ResNet-18: conv3x3(64w) -> BN -> ReLU; stages of 2 BasicBlocks with
    64w, 128w, 256w, 512w channels (stride 2 at stages 2-4, each with a 1x1 conv + BN
    shortcut); global average pool; Linear(512w, num_classes). w = `width` (the paper:
    1.0). Convs have no bias. 17 3x3 convs + 3 shortcut 1x1 convs + fc. Input sizes down
    to 1x1 work: a stride-2 3x3 conv with padding 1 maps size s to ceil(s/2).
    """
    if width <= 0:
        raise RankbiasError(f"resnet18 needs width > 0; got {width=}")
    channels = [scaled(c, width) for c in (64, 128, 256, 512)]
    return ResNet(input_shape, num_classes, [2, 2, 2, 2], channels)
