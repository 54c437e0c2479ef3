"""Theory made executable: the rank bound of Theorem 3.4 and exact checks of Lemma 3.1,
Lemma 3.2 and the theorem's residual (docs/theory.md).

Convention (used by every function here). The paper puts lambda ||W||_F^2 in the loss:

    W_{t+1} = (1 - 2 mu lambda) W_t - mu G_t,        G_t = grad_W L_{S_t}(W_t),

while PyTorch's `SGD(weight_decay=wd)` does W <- (1 - mu wd) W - mu G, so **wd = 2 lambda**
and 2 mu lambda = mu wd. Functions take PyTorch's `weight_decay` (the knob users set, as in
the authors' code and logs); `rank_bound` and `min_steps` also accept the paper's lambda
as `lam=`.

What is checked where:
- `rank_bound`, `min_steps`: Theorem 3.4's numbers (trends, not tight values).
- `PatchCounter` + `gradient_ranks`: Lemma 3.1, rank(G) <= B*m of a mini-batch gradient.
- `record_sgd_trajectory` + `unrolling_errors`: Lemma 3.2, exact to float64 rounding.
- `theorem_residual`: the residual of Theorem 3.4's proof against the best rank-r fit.
- `relative_weight_change`: the SGD-noise metric of the earlier versions of the paper.
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from rankbias.layers import weight_matrices
from rankbias.spectral import as_matrix, check_finite, rank_from_singular_values, singular_values
from rankbias.utils import RankbiasError, to_json

CONVENTION = "PyTorch SGD weight_decay = 2*lambda (paper), so 2*mu*lambda = lr*weight_decay"
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --- Theorem 3.4: the bound ------------------------------------------------------------
def _require_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise RankbiasError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _require_real(value, name: str, positive: bool) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise RankbiasError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, "
                            f"got {value!r}")
    return float(value)


def _decay_rate(lr: float, weight_decay: float | None, lam: float | None) -> float:
    """2 mu lambda = lr * weight_decay, after checking the inputs."""
    lr = _require_real(lr, "lr", positive=True)
    if lam is not None:
        lam = _require_real(lam, "lam", positive=False)
        if weight_decay is not None and not math.isclose(weight_decay, 2 * lam, rel_tol=1e-9):
            raise RankbiasError(f"weight_decay={weight_decay!r} and lam={lam!r} disagree: "
                                f"PyTorch's weight_decay is 2*lambda = {2 * lam!r}; give one")
        weight_decay = 2 * lam
    elif weight_decay is None:
        raise RankbiasError("give weight_decay (PyTorch's) or lam (the paper's lambda)")
    weight_decay = _require_real(weight_decay, "weight_decay", positive=False)
    rate = lr * weight_decay
    # The proof bounds (1 - 2 mu lambda)^k by exp(-2 mu lambda k), which needs a factor >= 0.
    if rate > 1:
        raise RankbiasError(f"lr * weight_decay = {rate:g} > 1: the decay factor 1 - lr*wd is "
                            "negative, outside the theorem's assumptions")
    return rate


def _require_eps(eps: float) -> float:
    eps = _require_real(eps, "eps", positive=True)
    if eps >= 2:
        raise RankbiasError(f"eps must be in (0, 2), got {eps!r}")
    return eps


def min_steps(lr: float, weight_decay: float | None, eps: float = 1e-3,
              lam: float | None = None) -> float:
    """T* = log(2/eps) / (2 mu lambda) = log(2/eps) / (lr * weight_decay).

    The number of steps after which Theorem 3.4 applies, and the length k of the truncated
    sum in its proof (as a real number; a step count is ceil(T*)). `math.inf` at weight
    decay 0. Give PyTorch's `weight_decay` (= 2 lambda) or the paper's `lam` (then
    weight_decay must be None or equal to 2*lam).
    """
    rate = _decay_rate(lr, weight_decay, lam)
    eps = _require_eps(eps)
    return math.log(2 / eps) / rate if rate > 0 else math.inf


def rank_bound(batch_size: int, lr: float, weight_decay: float | None, eps: float = 1e-3,
               patches: int = 1, lam: float | None = None) -> float:
    """Theorem 3.4: W_T/||W_T|| is within eps of a matrix of rank at most

        patches * B * log(2/eps) / (2 mu lambda)  =  patches * B * min_steps(...)

    with lambda = weight_decay / 2 (PyTorch convention, see the module docstring), or the
    paper's lambda given directly as `lam` (then weight_decay must be None or 2*lam).
    `patches` is m: 1 for a fully connected layer, the output spatial positions of a conv.
    `math.inf` at weight decay 0 (no bound). Requires lr * weight_decay <= 1.

    The paper's example: B=4, mu=1, wd=6e-3, eps=1e-3 gives 4 * log(2000) / 6e-3 ~ 5.1e3,
    far above the 100 of a 100-wide layer: the absolute value is vacuous at realistic
    settings; its trends (linear in B and m, 1/(mu lambda)) are what experiments test.
    """
    batch_size = _require_int(batch_size, "batch_size")
    patches = _require_int(patches, "patches")
    return patches * batch_size * min_steps(lr, weight_decay, eps, lam)


def parse_shape(text: str) -> tuple[int, int]:
    """'OUTxIN' (e.g. '100x784') -> (100, 784)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(g) for g in match.groups()) < 1:
        raise RankbiasError(f"--shape must look like OUTxIN with positive integers "
                            f"(e.g. 100x784), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def bound_report(batch_size: int, lr: float, weight_decay: float, eps: float = 1e-3,
                 patches: int = 1, shape: str | tuple[int, int] | None = None,
                 fmt: str = "text") -> str:
    """The text or one-line JSON that `rankbias bound` prints.

    JSON has no infinity: an infinite bound or T* (weight decay 0) is written as null.
    "vacuous" is null without a shape, else whether bound >= min(out, in).
    """
    if isinstance(shape, str):
        shape = parse_shape(shape)
    bound = rank_bound(batch_size, lr, weight_decay, eps, patches)
    steps = min_steps(lr, weight_decay, eps)
    vacuous = None if shape is None else bound >= min(shape)
    if fmt == "json":
        return to_json({"bound": bound, "min_steps": steps, "vacuous": vacuous,
                        "weight_decay": weight_decay, "lambda": weight_decay / 2,
                        "convention": CONVENTION})
    if fmt != "text":
        raise RankbiasError(f"unknown format {fmt!r}: use text or json")
    lines = [
        f"rank bound    {bound:.6g}   = patches * B * log(2/eps) / (2 mu lambda)"
        f"   (B={batch_size}, patches={patches}, lr={lr:g}, eps={eps:g})",
        f"min steps T*  {steps:.6g}   = log(2/eps) / (2 mu lambda)",
        f"convention    PyTorch weight_decay = 2*lambda: weight_decay={weight_decay:g}, "
        f"lambda={weight_decay / 2:g}, 2*mu*lambda = lr*weight_decay = {lr * weight_decay:g}",
    ]
    if weight_decay == 0:
        lines.append("no bound: without weight decay the theorem gives nothing")
    if shape is not None:
        verdict = "vacuous" if vacuous else "informative"
        relation = ">=" if vacuous else "<"
        lines.append(f"shape {shape[0]}x{shape[1]}  {verdict}: bound {bound:.6g} {relation} "
                     f"min(out, in) = {min(shape)}")
    return "\n".join(lines)


