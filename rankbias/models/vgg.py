"""VGG-11 and VGG-16 (CIFAR style: a single Linear head), for images or 1-D signals."""

from __future__ import annotations

import torch
from torch import nn

from rankbias.models.convnet import (
    as_channels_first,
    channels_first,
    halving_kernel,
    nd_layers,
    scaled,
)
from rankbias.utils import RankbiasError

# Channel counts of the 3x3 convs; "M" is a 2x2 max-pool.
CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
}


class VGG(nn.Module):
    """3x3 convs (padding 1) -> [BN] -> ReLU, 2x2 max-pools between groups (skipped along
    any dimension already of size 1), global average pool, one Linear head (`head`)."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, config: list[int | str],
        width: float, batch_norm: bool,
    ) -> None:
        super().__init__()
        self.shape = channels_first(input_shape)
        Conv, BatchNorm, MaxPool = nd_layers(self.shape)
        spatial = self.shape[1:]
        in_ch = self.shape[0]
        layers: list[nn.Module] = []
        for v in config:
            if v == "M":
                kernel, spatial = halving_kernel(spatial)
                if any(k > 1 for k in kernel):
                    layers.append(MaxPool(kernel, stride=kernel))
                continue
            out_ch = scaled(v, width)
            layers.append(Conv(in_ch, out_ch, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(BatchNorm(out_ch))
            layers.append(nn.ReLU())
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(as_channels_first(x, self.shape))
        return self.head(x.flatten(2).mean(dim=2))


def _build(name: str, input_shape, num_classes, width: float, batch_norm: bool) -> VGG:
    if width <= 0:
        raise RankbiasError(f"{name} needs width > 0; got {width=}")
    return VGG(input_shape, num_classes, CONFIGS[name], width, batch_norm)


def build_vgg11(
    input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0,
    batch_norm: bool = True,
) -> VGG:
    """VGG-11: 8 convs with 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M channels
    (times `width`), each conv3x3 -> [BN] -> ReLU; global average pool; Linear head.
    Convs have a bias only without BN."""
    return _build("vgg11", input_shape, num_classes, width, batch_norm)


def build_vgg16(
    input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0,
    batch_norm: bool = True,
) -> VGG:
    """VGG-16 (the paper's, with BN and width 1.0): 13 convs with 64, 64, M, 128, 128, M,
    256 x3, M, 512 x3, M, 512 x3, M channels (times `width`), each conv3x3 -> [BN] ->
    ReLU; global average pool; one Linear head. Convs have a bias only without BN."""
    return _build("vgg16", input_shape, num_classes, width, batch_norm)
