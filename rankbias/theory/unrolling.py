"""Theory made executable: the rank bound of Theorem 3.4 and exact checks of Lemma 3.1,
Lemma 3.2 and the theorem's residual (docs/theory.md).

Convention (used by every function here). The paper puts lambda ||W||_F^2 in the loss:

    W_{t+1} = (1 - 2 mu lambda) W_t - mu G_t,        G_t = grad_W L_{S_t}(W_t),

while PyTorch's `SGD(weight_decay=wd)` does W <- (1 - mu wd) W - mu G, so **wd = 2 lambda**
and 2 mu lambda = mu wd. Functions take PyTorch's `weight_decay` (the knob users set, as in
the authors' code and logs); `rank_bound` and `min_steps` also accept the paper's lambda
as `lam=`.

What is checked where (every name importable from here):
- `rank_bound`, `min_steps` (rankbias/theory/bound.py): Theorem 3.4's numbers (trends, not tight
  values).
- `PatchCounter` + `gradient_ranks` (rankbias/metrics/gradient_rank.py): Lemma 3.1, rank(G) <= B*m
  of a mini-batch gradient.
- `record_sgd_trajectory` + `unrolling_errors`: Lemma 3.2, exact to float64 rounding.
- `theorem_residual`: the residual of Theorem 3.4's proof against the best rank-r fit.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from rankbias.metrics.gradient_rank import (
    matrix_gradient,
)
from rankbias.metrics.layers import weight_matrices
from rankbias.metrics.spectral import as_matrix, rank_from_singular_values, singular_values
from rankbias.theory.bound import min_steps
from rankbias.training.sgd import sgd_step
from rankbias.utils import RankbiasError
from rankbias.validate import require_int, require_real


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
        grad = matrix_gradient(model, name)
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
    lr = require_real(lr, "lr", positive=True)
    weight_decay = require_real(weight_decay, "weight_decay", positive=False)
    copy64 = copy.deepcopy(model).to(torch.float64)  # float64: the identity to ~1e-15
    optimizer = torch.optim.SGD(copy64.parameters(), lr=lr, momentum=0.0,
                                weight_decay=weight_decay)
    names = list(weight_matrices(copy64, include_classifier=True, include_shortcuts=True))

    def snapshot() -> dict[str, torch.Tensor]:
        matrices = weight_matrices(copy64, include_classifier=True, include_shortcuts=True)
        return {name: w.clone() for name, w in matrices.items()}  # views would follow W

    weights, grads = [snapshot()], []
    for inputs, targets in batches:
        sgd_step(copy64, optimizer, loss_fn, _as_float64(inputs), _as_float64(targets),
                 after_backward=lambda _: grads.append(_gradient_snapshot(copy64, names)))
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
    bound = k * require_int(batch_size, "batch_size") * require_int(patches, "patches")
    norm_end = float(torch.linalg.norm(w_end.double()))
    if norm_end == 0:
        raise RankbiasError("W_T is zero: the normalized matrix is undefined")
    sigma = singular_values(w_end) / norm_end
    tail = float(torch.sqrt((sigma[bound:] ** 2).sum())) if bound < len(sigma) else 0.0
    rho = float(torch.linalg.norm(w_before.double())) / norm_end
    eps_rank = rank_from_singular_values(sigma, eps, normalize=False)
    return TheoremCheck(k_star, k, bound, eps, eps_rank, tail, rho, tuple(as_matrix(w_end).shape))
