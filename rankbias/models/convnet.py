"""The paper's noise-study ConvNet, plus the shape helpers every conv model shares.

Conv models take any input shape:
- (C, H, W): an image, built from Conv2d / BatchNorm2d / MaxPool2d;
- (C, L):    a 1-D signal with C channels, built from Conv1d / BatchNorm1d / MaxPool1d;
- (L,):      a 1-D signal with one channel, treated as (1, L).
A flat batch (B, L) is reshaped to (B, 1, L) in `forward`, so data loaders need not care.
"""

from __future__ import annotations

import torch
from torch import nn

from rankbias.utils import RankbiasError


def channels_first(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The (C, *spatial) shape a conv model sees: (L,) -> (1, L); 2-D and 3-D as given."""
    if len(input_shape) == 1:
        return (1, input_shape[0])
    if len(input_shape) in (2, 3):
        return tuple(input_shape)
    raise RankbiasError(
        f"conv models take input shapes (L,), (C, L) or (C, H, W); got {tuple(input_shape)}"
    )


def nd_layers(shape: tuple[int, ...]) -> tuple[type, type, type]:
    """(Conv, BatchNorm, MaxPool) classes for a (C, *spatial) shape: 1-D or 2-D."""
    if len(shape) == 2:
        return nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d
    return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d


def halving_kernel(spatial: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Kernel (= stride) that halves each spatial size, and the sizes after it.

    A size that is already 1 gets kernel 1 (no-op) so tiny inputs never collapse to 0;
    odd sizes round down, as in the usual stride-2 pooling.
    """
    kernel = tuple(2 if s >= 2 else 1 for s in spatial)
    return kernel, tuple(s // k for s, k in zip(spatial, kernel))


def as_channels_first(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """View a batch whose items have input_shape as (B, C, *spatial)."""
    return x.reshape(x.shape[0], *shape)


def scaled(channels: int, width: float) -> int:
    """A channel count times a width multiplier, at least 1."""
    return max(1, round(channels * width))


class ConvNet(nn.Module):
    """Two 2x2 stride-2 convs, `depth` 3x3 convs (padding 1), all `width` channels,
    each followed by [BatchNorm] -> ReLU; then global average pool and a Linear head.

    Conv biases are dropped when BatchNorm follows (it would cancel them).
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, width: int, depth: int,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        self.shape = channels_first(input_shape)
        Conv, BatchNorm, _ = nd_layers(self.shape)
        spatial = self.shape[1:]
        layers: list[nn.Module] = []
        in_ch = self.shape[0]
        for i in range(2 + depth):
            if i < 2:
                kernel, spatial = halving_kernel(spatial)
                conv = Conv(in_ch, width, kernel, stride=kernel, bias=not batch_norm)
            else:
                conv = Conv(in_ch, width, 3, padding=1, bias=not batch_norm)
            layers += [conv, BatchNorm(width) if batch_norm else nn.Identity(), nn.ReLU()]
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(as_channels_first(x, self.shape))
        return self.head(x.flatten(2).mean(dim=2))


def build_convnet(
    input_shape: tuple[int, ...], num_classes: int, *, width: int = 32, depth: int = 2,
    batch_norm: bool = True,
) -> ConvNet:
    """The noise-study ConvNet (the paper uses width 1000): 2 stride-2 2x2 convs, then
    `depth` 3x3 convs, `width` channels each, [BN] -> ReLU after every conv, global
    average pool, Linear(width, num_classes).
    """
    if width < 1 or depth < 0:
        raise RankbiasError(f"convnet needs width >= 1 and depth >= 0; got {width=}, {depth=}")
    return ConvNet(input_shape, num_classes, width, depth, batch_norm)
