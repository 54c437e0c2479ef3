"""Rank tracking inside other training frameworks: callbacks around `rankbias.RankTracker`.

    from rankbias.integrations.lightning import RankCallback    # rankbias[lightning]
    from rankbias.integrations.huggingface import RankCallback  # rankbias[huggingface]

Both measure with the same `RankTracker` as the built-in trainer (one float64 SVD per
matrix, the paper's rank of W / ||W||_F), at the initialization, every `every_n_epochs`
epochs and at the end of training, and log under names that match the store's metrics:

    rankbias/avg_rank                        average rank of the hidden matrices (first tol)
    rankbias/avg_rank@0.05                   ... at any further tolerance
    rankbias/avg_weight_change               mean ||W - W_prev||_F / ||W_prev||_F
    rankbias/<layer>/rank@0.001              per matrix (per_layer=True): rank at each tol,
    rankbias/<layer>/stable_rank             stable rank and weight change
    rankbias/<layer>/weight_change

With `store="results.db"` the run is also written to a rankbias results store at every
tracking point (status running, then done, failed or diverged), so `rankbias serve --store
results.db` shows it while it trains and `rankbias report` draws it afterwards. This module
imports neither framework: `RunRecorder` is the part both callbacks share.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Sequence

from torch import nn

from rankbias.metrics.spectral import NonFiniteError
from rankbias.metrics.tracker import RankTracker, avg_rank_metric, rank_metric
from rankbias.utils import RankbiasError

PER_LAYER = ("stable_rank", "weight_change")  # besides the rank at each tolerance


class RankCallbackOptions:
    """What both callbacks take: measure every `every_n_epochs` epochs at `tolerances`, log
    per-layer metrics too (`per_layer`) under `prefix`, and optionally write the run to a
    rankbias store (`store`, with `run_id` and the `config` fields to record)."""

    def __init__(self, every_n_epochs: int = 1, tolerances: Sequence[float] = (1e-3,),
                 per_layer: bool = True, store: str | os.PathLike | None = None,
                 run_id: str | None = None, config: dict | None = None,
                 prefix: str = "rankbias") -> None:
        self.options = dict(tolerances=tolerances, every_n_epochs=every_n_epochs,
                            per_layer=per_layer, prefix=prefix, store=store, run_id=run_id)
        self.config = config or {}
        self.recorder: RunRecorder | None = None


class RunRecorder:
    """A `RankTracker` on one model, the names to log, and the optional results store.

    `config`: what the store records for the run (the explorer's picker reads model,
    dataset, batch_size, lr, weight_decay and seed from it); `run_id`: the store's id of
    this run (default: a hash of the config and the start time).
    """

    def __init__(self, model: nn.Module, tolerances: Sequence[float] = (1e-3,),
                 every_n_epochs: int = 1, per_layer: bool = True, prefix: str = "rankbias",
                 store: str | os.PathLike | None = None, run_id: str | None = None,
                 config: dict | None = None) -> None:
        if every_n_epochs < 1:
            raise RankbiasError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.tracker = RankTracker(model, tolerances, keep_spectra=store is not None)
        self.every_n_epochs = every_n_epochs
        self.per_layer, self.prefix, self.store = per_layer, prefix, store
        self.config = {**(config or {}), "tolerances": self.tracker.tolerances}
        self.started = time.time()
        self.run_id = run_id or hashlib.sha1(
            (json.dumps(self.config, sort_keys=True, default=str) + repr(self.started))
            .encode()).hexdigest()[:16]
        self.last_step: int | None = None
        self.epoch, self.step = 0, 0
        self.stopped = False  # after non-finite weights: nothing more to measure

    def due(self, epoch: int) -> bool:
        return epoch % self.every_n_epochs == 0

    def track(self, step: int, epoch: int) -> dict[str, float]:
        """Measure now; return the metrics to log (empty after non-finite weights)."""
        if self.stopped or step == self.last_step:
            return {}
        first_row = len(self.tracker.rows)
        try:
            point = self.tracker.track(step=step, epoch=epoch)
        except NonFiniteError as err:
            warnings.warn(f"rankbias: {err}; rank tracking stops here", stacklevel=2)
            self.stopped = True
            self.finish("diverged", str(err))
            return {}
        self.last_step, self.epoch, self.step = step, epoch, step
        metrics = {f"{self.prefix}/{name}": value for name, value in point.items()
                   if name != avg_rank_metric(self.tracker.tolerances[0])}
        if self.per_layer:
            names = [rank_metric(t) for t in self.tracker.tolerances] + list(PER_LAYER)
            metrics.update({f"{self.prefix}/{layer}/{name}": value
                            for _, _, layer, name, value in self.tracker.rows[first_row:]
                            if layer and name in names})
        self._save("running")
        return metrics

    def finish(self, status: str = "done", error: str | None = None) -> None:
        """Write the run's final status to the store (when there is one)."""
        self._save(status, error)

    def _save(self, status: str, error: str | None = None) -> None:
        if self.store is None:
            return
        from rankbias.runs.store import Store
        from rankbias.training.train import RunResult
        from rankbias.utils import code_version, library_versions

        averages = [v for _, _, layer, name, v in self.tracker.rows
                    if layer == "" and name == "avg_rank"]
        summary = {"init_avg_rank": averages[0] if averages else None,
                   "final_avg_rank": averages[-1] if averages else None}
        result = RunResult(
            run_id=self.run_id, config=self.config, status=status, epochs=self.epoch,
            steps=self.step, error=error, rows=list(self.tracker.rows),
            spectra=list(self.tracker.spectra), summary=summary,
            provenance={"code_version": code_version(), "library_versions": library_versions(),
                        "recorded_by": "rankbias.integrations"},
            started=self.started, finished=time.time())
        with Store(self.store) as store:
            store.save_result(result)


__all__ = ["RunRecorder"]
