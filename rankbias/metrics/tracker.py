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

A model with attention layers (metrics/layers.attention_layers: nn.MultiheadAttention, or
separate q/k/v/o projections) also gets the per-head products W_Q^h^T W_K^h and W_O^h W_V^h
(metrics/attention.py, the definitions of `rankbias analyze --attention-products`), in
metrics of their own so that they never enter the average rank: per head, layer
"<attention>.head<h>.qk" / ".ov" with `product_rank@<tol>` and `product_stable_rank`; per
point, `avg_qk_rank@<tol>` and `avg_ov_rank@<tol>` (the mean over every head of every
layer; `avg_qk_rank` / `avg_ov_rank` at the first tolerance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from rankbias.metrics.attention import head_factors, product_singular_values
from rankbias.metrics.layers import attention_layers, weight_matrices
from rankbias.metrics.spectral import (
    relative_weight_change,
    summarize_many,
    summary_from_singular_values,
)

# One row of the long-form metric table: (step, epoch, layer, metric, value); run-level
# metrics (average rank, accuracy, ...) have layer "".
Row = tuple[int, int, str, str, float]


def rank_metric(tol: float) -> str:
    return f"rank@{tol:g}"


def avg_rank_metric(tol: float) -> str:
    return f"avg_rank@{tol:g}"


def product_rank_metric(tol: float) -> str:
    """A per-head attention product's rank (its own name: never in the average rank)."""
    return f"product_rank@{tol:g}"


def avg_product_metric(kind: str, tol: float | None = None) -> str:
    """The mean rank of every head's `kind` ("qk" or "ov") product at a tracking point."""
    return f"avg_{kind}_rank" + ("" if tol is None else f"@{tol:g}")


class RankTracker:
    """Records per-layer spectral metrics of a model at the points you choose.

    Per matrix: rank at each tolerance, stable rank, effective rank, nuclear/Frobenius
    ratio, Frobenius and spectral norms, singular values, and the relative weight change
    ||W - W_prev||_F / ||W_prev||_F since the previous tracking point. Per point: the
    average rank over the hidden matrices at each tolerance ("avg_rank" is the first), the
    mean weight change, and any scalars you pass (accuracy, loss, lr ...).
    `attention_products`: also the per-head W_Q^T W_K and W_O W_V of the model's attention
    layers (see the module docstring). Non-finite weights raise `RankbiasError` before any
    SVD.
    """

    def __init__(self, model: nn.Module, tolerances: Sequence[float] = (1e-3,),
                 keep_spectra: bool = True, attention_products: bool = True) -> None:
        self.model = model
        self.tolerances = [float(t) for t in tolerances]
        self.keep_spectra = keep_spectra
        self.hidden = list(weight_matrices(model))  # the paper's selection
        self.attention = attention_layers(model) if attention_products else {}
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
        point.update(self._track_products(step, epoch, matrices))
        if changes:
            point["avg_weight_change"] = float(np.mean([changes[n] for n in self.hidden]))
        point.update({k: float(v) for k, v in scalars.items()})
        self.rows.extend((step, epoch, "", k, v) for k, v in point.items())
        return point

    def _track_products(self, step: int, epoch: int, matrices: dict[str, torch.Tensor]
                        ) -> dict[str, float]:
        """Rows of every head's attention products; their mean ranks for the point."""
        ranks: dict[tuple[str, float], list[int]] = {}
        for layer, layout in self.attention.items():
            q, k, v, o = (matrices[layout.names[p]] for p in "qkvo")
            factors = head_factors(q, k, v, o, layout.n_heads, layout.n_kv_heads,
                                   layout.head_dim)
            for kind, (a, b) in factors.items():
                sigmas = product_singular_values(a, b)  # float64, (heads, min(d_out, d))
                for head, sigma in enumerate(sigmas):
                    s = summary_from_singular_values(sigma, (a.shape[1], b.shape[2]),
                                                     self.tolerances)
                    name = f"{layer}.head{head}.{kind}"
                    self.rows.extend((step, epoch, name, product_rank_metric(t), float(r))
                                     for t, r in s.ranks.items())
                    self.rows.append((step, epoch, name, "product_stable_rank", s.stable_rank))
                    for t, r in s.ranks.items():
                        ranks.setdefault((kind, t), []).append(r)
        point = {avg_product_metric(kind, t): float(np.mean(r)) for (kind, t), r in ranks.items()}
        for kind in sorted({kind for kind, _ in ranks}):
            point[avg_product_metric(kind)] = point[avg_product_metric(kind, self.tolerances[0])]
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
