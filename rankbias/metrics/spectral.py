"""Spectral metrics of one weight matrix, all derived from one singular-value vector.

The paper's rank measure (docs/theory.md, "The rank"): normalize W by its Frobenius norm
and count the singular values above an absolute tolerance (1e-3 by default):

    rank_eps(W) = #{ i : sigma_i(W / ||W||_F) > eps }

`torch.linalg.matrix_rank` without an explicit tolerance uses a size-dependent default,
which is not this measure; here the tolerance is always explicit.

Why one SVD: the authors ran `matrix_rank` and `svdvals` per layer, two SVDs where one
vector of singular values gives every metric. Why float64: a value near a 1e-3 threshold
must not flip with float32 rounding. Why the tall orientation: svdvals of W and W.T are
the same values, and LAPACK is several times faster on the tall one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from rankbias.utils import RankbiasError

DEFAULT_TOL = 1e-3


def as_matrix(weight: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A weight tensor (or numpy array) as the paper's 2-D matrix.

    A conv kernel (out, in, *kernel) becomes out x (in * prod(kernel)); a vector becomes a
    1 x n matrix; a matrix is returned as it is.
    """
    weight = torch.as_tensor(weight)
    if weight.ndim == 0:
        raise RankbiasError("a scalar has no singular values: pass a vector or a matrix")
    if weight.ndim == 1:
        return weight.reshape(1, -1)
    return weight.reshape(weight.shape[0], -1)


class NonFiniteError(RankbiasError):
    """A matrix holds NaN or Inf: a diverged run or a corrupt file."""


def check_finite(weight: torch.Tensor, name: str = "matrix") -> None:
    """Raise before any SVD sees NaN/Inf (MKL would print errors and return garbage)."""
    if not bool(torch.isfinite(weight).all()):
        raise NonFiniteError(f"{name} contains NaN or Inf values: the run diverged or the "
                             "file is corrupt; no rank can be computed")


