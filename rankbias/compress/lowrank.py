"""Low-rank factorization of layers, and counting what a model costs.

    layers = plan_layers(model)                     # selected matrices and their spectra
    ranks = choose_ranks(layers, tol=1e-3)          # or energy=0.99
    small, factorized = factorize(model, layers, ranks)
    count_params(small), count_flops(small, (1, 8, 8))

Each selected layer (the selection of `rankbias analyze`: hidden Linear and Conv layers;
`include_all` adds the classifier and 1x1 shortcuts) with weight matrix W (m x n, a conv
kernel as m x (c_in k k)) and rank r is replaced by its truncated SVD U_r S_r V_r^T, split as
two layers with sqrt(S_r) on each side:
- Linear(n -> m)   ->  Linear(n -> r, no bias), then Linear(r -> m, the original bias);
- ConvNd(k x k)    ->  ConvNd to r channels (the original kernel, stride, padding,
                       dilation; no bias), then a 1x1 ConvNd to m channels (the bias).
A layer stays dense where that saves nothing (r (m + n) >= m n), and so do grouped convs and
attention projections (`nn.MultiheadAttention` reads its weights directly).

Counting conventions: parameters are `model.parameters()` (BatchNorm running statistics are
buffers, not counted). FLOPs are multiply-accumulates of one forward pass on one example of
the model's input shape, counted with forward hooks: Linear and ConvNd (groups respected)
and the Q/K/V/output projections of `nn.MultiheadAttention`; biases, normalization,
activations, pooling and the attention products QK^T and AV are not counted.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from rankbias.metrics.layers import CONV, weight_matrices
from rankbias.metrics.spectral import rank_from_singular_values, summarize_many
from rankbias.models import example_input
from rankbias.utils import RankbiasError


# --- the factorized layer ------------------------------------------------------------------
class LowRank(nn.Module):
    """Two layers in a row that stand for one dense layer of rank r: `first` (to r features
    or channels, no bias), then `second` (to the outputs, with the dense layer's bias)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def rank(self) -> int:
        return self.first.weight.shape[0]

    def product(self) -> torch.Tensor:
        """The dense weight this pair represents (float64, the dense layer's weight shape)."""
        a = self.first.weight.detach().to(torch.float64)
        b = self.second.weight.detach().to(torch.float64).reshape(-1, self.rank)
        return (b @ a.reshape(self.rank, -1)).reshape(b.shape[0], *a.shape[1:])


def low_rank_like(dense: nn.Module, rank: int) -> LowRank:
    """An (untrained) factor pair of `rank` with the shapes, dtype and device of `dense`."""
    has_bias = dense.bias is not None
    if isinstance(dense, nn.Linear):
        first = nn.Linear(dense.in_features, rank, bias=False)
        second = nn.Linear(rank, dense.out_features, bias=has_bias)
    else:
        conv = type(dense)
        first = conv(dense.in_channels, rank, dense.kernel_size, stride=dense.stride,
                     padding=dense.padding, dilation=dense.dilation, bias=False,
                     padding_mode=dense.padding_mode)
        second = conv(rank, dense.out_channels, 1, bias=has_bias)
    return LowRank(first, second).to(device=dense.weight.device, dtype=dense.weight.dtype)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


# --- the layers to factorize and their spectra ---------------------------------------------
@dataclass
class Layer:
    """One selected weight matrix: its singular values and, once asked for, its SVD."""

    name: str  # the matrix name `rankbias analyze` prints ("blocks.0.fc.weight")
    module: str  # the module that holds it ("blocks.0.fc")
    shape: tuple[int, int]  # m x n
    sigma: np.ndarray = field(repr=False)  # float64, descending: the values analyze uses
    note: str | None = None  # why it stays dense at any rank (attention, grouped conv, ...)
    _svd: tuple | None = field(default=None, repr=False)

    def rank_at_tol(self, tol: float) -> int:
        return rank_from_singular_values(self.sigma, tol)

    def rank_at_energy(self, energy: float) -> int:
        kept = np.cumsum(self.sigma**2)
        if kept.size == 0 or kept[-1] == 0.0:
            return 0
        return min(int(np.searchsorted(kept, energy * kept[-1])) + 1, kept.size)

    def rel_error(self, rank: int) -> float:
        """||W - W_r||_F / ||W||_F = sqrt(sum of the dropped sigma_i^2) / ||W||_F."""
        total = float(np.sum(self.sigma**2))
        return math.sqrt(float(np.sum(self.sigma[rank:] ** 2)) / total) if total > 0 else 0.0

    def saves(self, rank: int) -> bool:
        m, n = self.shape
        return self.note is None and rank * (m + n) < m * n

    def factor(self, dense: nn.Module, rank: int) -> LowRank:
        """The rank-`rank` truncated SVD of `dense`'s weight as a factor pair."""
        if self._svd is None:
            matrix = dense.weight.detach().to(torch.float64).reshape(self.shape)
            self._svd = torch.linalg.svd(matrix, full_matrices=False)
        u, s, vh = self._svd
        root = s[:rank].sqrt()
        pair = low_rank_like(dense, rank)
        with torch.no_grad():
            first = root[:, None] * vh[:rank]  # r x n
            second = u[:, :rank] * root  # m x r
            pair.first.weight.copy_(first.reshape(pair.first.weight.shape))
            pair.second.weight.copy_(second.reshape(pair.second.weight.shape))
            if dense.bias is not None:
                pair.second.bias.copy_(dense.bias)
        return pair


def _why_dense(model: nn.Module, name: str, module_name: str) -> str | None:
    attention = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    if ":" in name or name.endswith("_proj_weight"):
        return "attention in-projection: kept dense (MultiheadAttention reads it directly)"
    if module_name.rpartition(".")[0] in attention:
        return "attention out-projection: kept dense (MultiheadAttention reads it directly)"
    if not module_name:
        return "the model is this one layer: kept dense"
    module = model.get_submodule(module_name)
    if isinstance(module, CONV) and module.groups > 1:
        return f"grouped conv (groups={module.groups}): kept dense"
    if type(module) not in (nn.Linear, *CONV) or not name.endswith(".weight"):
        return f"{type(module).__name__} is not supported: kept dense"
    return None


def plan_layers(model: nn.Module, include_all: bool = False) -> list[Layer]:
    """The selected matrices of `model` (the selection of `rankbias analyze`) with their
    float64 singular values, in model order."""
    matrices = weight_matrices(model, include_classifier=include_all,
                               include_shortcuts=include_all)
    if not matrices:
        raise RankbiasError("found no weight matrix to factorize (no Linear or Conv layer)")
    summaries = summarize_many(matrices)
    layers = []
    for name, summary in summaries.items():
        module_name = name.split(":")[0].rpartition(".")[0]
        layers.append(Layer(name, module_name, summary.shape, summary.singular_values,
                            _why_dense(model, name, module_name)))
    return layers


def choose_ranks(layers: Sequence[Layer], tol: float | None = None,
                 energy: float | None = None) -> dict[str, int]:
    """The rank of every layer under one rule (a tolerance or an energy share)."""
    if (tol is None) == (energy is None):
        raise RankbiasError("give exactly one rule: a tolerance or an energy share")
    if tol is not None:
        return {layer.name: layer.rank_at_tol(tol) for layer in layers}
    return {layer.name: layer.rank_at_energy(energy) for layer in layers}


def factorize(model: nn.Module, layers: Sequence[Layer], ranks: Mapping[str, int]
              ) -> tuple[nn.Module, dict[str, int]]:
    """A copy of `model` with every layer that saves parameters at its rank replaced by its
    factor pair; also returns {module name: rank} of the layers replaced.

    A rank of 0 (the zero matrix, or every value under the tolerance) is stored as 1.
    """
    small = copy.deepcopy(model)
    factorized = {}
    for layer in layers:
        rank = max(ranks[layer.name], 1)
        if layer.saves(rank):
            dense = small.get_submodule(layer.module)
            set_submodule(small, layer.module, layer.factor(dense, rank))
            factorized[layer.module] = rank
    return small, factorized


# --- counting ------------------------------------------------------------------------------
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one example (the module docstring says
    what is counted)."""
    total = 0

    def linear(module, args, output) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    def conv(module, args, output) -> None:
        nonlocal total
        total += output.numel() * module.in_channels // module.groups * math.prod(
            module.kernel_size)

    def attention(module, args, kwargs, output) -> None:
        nonlocal total
        q, k, v = (args[i] if len(args) > i else kwargs[key]
                   for i, key in enumerate(("query", "key", "value")))
        e = module.embed_dim
        tokens = q.numel() // q.shape[-1]
        total += tokens * e * e * 2  # Q and output projections
        total += k.numel() * e + v.numel() * e  # K and V projections (kdim, vdim inputs)

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            hooks.append(module.register_forward_hook(attention, with_kwargs=True))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear))
        elif isinstance(module, CONV):
            hooks.append(module.register_forward_hook(conv))
    was_training = model.training
    model.eval()
    try:
        model(example_input(model, input_shape))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total


@torch.no_grad()
def truncate_(model: nn.Module, tol: float) -> dict[str, int]:
    """Replace each of the model's hidden matrices (the paper's selection) in place by its
    best approximation of rank r = its eps-rank at `tol` (the paper's rank: sigma_i(W /
    ||W||_F) > tol): the same weights with the small singular values set to 0, every layer
    kept dense. Returns each matrix's r. (For a smaller model, `factorize`.)"""
    ranks = {}
    for name, w in weight_matrices(model).items():
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        r = rank_from_singular_values(s.numpy(), tol)
        w.copy_(((u[:, :r] * s[:r]) @ vh[:r]).to(w.dtype))  # a view of the live weights
        ranks[name] = int(r)
    return ranks
