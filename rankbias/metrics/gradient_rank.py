"""Lemma 3.1 made executable: a mini-batch gradient of a weight matrix has rank <= B*m.

    with PatchCounter(model) as counter:       # hooks record B and m of every matrix
        loss_fn(model(x), y).backward()
        ranks = gradient_ranks(model, counter)  # {matrix: GradientRank(rank, bound=B*m, ...)}

m is the number of positions per example a layer is applied at: 1 for a Linear on a flat
input, the output spatial positions of a conv, the sequence length of a token Linear.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from rankbias.metrics.layers import (
    CONV,
    attention_matrix_names,
    attention_out_projections,
    matrix_of,
    parameter_of,
    weight_matrices,
)
from rankbias.metrics.spectral import (
    check_finite,
    rank_from_singular_values,
    singular_values,
)
from rankbias.utils import RankbiasError


@dataclass
class PatchCount:
    """How many outer products make up one matrix's gradient in the last forward pass."""

    batch_size: int  # leading (batch) dimension of the layer's input
    positions: int  # positions over the whole batch: B * m (summed over repeated calls)
    groups: int = 1  # a grouped conv's gradient is block-structured: groups * B*m terms

    @property
    def patches(self) -> int:
        """m: positions per example (1 for a Linear on a flat input, H_out*W_out for a conv)."""
        return self.positions // self.batch_size

    @property
    def bound(self) -> int:
        """Lemma 3.1's bound on the gradient's rank: B * m (* groups)."""
        return self.positions * self.groups


class PatchCounter:
    """Forward hooks that record B and m of every weight matrix for Lemma 3.1.

    For the last forward pass run with gradients enabled (a forward under `torch.no_grad()`
    or `inference_mode`, e.g. an evaluation, is ignored), `counts[name]` holds, for each
    matrix named as in `weight_matrices(model, include_classifier=True,
    include_shortcuts=True)`:
    - Linear: positions = numel(output) / out_features, so B for a (B, d) input and B*T for
      a (B, T, d) sequence (as in a ViT);
    - ConvNd: positions = numel(output) / out_channels = B * (output spatial positions);
    - MultiheadAttention: B*L query positions for ":q" and the out-projection, B*S key /
      value positions for ":k" and ":v" (the in-projection is not a hooked module).
    A module called twice in one forward pass adds both calls' positions.

    A new forward pass of the whole model resets the counts; call `reset()` if you run
    sub-modules yourself. Use as a context manager (hooks removed on exit) or call `close()`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.counts: dict[str, PatchCount] = {}
        self._handles = [model.register_forward_pre_hook(self._on_model_forward)]
        attention_outputs = attention_out_projections(model)
        for name, module in model.named_modules():
            key = f"{name}.weight" if name else "weight"
            if isinstance(module, nn.MultiheadAttention):
                self._hook(module, self._on_attention, attention_matrix_names(name, module),
                           with_kwargs=True)
            elif isinstance(module, nn.Linear) and name not in attention_outputs:
                self._hook(module, self._on_linear, key)
            elif isinstance(module, CONV):
                self._hook(module, self._on_conv, key)

    def _hook(self, module: nn.Module, method: Callable, key, with_kwargs: bool = False) -> None:
        hook = functools.partial(method, key)
        self._handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))

    def reset(self) -> None:
        self.counts.clear()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> PatchCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # hooks ---------------------------------------------------------------------------
    def _on_model_forward(self, module: nn.Module, args) -> None:
        if torch.is_grad_enabled():
            self.counts.clear()

    def _record(self, key: str, batch_size: int, positions: int, groups: int = 1) -> None:
        if not torch.is_grad_enabled():
            return
        if key in self.counts:
            self.counts[key].positions += positions
        else:
            self.counts[key] = PatchCount(batch_size, positions, groups)

    def _on_linear(self, key: str, module: nn.Linear, args, output) -> None:
        x = args[0]
        batch = x.shape[0] if x.ndim >= 2 else 1
        self._record(key, batch, output.numel() // module.out_features)

    def _on_conv(self, key: str, module: nn.Module, args, output) -> None:
        x = args[0]
        batch = x.shape[0] if x.ndim == len(module.kernel_size) + 2 else 1  # else unbatched
        self._record(key, batch, output.numel() // module.out_channels, module.groups)

    def _on_attention(self, keys: dict[str, str], module: nn.MultiheadAttention, args,
                      kwargs, output) -> None:
        names = ("query", "key", "value")
        q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
        batch = (q.shape[0] if module.batch_first else q.shape[1]) if q.ndim == 3 else 1
        query_positions = q.numel() // q.shape[-1]
        self._record(keys["q"], batch, query_positions)
        self._record(keys["k"], batch, k.numel() // k.shape[-1])
        self._record(keys["v"], batch, v.numel() // v.shape[-1])
        self._record(keys["out"], batch, query_positions)


@dataclass(frozen=True)
class GradientRank:
    """Lemma 3.1 for one matrix: rank of its mini-batch gradient and the bound B*m."""

    rank: int  # #{i : sigma_i(G) > tol * sigma_max(G)}, float64 SVD
    bound: int  # B * m (* groups), not capped by the shape
    batch_size: int
    patches: int  # m
    shape: tuple[int, int]
    tol: float

    @property
    def capped_bound(self) -> int:
        return min(self.bound, *self.shape)

    @property
    def holds(self) -> bool:
        return self.rank <= self.capped_bound

    def as_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "holds": self.holds}


def matrix_gradient(model: nn.Module, name: str) -> torch.Tensor | None:
    """The .grad of the matrix `name` (a `weight_matrices` name), as a 2-D matrix."""
    grad = model.get_parameter(parameter_of(name)).grad
    return None if grad is None else matrix_of(name, grad.detach())


def gradient_ranks(model: nn.Module, counter: PatchCounter,
                   tol: float = 1e-6) -> dict[str, GradientRank]:
    """Lemma 3.1: rank of every weight matrix's current gradient and its bound B*m.

    Call after `loss.backward()` and before `optimizer.step()`, with `counter` attached
    during that forward pass and gradients zeroed before it: `.grad` is then the
    mini-batch loss gradient alone (PyTorch's SGD adds weight decay inside `step()`, not
    to `.grad`). Rank is relative to the gradient's largest singular value: float32
    rounding noise measured ~1e-8 * sigma_max on small models, below the default 1e-6.
    Frozen or unused matrices (no `.grad`, or not run in the counted forward pass) are
    skipped. Tied weights get one gradient but per-module counts: not supported.
    """
    ranks: dict[str, GradientRank] = {}
    for name in weight_matrices(model, include_classifier=True, include_shortcuts=True):
        grad = matrix_gradient(model, name)
        count = counter.counts.get(name)
        if grad is None or count is None:
            continue
        check_finite(grad, f"gradient of {name}")
        rank = rank_from_singular_values(singular_values(grad), tol, relative=True)
        ranks[name] = GradientRank(rank, count.bound, count.batch_size, count.patches,
                                   tuple(grad.shape), tol)
    if not ranks:
        raise RankbiasError("no gradient to measure: attach PatchCounter(model) before the "
                            "forward pass and call gradient_ranks after loss.backward()")
    return ranks
