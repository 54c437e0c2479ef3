"""A small Vision Transformer (pre-norm, class token), for images or 1-D signals.

Attention is `nn.MultiheadAttention`, so each block's `attn.in_proj_weight` (Q, K, V
stacked, 3*dim x dim) and `attn.out_proj` are visible to weight-matrix extractors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rankbias.models.convnet import as_channels_first, channels_first, nd_layers
from rankbias.utils import RankbiasError


def fit_patch(spatial: tuple[int, ...], patch_size: int | None) -> tuple[int, ...]:
    """The patch size along each spatial dimension.

    Each dimension gets the largest divisor of its size that is <= the requested patch
    size, so every input shape works (28x28 with 8 -> 7x7 patches; 8x8 with 16 -> 8x8).
    With patch_size None: 4, else 2, else 1 -- the first that yields >= 16 patches
    (32x32 -> 4, 28x28 -> 4, 8x8 -> 2, length 40 -> 2).
    """

    def fit(p: int) -> tuple[int, ...]:
        return tuple(max(d for d in range(1, min(p, s) + 1) if s % d == 0) for s in spatial)

    if patch_size is not None:
        return fit(patch_size)
    for p in (4, 2, 1):
        patch = fit(p)
        if math.prod(s // k for s, k in zip(spatial, patch)) >= 16:
            break
    return patch


class Block(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)) with MLP = Linear -> GELU -> Linear."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding (conv, kernel = stride = patch), class token + learned positional
    embedding, `depth` Blocks, LayerNorm, Linear head on the class token (`head`)."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, patch_size: int | None,
        depth: int, heads: int, dim: int, mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.shape = channels_first(input_shape)
        Conv, _, _ = nd_layers(self.shape)
        spatial = self.shape[1:]
        self.patch_size = fit_patch(spatial, patch_size)
        n_patches = math.prod(s // k for s, k in zip(spatial, self.patch_size))
        self.patch_embed = Conv(self.shape[0], dim, self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(as_channels_first(x, self.shape)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def build_vit(
    input_shape: tuple[int, ...], num_classes: int, *, patch_size: int | None = None,
    depth: int = 2, heads: int = 4, dim: int = 64, mlp_ratio: float = 2.0,
) -> ViT:
    """A pre-norm ViT: Conv(C, dim, kernel=stride=patch) patch embedding, a class token
    and a learned positional embedding; `depth` x [x + MHA(LN(x)); x + MLP(LN(x))] with
    MLP = Linear(dim, mlp_ratio*dim) -> GELU -> Linear(mlp_ratio*dim, dim); LayerNorm;
    Linear(dim, num_classes) on the class token. See `fit_patch` for how the patch size
    adapts to the input (the effective value is `model.patch_size`).
    """
    if patch_size is not None and patch_size < 1:
        raise RankbiasError(f"vit needs patch_size >= 1; got {patch_size=}")
    if depth < 0 or heads < 1 or dim < 1 or mlp_ratio <= 0 or dim % heads:
        raise RankbiasError(
            f"vit needs depth >= 0, heads >= 1, dim divisible by heads and mlp_ratio > 0; "
            f"got {depth=}, {heads=}, {dim=}, {mlp_ratio=}"
        )
    return ViT(input_shape, num_classes, patch_size, depth, heads, dim, mlp_ratio)