# --- Lemma 3.1: gradients are low rank --------------------------------------------------
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
        attention_outputs = set()
        for name, module in model.named_modules():
            if isinstance(module, nn.MultiheadAttention):
                attention_outputs.add(_join(name, "out_proj"))
                self._hook(module, self._on_attention, _attention_keys(name, module),
                           with_kwargs=True)
        for name, module in model.named_modules():
            key = _join(name, "weight")
            if isinstance(module, nn.Linear) and name not in attention_outputs:
                self._hook(module, self._on_linear, key)
            elif isinstance(module, _CONV):
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


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _attention_keys(name: str, module: nn.MultiheadAttention) -> dict[str, str]:
    """Matrix names of an attention block, as `weight_matrices` spells them."""
    if module._qkv_same_embed_dim:
        parts = {p: f"{_join(name, 'in_proj_weight')}:{p}" for p in "qkv"}
    else:
        parts = {p: _join(name, f"{p}_proj_weight") for p in "qkv"}
    return {**parts, "out": _join(name, "out_proj.weight")}


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


def _matrix_gradient(model: nn.Module, name: str) -> torch.Tensor | None:
    """The .grad of the matrix `name` (a `weight_matrices` name), as a 2-D matrix."""
    param_name, _, part = name.partition(":")
    grad = model.get_parameter(param_name).grad
    if grad is None:
        return None
    grad = grad.detach()
    if part:  # packed attention in-projection: rows are [Q; K; V]
        grad = grad.chunk(3, dim=0)["qkv".index(part)]
    return as_matrix(grad)


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
        grad = _matrix_gradient(model, name)
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


