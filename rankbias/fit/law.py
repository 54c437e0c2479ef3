"""The rank law rank = min(r_max, a * x^b), its least-squares fit and its honest error.

    from rankbias.fit.law import fit_law, leave_one_setting_out
    law = fit_law(x, rank, r_max)       # numpy arrays, one entry per run; law(x, r_max)
    fit = fit_points(points)            # Fit: the law of a group of runs, with r2 and LOO

x = B * m / (mu * wd) is Theorem 3.4's scale (rankbias/fit/fit.py says which runs and how x is
computed); r_max is the largest rank the matrix can have.

How saturated points are treated. Near r_max the measured rank flattens; fitting a power law
through those points would bend it, and dropping them by a hand-set threshold would hide
data. Instead every run stays in the fit: the law is fitted by least squares of log rank on
log x over the runs with the smallest x (the power branch), and the split between the power
branch and the ceiling (where the law is r_max) is chosen among the sorted distinct x values
to minimize the squared log error of the whole law, min(r_max, a x^b), over all runs. A
saturated run thus costs its distance to r_max and pulls the knee, but not the slope.
It assumes the rank rises with x (b > 0), as the theorem's scale says; a fit with b <= 0
is reported as it is.

Leave-one-SETTING-out: all seeds of one (B, lr, wd) are left out together and the law (knee
included) is refitted on the other settings, so a setting is never predicted from its own
seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rankbias.utils import RankbiasError, plain


# --- the law ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Law:
    """rank = min(r_max, a * x^b); r_max is the caller's (per run, from the model)."""

    a: float
    b: float

    def __call__(self, x, r_max) -> np.ndarray:
        return np.minimum(r_max, self.a * np.asarray(x, dtype=float) ** self.b)

    def knee(self, r_max: float) -> float | None:
        """The x where a x^b reaches r_max (None when the law does not rise)."""
        return (r_max / self.a) ** (1 / self.b) if self.b > 0 else None


def _log_sse(law: Law, lx: np.ndarray, ly: np.ndarray, lcap: np.ndarray) -> float:
    return float(np.sum((ly - np.minimum(lcap, math.log(law.a) + law.b * lx)) ** 2))


def fit_law(x: Sequence[float], rank: Sequence[float], r_max: Sequence[float] | float) -> Law:
    """Least-squares fit of log rank = log a + b log x below the knee, min(r_max, .) above.

    Every candidate knee (the power branch = the runs with x <= a distinct x value, at least
    two distinct values) is fitted by ordinary least squares on that branch; the candidate
    whose whole law min(r_max, a x^b) has the smallest squared log error over ALL runs wins.
    Raises RankbiasError when x takes fewer than 2 distinct values or a value is not > 0.
    """
    x, rank = np.asarray(x, dtype=float), np.asarray(rank, dtype=float)
    if x.shape != rank.shape or x.ndim != 1:
        raise RankbiasError("x and rank must be 1-D arrays of the same length")
    r_max = np.broadcast_to(np.asarray(r_max, dtype=float), x.shape)
    if not (np.all(x > 0) and np.all(rank > 0) and np.all(r_max > 0)
            and np.all(np.isfinite(x)) and np.all(np.isfinite(rank))):
        raise RankbiasError("x, rank and r_max must be finite and > 0 to fit in log space")
    lx, ly, lcap = np.log(x), np.log(rank), np.log(r_max)
    distinct = np.unique(lx)
    if len(distinct) < 2:
        raise RankbiasError("x = B*m/(lr*wd) takes a single value: vary B, lr or wd to fit")
    best, best_sse = None, math.inf
    for knee in distinct[1:]:
        branch = lx <= knee
        b, log_a = np.polyfit(lx[branch], ly[branch], 1)
        law = Law(a=float(math.exp(log_a)), b=float(b))
        sse = _log_sse(law, lx, ly, lcap)
        if sse < best_sse:
            best, best_sse = law, sse
    return best