def singular_values(weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values of `weight` (reshaped by `as_matrix`), in descending order."""
    matrix = as_matrix(weight).detach()
    check_finite(matrix)
    return _svdvals(matrix.to(dtype))


def _svdvals(matrix: torch.Tensor) -> torch.Tensor:
    if matrix.shape[-2] < matrix.shape[-1]:
        matrix = matrix.mT  # tall orientation: same values, faster
    return torch.linalg.svdvals(matrix)


# --- metrics of a singular-value vector -----------------------------------------------
def _as_numpy(sigma) -> np.ndarray:
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.detach().cpu().to(torch.float64).numpy()
    return np.asarray(sigma, dtype=np.float64)


def _as_sigma(weight_or_sigma, from_sigma: bool) -> np.ndarray:
    return _as_numpy(weight_or_sigma if from_sigma else singular_values(weight_or_sigma))


def rank_from_singular_values(sigma, tol: float = DEFAULT_TOL, normalize: bool = True,
                              relative: bool = False) -> int:
    """Count singular values above the tolerance (see `numerical_rank`); `sigma` in any
    order (the largest is its maximum, not its first entry)."""
    sigma = _as_numpy(sigma)
    if tol < 0:
        raise RankbiasError(f"tolerance must be >= 0, got {tol}")
    if sigma.size == 0 or sigma.max() == 0.0:
        return 0  # the zero matrix has rank 0 under every convention
    if relative:
        threshold = tol * sigma.max()
    elif normalize:
        threshold = tol * math.sqrt(float(np.sum(sigma**2)))
    else:
        threshold = tol
    return int(np.count_nonzero(sigma > threshold))


def numerical_rank(weight: torch.Tensor, tol: float = DEFAULT_TOL, normalize: bool = True,
                   relative: bool = False) -> int:
    """The paper's rank: #{i : sigma_i(W/||W||_F) > tol}.

    normalize=False counts sigma_i(W) > tol; relative=True counts sigma_i > tol * sigma_max
    (the convention of numpy/torch matrix_rank with rtol) and ignores `normalize`.
    """
    return rank_from_singular_values(singular_values(weight), tol, normalize, relative)


def frobenius_norm(weight_or_sigma, from_sigma: bool = False) -> float:
    sigma = _as_sigma(weight_or_sigma, from_sigma)
    return float(math.sqrt(float(np.sum(sigma**2))))


def spectral_norm(weight_or_sigma, from_sigma: bool = False) -> float:
    sigma = _as_sigma(weight_or_sigma, from_sigma)
    return float(sigma.max()) if sigma.size else 0.0


def stable_rank(weight_or_sigma, from_sigma: bool = False) -> float:
    """||W||_F^2 / ||W||_2^2, between 1 and rank(W); 0 for the zero matrix."""
    sigma = _as_sigma(weight_or_sigma, from_sigma)
    if sigma.size == 0 or sigma.max() == 0.0:
        return 0.0
    return float(np.sum(sigma**2) / sigma.max() ** 2)


def effective_rank(weight_or_sigma, from_sigma: bool = False) -> float:
    """Roy and Vetterli (2007): exp(entropy of p_i = sigma_i / sum(sigma)), sigma not squared.

    0 for the zero matrix (no mass to spread).
    """
    sigma = _as_sigma(weight_or_sigma, from_sigma)
    total = float(np.sum(sigma))
    if total == 0.0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def nuclear_fro_ratio(weight_or_sigma, from_sigma: bool = False) -> float:
    """||W||_* / ||W||_F, between 1 and sqrt(rank(W)); 0 for the zero matrix."""
    sigma = _as_sigma(weight_or_sigma, from_sigma)
    fro = math.sqrt(float(np.sum(sigma**2)))
    return float(np.sum(sigma) / fro) if fro > 0 else 0.0


@dataclass
class SpectralSummary:
    """Every metric of one matrix, from its singular values (float64, descending)."""

    shape: tuple[int, int]
    singular_values: np.ndarray = field(repr=False)
    ranks: dict[float, int]  # tolerance -> rank
    stable_rank: float
    effective_rank: float
    nuclear_fro_ratio: float
    frobenius_norm: float
    spectral_norm: float
    relative: bool = False

    def rank(self, tol: float | None = None) -> int:
        """Rank at `tol` (the first tolerance asked for when None)."""
        return self.ranks[next(iter(self.ranks)) if tol is None else tol]

    def as_dict(self) -> dict:
        """JSON-ready scalars (no singular values)."""
        return {
            "shape": list(self.shape),
            "rank": self.rank(),
            "ranks": {repr(t): r for t, r in self.ranks.items()},
            "stable_rank": self.stable_rank,
            "effective_rank": self.effective_rank,
            "nuclear_fro_ratio": self.nuclear_fro_ratio,
            "fro_norm": self.frobenius_norm,
            "spectral_norm": self.spectral_norm,
        }


def summary_from_singular_values(sigma, shape: tuple[int, int],
                                 tols: Sequence[float] = (DEFAULT_TOL,),
                                 relative: bool = False) -> SpectralSummary:
    sigma = _as_numpy(sigma)
    return SpectralSummary(
        shape=tuple(shape),
        singular_values=sigma,
        ranks={float(t): rank_from_singular_values(sigma, t, relative=relative) for t in tols},
        stable_rank=stable_rank(sigma, from_sigma=True),
        effective_rank=effective_rank(sigma, from_sigma=True),
        nuclear_fro_ratio=nuclear_fro_ratio(sigma, from_sigma=True),
        frobenius_norm=frobenius_norm(sigma, from_sigma=True),
        spectral_norm=spectral_norm(sigma, from_sigma=True),
        relative=relative,
    )


def summarize(weight: torch.Tensor, tols: Sequence[float] = (DEFAULT_TOL,),
              relative: bool = False) -> SpectralSummary:
    """All metrics of one matrix from a single SVD."""
    matrix = as_matrix(weight).detach()
    return summary_from_singular_values(singular_values(matrix), tuple(matrix.shape), tols,
                                        relative)


def summarize_many(weights: Mapping[str, torch.Tensor], tols: Sequence[float] = (DEFAULT_TOL,),
                   relative: bool = False) -> dict[str, SpectralSummary]:
    """Summaries of many named matrices; matrices of one shape share one batched SVD call.

    Non-finite values raise `RankbiasError` naming the first offending matrix, before any SVD.
    """
    matrices = {name: as_matrix(w).detach() for name, w in weights.items()}
    for name, matrix in matrices.items():
        check_finite(matrix, name)
    by_shape: dict[tuple, list[str]] = {}
    for name, matrix in matrices.items():
        by_shape.setdefault((tuple(matrix.shape), matrix.device), []).append(name)
    sigmas: dict[str, torch.Tensor] = {}
    for names in by_shape.values():
        stacked = torch.stack([matrices[n] for n in names]).to(torch.float64)
        for name, sigma in zip(names, _svdvals(stacked).cpu()):
            sigmas[name] = sigma
    return {name: summary_from_singular_values(sigmas[name], tuple(matrices[name].shape), tols,
                                               relative)
            for name in matrices}


# --- between two matrices: the SGD-noise metric ----------------------------------------
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
