"""`RankTracker`: the rank of every weight matrix over training, inside any training loop.

    tracker = RankTracker(model, tolerances=[1e-3])
    tracker.track(step=0, epoch=0)                 # the initialization
    for epoch in range(1, epochs + 1):
        train_one_epoch(model)                      # your own loop
        point = tracker.track(step=steps_done, epoch=epoch, train_acc=acc)
        print(epoch, point["avg_rank"])
    frame = tracker.to_frame()                      # long form: step, epoch, layer, metric, value

The built-in trainer uses this same object. Every matrix (the classifier and shortcuts
included) is measured; the average rank is over the paper's selection (hidden matrices).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from rankbias.metrics.layers import weight_matrices
from rankbias.metrics.spectral import relative_weight_change, summarize_many

# One row of the long-form metric table: (step, epoch, layer, metric, value); run-level
# metrics (average rank, accuracy, ...) have layer "".
Row = tuple[int, int, str, str, float]


def rank_metric(tol: float) -> str:
    return f"rank@{tol:g}"


def avg_rank_metric(tol: float) -> str:
    return f"avg_rank@{tol:g}"


class RankTracker:
    """Records per-layer spectral metrics of a model at the points you choose.

    Per matrix: rank at each tolerance, stable rank, effective rank, nuclear/Frobenius
    ratio, Frobenius and spectral norms, singular values, and the relative weight change
    ||W - W_prev||_F / ||W_prev||_F since the previous tracking point. Per point: the
    average rank over the hidden matrices at each tolerance ("avg_rank" is the first), the
    mean weight change, and any scalars you pass (accuracy, loss, lr ...).
    Non-finite weights raise `RankbiasError` before any SVD.
    """

    def __init__(self, model: nn.Module, tolerances: Sequence[float] = (1e-3,),
                 keep_spectra: bool = True) -> None:
        self.model = model
        self.tolerances = [float(t) for t in tolerances]
        self.keep_spectra = keep_spectra
        self.hidden = list(weight_matrices(model))  # the paper's selection
        self.rows: list[Row] = []
        self.spectra: list[tuple[int, int, str, np.ndarray]] = []
        self._previous: dict[str, torch.Tensor] | None = None

    def track(self, step: int, epoch: int = 0, **scalars: float) -> dict[str, float]:
        """Measure now; return the run-level values of this point (avg_rank, ...)."""
        matrices = weight_matrices(self.model, include_classifier=True, include_shortcuts=True)
        summaries = summarize_many(matrices, self.tolerances)
        changes = relative_weight_change(self._previous, matrices) if self._previous else {}
        # Clone: the live weights change in place (the authors' top-layer bug:
        # docs/theory.md, "The authors' experiments").
        self._previous = {n: m.detach().clone() for n, m in matrices.items()}
        for name, s in summaries.items():
            values = {rank_metric(t): s.ranks[t] for t in self.tolerances}
            values.update(stable_rank=s.stable_rank, effective_rank=s.effective_rank,
                          nuclear_fro_ratio=s.nuclear_fro_ratio, fro_norm=s.frobenius_norm,
                          spectral_norm=s.spectral_norm)
            if name in changes:
                values["weight_change"] = changes[name]
            self.rows.extend((step, epoch, name, k, float(v)) for k, v in values.items())
            if self.keep_spectra:
                self.spectra.append((step, epoch, name, s.singular_values.astype(np.float64)))
        point = {avg_rank_metric(t): float(np.mean([summaries[n].ranks[t] for n in self.hidden]))
                 for t in self.tolerances}
        point["avg_rank"] = point[avg_rank_metric(self.tolerances[0])]
        if changes:
            point["avg_weight_change"] = float(np.mean([changes[n] for n in self.hidden]))
        point.update({k: float(v) for k, v in scalars.items()})
        self.rows.extend((step, epoch, "", k, v) for k, v in point.items())
        return point

    def latest(self, metric: str = "avg_rank") -> float:
        """The last recorded run-level value of `metric` (nan if never recorded)."""
        for _, _, layer, name, value in reversed(self.rows):
            if layer == "" and name == metric:
                return value
        return math.nan

    def to_frame(self):
        """The rows as a pandas DataFrame (step, epoch, layer, metric, value)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["step", "epoch", "layer", "metric", "value"])

    # checkpointing: everything needed to continue bit-identically
    def state_dict(self) -> dict:
        return {"rows": list(self.rows), "previous": self._previous,
                "spectra": [(s, e, n, torch.from_numpy(v)) for s, e, n, v in self.spectra]}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [tuple(r) for r in state["rows"]]
        # Checkpoints are loaded on the CPU: the weights to compare with live on the model's
        # device (CUDA included).
        device = next(iter(weight_matrices(self.model).values())).device
        previous = state["previous"]
        self._previous = previous and {n: w.to(device) for n, w in previous.items()}
        self.spectra = [(s, e, n, v.numpy()) for s, e, n, v in state["spectra"]]