# --- Lemma 3.2: unrolling, recorded on a float64 copy ------------------------------------
@dataclass
class SGDTrajectory:
    """Weights and mini-batch gradients of every weight matrix along plain SGD steps.

    weights[t] = W_t for t = 0..T; grads[t] = G_t = grad of batch t's loss at W_t (no weight
    decay), t = 0..T-1. All float64 clones, keyed as in `weight_matrices(..., all)`.
    """

    lr: float
    weight_decay: float
    weights: list[dict[str, torch.Tensor]] = field(repr=False)
    grads: list[dict[str, torch.Tensor]] = field(repr=False)

    @property
    def steps(self) -> int:
        return len(self.grads)

    def window(self, name: str, k: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(W_{T-k}, W_T, [G_{T-k}, ..., G_{T-1}]) of one matrix."""
        if not 1 <= k <= self.steps:
            raise RankbiasError(f"k must be between 1 and the {self.steps} recorded steps, "
                                f"got {k}")
        start = self.steps - k
        return (self.weights[start][name], self.weights[-1][name],
                [g[name] for g in self.grads[start:]])


def _as_float64(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.float64)
    return value


def _gradient_snapshot(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    grads = {}
    for name in names:
        grad = _matrix_gradient(model, name)
        if grad is None:  # SGD skips such a parameter entirely: no decay, no identity
            raise RankbiasError(f"{name} got no gradient: every weight matrix must be used "
                                "by the loss to check the unrolled identity")
        grads[name] = grad.clone()
    return grads


def record_sgd_trajectory(model: nn.Module, batches: Iterable, loss_fn: Callable, lr: float,
                          weight_decay: float) -> SGDTrajectory:
    """Run plain SGD (momentum 0, weight_decay on all parameters) on a float64 deep copy.

    `batches` yields (inputs, targets); the loss of a step is loss_fn(model(inputs), targets).
    The user's model is untouched. Keeps T+1 copies of the weights: for small models.
    """
    lr = _require_real(lr, "lr", positive=True)
    weight_decay = _require_real(weight_decay, "weight_decay", positive=False)
    copy64 = copy.deepcopy(model).to(torch.float64)  # float64: the identity to ~1e-15
    optimizer = torch.optim.SGD(copy64.parameters(), lr=lr, momentum=0.0,
                                weight_decay=weight_decay)
    names = list(weight_matrices(copy64, include_classifier=True, include_shortcuts=True))

    def snapshot() -> dict[str, torch.Tensor]:
        matrices = weight_matrices(copy64, include_classifier=True, include_shortcuts=True)
        return {name: w.clone() for name, w in matrices.items()}  # views would follow W

    weights, grads = [snapshot()], []
    for inputs, targets in batches:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(copy64(_as_float64(inputs)), _as_float64(targets)).backward()
        grads.append(_gradient_snapshot(copy64, names))
        optimizer.step()
        weights.append(snapshot())
    if not grads:
        raise RankbiasError("no batches given: at least one SGD step is needed")
    return SGDTrajectory(lr, weight_decay, weights, grads)


def unrolled_weights(w_start: torch.Tensor, grads: Sequence[torch.Tensor], lr: float,
                     weight_decay: float) -> torch.Tensor:
    """Lemma 3.2's right-hand side, from W_{T-k} and the gradients [G_{T-k}, ..., G_{T-1}]:

        (1 - mu wd)^k W_{T-k} - mu * sum_{j=1..k} (1 - mu wd)^(j-1) G_{T-j}

    (PyTorch convention: 1 - mu wd = 1 - 2 mu lambda). Computed as the closed-form sum, not
    by replaying the recursion, so it is an independent check of what SGD did.
    """
    decay = 1.0 - lr * weight_decay
    k = len(grads)
    total = torch.zeros_like(w_start)
    for j in range(1, k + 1):
        total = total + decay ** (j - 1) * grads[k - j]
    return decay**k * w_start - lr * total


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.norm(actual - expected) / torch.linalg.norm(actual))


def unrolling_errors(trajectory: SGDTrajectory, k: int | None = None) -> dict[str, float]:
    """||W_T - unrolled_weights(W_{T-k}, last k grads)||_F / ||W_T||_F for every matrix."""
    k = trajectory.steps if k is None else k
    errors = {}
    for name in trajectory.weights[-1]:
        w_start, w_end, grads = trajectory.window(name, k)
        rhs = unrolled_weights(w_start, grads, trajectory.lr, trajectory.weight_decay)
        errors[name] = _relative_error(w_end, rhs)
    return errors


def unrolled_identity_check(model: nn.Module, batches: Iterable, loss_fn: Callable, lr: float,
                            weight_decay: float, k: int | None = None) -> dict[str, float]:
    """Lemma 3.2 on a float64 copy of `model`: SGD over all `batches`, then the relative
    error of the identity unrolled over the last k steps (all of them by default), per
    matrix. Expect ~1e-15; anything above ~1e-10 means the update is not plain SGD + wd.
    """
    return unrolling_errors(record_sgd_trajectory(model, batches, loss_fn, lr, weight_decay), k)


# --- Theorem 3.4: the residual of the proof ----------------------------------------------
@dataclass(frozen=True)
class TheoremResidual:
    """Theorem 3.4's proof for one matrix, over the last k steps.

    U_k = -mu * sum_{j=1..k} (1 - mu wd)^(j-1) G_{T-j} / ||W_T||_F has rank <= k*B*m, and
    actual = ||W_T/||W_T|| - U_k||_F, bound = |1 - mu wd|^k ||W_{T-k}||_F / ||W_T||_F.
    By Lemma 3.2 the two are *equal* in exact arithmetic (the residual is exactly
    (1 - mu wd)^k W_{T-k}/||W_T||), so `holds` only tests the bookkeeping; the informative
    comparison is with `best_rank_distance[r]` = ||W_T/||W_T|| - best rank-r fit||_F =
    sqrt(sum_{i>r} sigma_i^2) (Eckart-Young), which is <= actual at r = rank_uk.
    """

    k: int
    actual: float
    bound: float
    holds: bool
    rank_uk: int  # #{i : sigma_i(U_k) > tol * sigma_max(U_k)}
    best_rank_distance: dict[int, float]

    def as_dict(self) -> dict:
        return {**asdict(self), "best_rank_distance": dict(self.best_rank_distance)}


def theorem_residual(w_start: torch.Tensor, w_end: torch.Tensor,
                     grads: Sequence[torch.Tensor], lr: float, weight_decay: float,
                     ranks: Iterable[int] | None = None, tol: float = 1e-6) -> TheoremResidual:
    """Theorem 3.4's residual from W_{T-k}, W_T and the last k gradients [G_{T-k}..G_{T-1}].

    `ranks`: extra r at which to report the best rank-r distance of W_T/||W_T||, besides
    r = rank(U_k). Float slack of `holds`: 1e-9 relative plus 1e-12.
    """
    norm_end = float(torch.linalg.norm(w_end))
    if norm_end == 0:
        raise RankbiasError("W_T is zero: the normalized matrix is undefined")
    u_k = unrolled_weights(torch.zeros_like(w_start), grads, lr, weight_decay) / norm_end
    actual = float(torch.linalg.norm(w_end / norm_end - u_k))
    decay = abs(1.0 - lr * weight_decay)
    bound = decay ** len(grads) * float(torch.linalg.norm(w_start)) / norm_end
    rank_uk = rank_from_singular_values(singular_values(u_k), tol, relative=True)
    sigma = singular_values(w_end / norm_end)
    tails = torch.sqrt(torch.flip(torch.cumsum(torch.flip(sigma**2, [0]), 0), [0]))
    best = {}
    for r in [rank_uk, *(ranks or [])]:
        best[int(r)] = float(tails[r]) if r < len(sigma) else 0.0
    holds = actual <= bound * (1 + 1e-9) + 1e-12  # equal in exact arithmetic: allow rounding
    return TheoremResidual(len(grads), actual, bound, holds, rank_uk, best)


def theorem_residuals(trajectory: SGDTrajectory, k: int, ranks: Iterable[int] | None = None,
                      tol: float = 1e-6) -> dict[str, TheoremResidual]:
    """`theorem_residual` of every matrix of a recorded trajectory, over its last k steps."""
    ranks = list(ranks or [])
    results = {}
    for name in trajectory.weights[-1]:
        w_start, w_end, grads = trajectory.window(name, k)
        results[name] = theorem_residual(w_start, w_end, grads, trajectory.lr,
                                         trajectory.weight_decay, ranks, tol)
    return results


# --- Theorem 3.4 in its informative regime -------------------------------------------------
@dataclass(frozen=True)
class TheoremCheck:
    """Theorem 3.4 for one trained matrix W_T, with k = ceil(k*) steps, k* = log(2/eps)/(mu wd).

    The theorem: W_T/||W_T|| is within eps*rho/2 (Frobenius) of a matrix of rank at most
    r = k*B*m, where rho = ||W_{T-k}||_F/||W_T||_F. Measured here: `tail_norm`, the distance
    of W_T/||W_T|| to its best rank-r approximation (sqrt of the sum of sigma_i^2, i > r),
    which the theorem bounds by eps*rho/2; and `eps_rank`, #{sigma_i(W_T/||W_T||) > eps},
    which is then <= r whenever rho <= 2 (each dropped sigma is at most the tail). The
    first follows from Lemma 3.2 in exact arithmetic (an identity of SGD, so it checks the
    implementation and the convention); the second can fail on real training: it needs
    the norm not to halve over the last k steps (rho <= 2), an assumption of the proof.
    With r >= min(shape) the bound says nothing (`vacuous`).
    """

    k_star: float
    steps: int  # k = ceil(k*)
    rank_bound: int  # r = k * B * m
    eps: float
    eps_rank: int
    tail_norm: float
    rho: float
    shape: tuple[int, int]

    @property
    def vacuous(self) -> bool:
        return self.rank_bound >= min(self.shape)

    @property
    def holds(self) -> bool:
        # float32 SGD rounding: 1e-6 relative slack on a bound that is met with room
        tail_ok = self.tail_norm <= self.eps * self.rho / 2 * (1 + 1e-6) + 1e-12
        return tail_ok and self.eps_rank <= self.rank_bound

    def as_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "vacuous": self.vacuous,
                "holds": self.holds}


def theorem_steps(lr: float, weight_decay: float, eps: float) -> int:
    """k = ceil(k*): the steps whose updates Theorem 3.4's proof keeps (k* = min_steps)."""
    return math.ceil(min_steps(lr, weight_decay, eps))


def theorem_check(w_before: torch.Tensor, w_end: torch.Tensor, lr: float, weight_decay: float,
                  batch_size: int, patches: int = 1, eps: float = 1e-3) -> TheoremCheck:
    """Theorem 3.4 on W_T (`w_end`) and W_{T-k} (`w_before`), k = theorem_steps(lr, wd, eps),
    trained by plain SGD with constant lr over those k steps (see `TheoremCheck`)."""
    k_star = min_steps(lr, weight_decay, eps)
    k = math.ceil(k_star)
    bound = k * _require_int(batch_size, "batch_size") * _require_int(patches, "patches")
    norm_end = float(torch.linalg.norm(w_end.double()))
    if norm_end == 0:
        raise RankbiasError("W_T is zero: the normalized matrix is undefined")
    sigma = singular_values(w_end) / norm_end
    tail = float(torch.sqrt((sigma[bound:] ** 2).sum())) if bound < len(sigma) else 0.0
    rho = float(torch.linalg.norm(w_before.double())) / norm_end
    eps_rank = rank_from_singular_values(sigma, eps, normalize=False)
    return TheoremCheck(k_star, k, bound, eps, eps_rank, tail, rho, tuple(as_matrix(w_end).shape))


# --- SGD noise ----------------------------------------------------------------------------
def relative_weight_change(before: Mapping[str, torch.Tensor],
                           after: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """||W_after - W_before||_F / ||W_before||_F for every name in `before` (float64).

    Callers must clone `before` (e.g. {n: w.clone() for n, w in weight_matrices(m).items()}):
    `weight_matrices` returns views of the live weights. The authors' code forgot to clone
    the top layer, so its change always counted 0; here a `before` that shares memory with
    `after` raises instead. A zero `before` gives inf (0 if nothing changed).
    """
    changes = {}
    for name, old in before.items():
        if name not in after:
            raise RankbiasError(f"{name} is in `before` but not in `after`")
        new = after[name]
        if old.untyped_storage().data_ptr() == new.untyped_storage().data_ptr():
            raise RankbiasError(f"`before` and `after` of {name} share memory: clone the "
                                "weights before training, or the change is always 0")
        old64, new64 = old.detach().to(torch.float64), new.detach().to(torch.float64)
        diff = float(torch.linalg.norm(new64 - old64))
        norm = float(torch.linalg.norm(old64))
        changes[name] = diff / norm if norm > 0 else (math.inf if diff > 0 else 0.0)
    return changes