def leave_one_setting_out(x: Sequence[float], rank: Sequence[float], r_max,
                          setting: Sequence) -> np.ndarray:
    """Per run: the prediction of the law fitted WITHOUT every run of its setting.

    `setting` labels the runs (all seeds of one (B, lr, wd) share a label). NaN where the
    refit is impossible (the other settings span one x value).
    """
    x, rank = np.asarray(x, dtype=float), np.asarray(rank, dtype=float)
    r_max = np.broadcast_to(np.asarray(r_max, dtype=float), x.shape)
    setting = np.asarray(setting, dtype=object)
    predicted = np.full(len(x), np.nan)
    for label in dict.fromkeys(setting):
        held = setting == label
        try:
            law = fit_law(x[~held], rank[~held], r_max[~held])
        except RankbiasError:
            continue
        predicted[held] = law(x[held], r_max[held])
    return predicted


def r_squared(law: Law, x, rank, r_max) -> float | None:
    """1 - SSE/SST of log rank over all runs (ceiling included); None when SST = 0."""
    ly = np.log(np.asarray(rank, dtype=float))
    total = float(np.sum((ly - ly.mean()) ** 2))
    residual = float(np.sum((ly - np.log(law(x, r_max))) ** 2))
    return 1 - residual / total if total > 0 else None


# --- one fit: the law of a set of runs, judged by leave-one-setting-out --------------------
@dataclass
class Fit:
    """The law of one group of runs and one layer ("average" = the model-level average rank)."""

    model: str
    model_args: dict
    datasets: list[str]
    recipe: dict
    layer: str
    law: Law
    points: pd.DataFrame  # one row per run: run_id, setting, x, rank, r_max, B, lr, wd, ...
    r2: float | None
    loo_error: float | None
    loo_log_sd: float | None
    tol: float
    settings: list[dict] = field(default_factory=list)

    @property
    def r_max(self) -> float:
        return float(self.points["r_max"].max())

    @property
    def patches(self) -> float:
        return float(self.points["m"].mean())

    @property
    def x_range(self) -> tuple[float, float]:
        return float(self.points["x"].min()), float(self.points["x"].max())

    def as_dict(self) -> dict:
        knee = self.law.knee(self.r_max)
        return {
            "model": self.model, "model_args": self.model_args, "datasets": self.datasets,
            "recipe": self.recipe, "layer": self.layer, "a": plain(self.law.a),
            "b": plain(self.law.b), "knee_x": plain(knee), "r2": plain(self.r2),
            "loo_error": plain(self.loo_error), "loo_log_sd": plain(self.loo_log_sd),
            "n_runs": len(self.points), "n_settings": len(self.settings),
            "n_saturated": sum(s["saturated"] for s in self.settings),
            "x_range": plain(self.x_range), "r_max": self.r_max,
            "patches": self.patches, "tol": self.tol, "settings": plain(self.settings),
        }


def fit_points(points: pd.DataFrame, **describe) -> Fit:
    """Fit the law to `points` (columns setting, x, rank, r_max, m, batch_size, lr,
    weight_decay, dataset) and judge it by leave-one-setting-out."""
    x, rank, r_max = (points[c].to_numpy(float) for c in ("x", "rank", "r_max"))
    law = fit_law(x, rank, r_max)
    points = points.assign(loo=leave_one_setting_out(x, rank, r_max, points["setting"]))
    settings = []
    for _, group in points.groupby("setting", sort=False):
        first = group.iloc[0]
        settings.append({
            "batch_size": int(first["batch_size"]), "lr": float(first["lr"]),
            "weight_decay": float(first["weight_decay"]), "dataset": first["dataset"],
            "x": float(first["x"]), "n_runs": len(group), "rank_mean": float(group["rank"].mean()),
            "loo_predicted": float(group["loo"].iloc[0]),
            "saturated": bool(law(first["x"], first["r_max"]) >= first["r_max"]),
        })
    settings.sort(key=lambda s: (s["x"], s["batch_size"], s["lr"]))
    errors = np.array([s["loo_predicted"] - s["rank_mean"] for s in settings])
    log_residuals = np.log(points["rank"] / points["loo"]).to_numpy()
    complete = np.isfinite(errors).all()
    return Fit(law=law, points=points, r2=r_squared(law, x, rank, r_max),
               loo_error=float(np.sqrt(np.mean(errors ** 2))) if complete else None,
               loo_log_sd=float(np.sqrt(np.mean(log_residuals ** 2))) if complete else None,
               settings=settings, **describe)
