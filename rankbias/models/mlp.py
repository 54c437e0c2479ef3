"""Fully connected networks: the paper's MLP-BN-10-100 and MLP-5-500, and any depth/width."""

from __future__ import annotations

import math

import torch
from torch import nn

from rankbias.utils import RankbiasError

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


class Block(nn.Module):
    """Linear(width) -> [BatchNorm1d] -> activation, optionally with a skip connection."""

    def __init__(
        self, in_features: int, width: int, batch_norm: bool, activation: str, bias: bool,
        residual: bool,
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, width, bias=bias)
        self.bn = nn.BatchNorm1d(width) if batch_norm else nn.Identity()
        self.act = ACTIVATIONS[activation]()
        self.residual = residual and in_features == width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.fc(x)))
        return x + y if self.residual else y


class MLP(nn.Module):
    """Flatten -> depth x Block(width) -> Linear(width, num_classes)."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, depth: int, width: int,
        batch_norm: bool, activation: str, bias: bool, residual: bool,
    ) -> None:
        super().__init__()
        in_features = math.prod(input_shape)
        blocks = []
        for _ in range(depth):
            blocks.append(Block(in_features, width, batch_norm, activation, bias, residual))
            in_features = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(in_features, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x.flatten(1)))


def build_mlp(
    input_shape: tuple[int, ...], num_classes: int, *, depth: int = 6, width: int = 100,
    batch_norm: bool = True, activation: str = "relu", bias: bool = True,
    residual: bool = False,
) -> MLP:
    """An MLP on the flattened input:

        depth x [Linear(width, bias) -> BatchNorm1d(width) if batch_norm -> activation]
        -> Linear(width, num_classes, bias)

    `residual` adds x to each hidden block's output where the shapes match (every
    block but the first, unless the input already has `width` features). `bias` applies
    to every Linear layer, the head included. BatchNorm has its affine weight and bias.
    With depth 10, width 100 and BN on 3x32x32 inputs (10 classes) this is the paper's
    MLP-BN-10-100: 401,210 parameters.
    """
    if depth < 0 or width < 1:
        raise RankbiasError(f"mlp needs depth >= 0 and width >= 1; got {depth=}, {width=}")
    if activation not in ACTIVATIONS:
        raise RankbiasError(
            f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}"
        )
    return MLP(input_shape, num_classes, depth, width, batch_norm, activation, bias, residual)
