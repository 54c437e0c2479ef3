"""Training accuracy with weight decay (claim 8), as a three-way equivalence test: pass
when the seed-paired confidence interval of the accuracy lost to weight decay lies within
the margin, fail only when it lies entirely beyond it, inconclusive otherwise.
"""

from __future__ import annotations

import math

import pandas as pd

from rankbias.claims.dynamics import curve, mean_interval
from rankbias.claims.gate import describe_budget, informative
from rankbias.claims.runsets import GROUP_BY, count_runs, group_runs, scalar, select_runs
from rankbias.claims.verdict import (
    FAIL,
    GATE,
    INCONCLUSIVE,
    PASS,
    Verdict,
    declares,
    finish,
    rounded,
)
from rankbias.training.collapse import collapsed


def three_way(low: float, high: float, margin: float) -> str:
    """An equivalence test's verdict on a confidence interval [low, high] of a difference:
    inside +-margin passes, entirely beyond it fails, anything else is inconclusive."""
    if -margin <= low and high <= margin:
        return PASS
    if low > margin or high < -margin:
        return FAIL
    return INCONCLUSIVE


def paired(frame: pd.DataFrame, base: pd.DataFrame, column: str) -> pd.Series:
    """Per seed, frame's `column` minus base's (the seeds both have)."""
    a, b = frame.set_index("seed")[column], base.set_index("seed")[column]
    common = a.index.intersection(b.index)
    return (a.loc[common] - b.loc[common]).astype(float)


@declares(metric="train_acc", margin=0.05, level=0.95, plateau_window=0.2, plateau_tol=0.01,
          min_rank_change=0.1, min_runs=2, group_by=[*GROUP_BY, "batch_size", "lr"], **GATE)
def accuracy_vs_baseline(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Within each cell (B, lr), for each weight decay > 0 against weight decay 0: the loss
    of `metric`, wd0 minus wd per seed, its mean and t interval (`level`). Three-way
    against `margin`. Counted only where the claim can be tested: the weight-decay setting
    reached its decay budget (the gate), its rank moved (mean final rank at least
    `min_rank_change` below weight decay 0's), and it is judged at its plateau (its
    `metric` changed by at most `plateau_tol` over the last `plateau_window` of training;
    else it is slower to fit, not shown harmed: inconclusive). Runs that collapsed (train
    accuracy <= 0.15) count as harm with the accuracy they reached; diverged runs are out
    of the claim ("non-diverged runs") and counted."""
    metric, margin = rule["metric"], rule["margin"]
    selected = select_runs(runs, rule["where"])
    evidence = {"counts": count_runs(selected), "margin": margin, "cells": {}}
    verdicts, reasons = [], []
    for label, cell in group_runs(selected, rule["group_by"]):
        done = cell[cell.status == "done"]
        base = done[done.weight_decay == 0]
        if len(base) < rule["min_runs"] or collapsed(base[metric]).any():
            reasons.append(f"{label}: no usable weight decay 0 baseline: not counted")
            continue
        for value, decayed in done[done.weight_decay > 0].groupby("weight_decay"):
            where = f"{label}, wd={scalar(value)}"
            entry = evidence["cells"][where] = {"n": int(len(decayed)),
                                                "collapsed": int(collapsed(decayed[metric]).sum())}
            rank_change = 1 - decayed.final_avg_rank.mean() / base.final_avg_rank.mean()
            entry["rank_change"] = rounded(rank_change, 3)
            if not informative(decayed):
                reasons.append(f"{where}: below its decay budget "
                               f"({describe_budget(decayed, ['weight_decay'])}): not counted")
                continue
            if rank_change < rule["min_rank_change"]:
                reasons.append(f"{where}: its rank moved {rank_change:.0%} (< "
                               f"{rule['min_rank_change']:.0%}): not counted")
                continue
            lost = paired(base, decayed, metric)
            if len(lost) < rule["min_runs"]:
                verdicts.append(INCONCLUSIVE)
                reasons.append(f"{where}: {len(lost)} seed pairs")
                continue
            still = _still_fitting(decayed, metrics, metric, rule["plateau_window"])
            mean, low, high = mean_interval(lost, rule["level"])
            verdict = three_way(low, high, margin)
            if still > rule["plateau_tol"] and verdict == FAIL:
                verdict = INCONCLUSIVE  # slower to fit, not shown harmed
            entry.update(loss=rounded(mean), ci=[rounded(low), rounded(high)],
                         still_rising=rounded(still), verdict=verdict)
            verdicts.append(verdict)
            reasons.append(f"{where}: {metric} lost {mean:+.4f} [{low:+.4f}, {high:+.4f}] "
                           f"(margin {margin:g}: {verdict}"
                           + (f"; still rising {still:+.3f} at the end" if still > rule[
                               "plateau_tol"] else "") + ")")
    return finish(verdicts, reasons, evidence)


def _still_fitting(runs: pd.DataFrame, metrics: pd.DataFrame, metric: str,
                   window: float) -> float:
    """How much `metric` rose, on average over the runs, over their last `window` of epochs."""
    rises = []
    for run in runs.itertuples():
        values = curve(metrics, run.run_id, metric)
        if len(values) >= 2:
            before = values[values.index <= (1 - window) * values.index.max()]
            rises.append(values.iloc[-1] - (before.iloc[-1] if len(before) else values.iloc[0]))
    return float(sum(rises) / len(rises)) if rises else math.nan
