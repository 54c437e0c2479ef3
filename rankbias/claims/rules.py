"""The verdict rules of `rankbias reproduce`: each claim (docs/theory.md, "The claims") is
decided by a rule stated in advance in its experiment file, applied to the finished runs.

A rule is a mapping with a `kind` and its parameters, e.g.

    rule: {kind: monotone, param: batch_size, direction: increasing,
           where: "weight_decay > 0", gap_sigma: 3, min_step_se: 2}

Every rule returns a `Verdict`: pass | fail | inconclusive, with the numbers behind it.
How the rules stay honest:
- Runs are grouped by data set and architecture (`group_by`, default both): a "seed
  spread" is never the spread between models or data sets, and every group must pass.
- Margins are stated in units of the seed spread (standard deviations over seeds, or the
  standard error of a mean), so a verdict flips only if the data move by several seed
  spreads, which a different CPU (a different, equally valid chaotic trajectory) does not.
  Each verdict reports its margin: how far the data are from the rule's threshold.
- A grid value with too few finished runs makes the claim inconclusive, naming the value
  and what happened to its runs; diverged, stopped and collapsed runs are counted in the
  evidence, never silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from rankbias.claims.runsets import (
    GROUP_BY,
    count_runs,
    group_runs,
    missing_values,
    scalar,
    select_runs,
    usable_runs,
)
from rankbias.claims.verdict import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    REQUIRED,
    Verdict,
    combine,
    declare,
    finish,
    parameters,
    rounded,
)
from rankbias.utils import RankbiasError

RULES: dict[str, Callable[[dict, pd.DataFrame, pd.DataFrame], Verdict]] = {}


def declares(**params):
    """Register a rule function under its name, with its parameters and their defaults."""
    def register(fn):
        declare(fn.__name__, **params)
        RULES[fn.__name__] = fn
        return fn
    return register


# --- claims 4, 5: trends --------------------------------------------------------------------
@declares(param=REQUIRED, metric="final_avg_rank", direction="increasing", gap_sigma=3,
          min_step_se=2, min_seeds=2, group_by=GROUP_BY)
def monotone(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Within every group, the mean of `metric` over seeds moves strictly in `direction`
    along `param`; every step between neighbouring values is at least `min_step_se` times
    its standard error (seed-level), and the first-to-last gap exceeds `gap_sigma` times
    the largest seed standard deviation. The margin reported is the smallest ratio of the
    data to these thresholds (above 1 passes)."""
    param, metric = rule["param"], rule["metric"]
    sign = 1 if rule["direction"] == "increasing" else -1
    gap_sigma, min_step_se = rule["gap_sigma"], rule["min_step_se"]
    min_seeds = rule["min_seeds"]
    selected = select_runs(runs, rule["where"])
    evidence = {"counts": count_runs(selected), "groups": {}}
    verdicts, reasons = [], []
    for label, group in group_runs(selected, rule["group_by"]):
        missing = missing_values(group, param, min_seeds)
        stats = usable_runs(group).groupby(param)[metric].agg(["mean", "std", "count"]).sort_index()
        stats = stats.fillna({"std": 0.0})
        if missing or len(stats) < 2:
            verdicts.append(INCONCLUSIVE)
            reasons.append(f"{label}: " + ("; ".join(missing) or f"fewer than 2 values of {param}"))
            evidence["groups"][label] = {"values": _table(stats), "missing": missing}
            continue
        means, sds, ns = (stats[c].to_numpy(float) for c in ("mean", "std", "count"))
        steps = np.diff(means) * sign
        errors = np.sqrt(sds[1:] ** 2 / ns[1:] + sds[:-1] ** 2 / ns[:-1])
        in_se = np.where(errors > 0, steps / np.maximum(errors, 1e-300),
                         np.where(steps > 0, np.inf, -np.inf))
        gap, spread = float(steps.sum()), float(sds.max())
        gap_ratio = gap / (gap_sigma * spread) if spread > 0 else (np.inf if gap > 0 else 0.0)
        margin = min(float(in_se.min()) / min_step_se, gap_ratio)
        ok = bool((steps > 0).all()) and margin > 1
        verdicts.append(PASS if ok else FAIL)
        reasons.append(f"{label}: gap {gap:.2f} = {_times(gap, spread)} seed sd (need "
                       f"{gap_sigma}), smallest step {float(in_se.min()):.1f} SE (need "
                       f"{min_step_se})")
        evidence["groups"][label] = {
            "values": _table(stats), "gap": rounded(gap), "max_seed_sd": rounded(spread),
            "steps": [{"from": scalar(a), "to": scalar(b), "step": rounded(s), "se": rounded(e),
                       "step_in_se": rounded(x, 2)}
                      for a, b, s, e, x in zip(stats.index[:-1], stats.index[1:], steps,
                                               errors, in_se)],
            "margin": rounded(margin, 2)}
    return finish(verdicts, reasons, evidence)


def _times(value: float, unit: float) -> str:
    return f"{value / unit:.1f} x" if unit > 0 else "inf x"


def _table(stats: pd.DataFrame) -> list[dict]:
    return [{"value": scalar(v), "mean": rounded(r["mean"]), "std": rounded(r["std"]),
             "n": int(r["count"])}
            for v, r in stats.iterrows()]


# --- claim 6: no bias without weight decay, against a matched control -----------------------
@declares(match=["batch_size", "lr"], max_change=0.05, min_control_drop=0.15, min_runs=2,
          min_cells=2, group_by=GROUP_BY)
def flat_with_control(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """In every cell of `match` (B, lr), every run with weight decay 0 keeps its average rank
    within `max_change` (relative) of its initial value: one that moves more fails the
    claim. A cell tests the claim only where its matched runs with weight decay > 0 lose at
    least `min_control_drop` of it on average (the experiment could have shown a change
    there); other cells are reported, not counted, and fewer than `min_cells` informative
    cells make the claim inconclusive."""
    match, max_change = rule["match"], rule["max_change"]
    min_drop = rule["min_control_drop"]
    selected = select_runs(runs, rule["where"])
    evidence = {"counts": count_runs(selected), "cells": {}}
    verdicts, reasons = [], []
    for label, group in group_runs(selected, rule["group_by"] + match):
        done = usable_runs(group)
        change = (done.final_avg_rank - done.init_avg_rank) / done.init_avg_rank
        without, control = change[done.weight_decay == 0], change[done.weight_decay > 0]
        if len(without) < rule["min_runs"] or len(control) < rule["min_runs"]:
            verdicts.append(INCONCLUSIVE)
            reasons.append(f"{label}: {len(without)} usable runs without and {len(control)} "
                           f"with weight decay; {missing_values(group, 'weight_decay', 1)}")
            continue
        worst, drop = float(without.abs().max()), float(-control.mean())
        informative = drop >= min_drop
        margin = min(max_change / worst if worst > 0 else np.inf, drop / min_drop)
        evidence["cells"][label] = {"largest_change_wd0": rounded(worst),
                                    "mean_drop_with_wd": rounded(drop), "informative": informative,
                                    "control_weight_decay": sorted(
                                        {scalar(w) for w in done.weight_decay if w > 0}),
                                    "n_wd0": int(len(without)), "n_control": int(len(control)),
                                    "margin": rounded(margin, 2) if informative else None}
        if worst > max_change:
            verdicts.append(FAIL)
        elif informative:
            verdicts.append(PASS)
        reasons.append(f"{label}: wd=0 moved at most {worst:.1%} (limit {max_change:.0%}), "
                       f"the wd>0 control fell {drop:.1%} ("
                       + ("informative" if informative else f"below {min_drop:.0%}: not counted")
                       + ")")
    if FAIL not in verdicts and verdicts.count(PASS) < rule["min_cells"]:
        verdicts = [INCONCLUSIVE]
        reasons.insert(0, f"fewer than {rule['min_cells']} cells where the control moved")
    return finish(verdicts, reasons, evidence)


# --- claim 7: early, then flat ----------------------------------------------------------------
def _curve(metrics: pd.DataFrame, run_id: str, metric: str = "avg_rank") -> pd.Series:
    rows = metrics[(metrics.run_id == run_id) & (metrics.layer == "") & (metrics.metric == metric)]
    return rows.set_index("epoch")["value"].sort_index()


@declares(by_fraction=0.5, min_fraction=0.8, min_drop=2, min_runs=2,
          group_by=[*GROUP_BY, "schedule"])
def early(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """In every run of every group (e.g. each schedule: the one under test, and a
    constant-lr control so that "early" cannot be the schedule's doing), at least
    `min_fraction` of the run's rank reduction is reached by `by_fraction` of its epochs.
    Runs that lose fewer than `min_drop` ranks do not count (their "fraction" is noise)."""
    by, need = rule["by_fraction"], rule["min_fraction"]
    selected = select_runs(runs, rule["where"])
    evidence = {"counts": count_runs(selected), "by_fraction_of_epochs": by, "groups": {}}
    verdicts, reasons = [], []
    for label, group in group_runs(selected, rule["group_by"]):
        fractions = {}
        for run in usable_runs(group).itertuples():
            curve = _curve(metrics, run.run_id)
            drop = curve.iloc[0] - curve.iloc[-1]
            if drop >= rule["min_drop"]:
                at = curve[curve.index <= by * curve.index.max()].iloc[-1]
                fractions[run.run_id] = float((curve.iloc[0] - at) / drop)
        if len(fractions) < rule["min_runs"]:
            verdicts.append(INCONCLUSIVE)
            reasons.append(f"{label}: only {len(fractions)} runs with a rank reduction")
            continue
        worst = min(fractions.values())
        verdicts.append(PASS if worst >= need else FAIL)
        reasons.append(f"{label}: smallest share by {by:.0%} of training {worst:.2f} "
                       f"(need {need})")
        evidence["groups"][label] = {"smallest_fraction": rounded(worst, 3),
                                     "mean_fraction": rounded(np.mean(list(fractions.values())), 3),
                                     "runs": len(fractions),
                                     "fractions": {k: rounded(v, 3) for k, v in fractions.items()}}
    return finish(verdicts, reasons, evidence)


# --- claim 8: training accuracy ----------------------------------------------------------------
@declares(metric="train_acc", max_drop=0.03, group_by=[*GROUP_BY, "batch_size", "lr"])
def accuracy_vs_baseline(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Within each group and cell (B, lr): the mean `metric` of every weight decay > 0 is at
    most `max_drop` below the mean of weight decay 0 (the baseline)."""
    metric, max_drop = rule["metric"], rule["max_drop"]
    selected = select_runs(runs, rule["where"])
    evidence = {"counts": count_runs(selected), "groups": {}}
    drops = {}
    for label, group in group_runs(selected, rule["group_by"]):
        means = usable_runs(group).groupby("weight_decay")[metric].mean()
        if 0.0 not in means.index or len(means) < 2:
            continue
        drop = float(means[0.0] - means.drop(0.0).min())
        drops[label] = drop
        evidence["groups"][label] = {f"{metric}_wd0": rounded(means[0.0]),
                                     f"lowest_{metric}_wd>0": rounded(means.drop(0.0).min()),
                                     "drop": rounded(drop)}
    if not drops:
        return Verdict(INCONCLUSIVE, "no cell with runs at weight decay 0 and > 0", evidence)
    worst = max(drops.values())
    counts = evidence["counts"]
    return Verdict(PASS if worst <= max_drop else FAIL,
                   f"largest {metric} drop against weight decay 0: {worst:.4f} (limit "
                   f"{max_drop}) over {len(drops)} cells; {counts['diverged']} diverged, "
                   f"{counts['collapsed']} collapsed runs reported", evidence)


# --- claim 9: test accuracy, as an equivalence test ---------------------------------------------
@declares(param="weight_decay", margin=0.03, level=0.95, within=["batch_size", "lr"],
          min_rank_change=0.1, max_train_drop=1.0, group_by=GROUP_BY)
def equivalence(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Within each group and fixed `within` (B, lr), for every weight decay > 0 whose mean
    final rank is at least `min_rank_change` (relative) below weight decay 0's, and whose
    runs trained (mean train accuracy at most `max_train_drop` below weight decay 0's:
    claim 8's criterion; a setting that failed to fit is claim 8's business, not a test of
    generalization): the confidence interval (`level`, Welch, over seeds) of the
    difference in mean test accuracy lies inside [-margin, +margin]. Also reports the
    Spearman correlation of final rank and test accuracy over the runs of each group
    (positive: lower rank, lower accuracy)."""
    param, delta = rule["param"], rule["margin"]
    level, within = rule["level"], rule["within"]
    within = [within] if isinstance(within, str) else within
    selected = select_runs(runs, rule["where"])
    evidence = {"counts": count_runs(selected), "equivalence_margin": delta, "level": level,
                "groups": {}}
    verdicts, reasons = [], []
    for label, group in group_runs(selected, rule["group_by"] + within):
        done = usable_runs(group)
        base = done[done[param] == 0]
        rho = scipy_stats.spearmanr(done.final_avg_rank, done.test_acc).statistic \
            if len(done) > 2 else math.nan
        entry = {"spearman_rank_vs_test_acc": rounded(rho, 3), "comparisons": []}
        evidence["groups"][label] = entry
        if len(base) < 2:
            verdicts.append(INCONCLUSIVE)
            reasons.append(f"{label}: fewer than 2 usable runs at {param} = 0")
            continue
        for value, other in done[done[param] > 0].groupby(param):
            rank_change = 1 - other.final_avg_rank.mean() / base.final_avg_rank.mean()
            low, high, diff = _welch_interval(other.test_acc, base.test_acc, level)
            fitted = base.train_acc.mean() - other.train_acc.mean() <= rule["max_train_drop"]
            tested = rank_change >= rule["min_rank_change"] and fitted
            margin = delta / max(abs(low), abs(high)) if tested else None
            entry["comparisons"].append({param: scalar(value), "n": int(len(other)),
                                         "rank_change": rounded(rank_change, 3),
                                         "test_acc_diff": rounded(diff), "ci_low": rounded(low),
                                         "ci_high": rounded(high), "tested": bool(tested),
                                         "train_acc": rounded(other.train_acc.mean()),
                                         "margin": None if margin is None else rounded(margin, 2)})
            if tested:
                verdicts.append(PASS if margin > 1 else FAIL)
                reasons.append(f"{label}, {param}={scalar(value)}: rank -{rank_change:.0%}, "
                               f"test acc {diff:+.3f} [{low:+.3f}, {high:+.3f}] "
                               f"{'inside' if margin > 1 else 'not inside'} +-{delta}")
    if not verdicts:
        reasons.append("no setting lowered the rank enough to test its effect")
    return finish(verdicts, reasons, evidence)


def _welch_interval(a: pd.Series, b: pd.Series, level: float) -> tuple[float, float, float]:
    """Confidence interval of mean(a) - mean(b) (Welch's t, unequal variances)."""
    diff = float(a.mean() - b.mean())
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(scipy_stats.t.ppf(0.5 + level / 2, dof)) * se
    return diff - half, diff + half, diff


# --- claim 10: SGD noise ------------------------------------------------------------------------
@declares(early_window=[0.05, 0.15], late_window=[0.9, 1.0], min_ratio_wd=0.75,
          max_ratio_no_wd=0.5, min_plateau=1e-3, group_by=GROUP_BY)
def noise_plateau(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Per-epoch relative weight change, late window over early window (means over those
    fractions of the epochs): with weight decay it stays on a plateau (ratio >=
    `min_ratio_wd`, and the late change >= `min_plateau`); without it keeps falling
    (ratio <= `max_ratio_no_wd`)."""
    early_window, late_window = rule["early_window"], rule["late_window"]
    selected = select_runs(runs, rule["where"])
    evidence = {"counts": count_runs(selected), "early_window": early_window,
                "late_window": late_window, "groups": {}}
    verdicts, reasons = [], []
    for label, group in group_runs(selected, rule["group_by"]):
        with_wd, without = [], []
        for run in usable_runs(group).itertuples():
            curve = _curve(metrics, run.run_id, "avg_weight_change").dropna()
            if len(curve) < 8:
                continue
            late = _window_mean(curve, late_window)
            ratio = late / _window_mean(curve, early_window)
            (with_wd if run.weight_decay > 0 else without).append((ratio, late))
        entry = {"ratio_with_wd": [rounded(r, 3) for r, _ in with_wd],
                 "late_change_with_wd": [rounded(c, 5) for _, c in with_wd],
                 "ratio_without_wd": [rounded(r, 3) for r, _ in without]}
        evidence["groups"][label] = entry
        if len(with_wd) < 2 or len(without) < 2:
            verdicts.append(INCONCLUSIVE)
            reasons.append(f"{label}: needs 2+ usable runs with and without weight decay")
            continue
        low_wd = min(r for r, _ in with_wd)
        high_no = max(r for r, _ in without)
        plateau = low_wd >= rule["min_ratio_wd"] and min(
            c for _, c in with_wd) >= rule["min_plateau"]
        falling = high_no <= rule["max_ratio_no_wd"]
        entry["margin"] = rounded(min(low_wd / rule["min_ratio_wd"],
                                 rule["max_ratio_no_wd"] / high_no), 2)
        verdicts.append(PASS if plateau and falling else FAIL)
        reasons.append(f"{label}: late/early change with wd >= {low_wd:.2f} "
                       f"({'plateau' if plateau else 'no plateau'}), without wd <= "
                       f"{high_no:.2f} ({'keeps falling' if falling else 'not falling'})")
    return finish(verdicts, reasons, evidence)


def _window_mean(curve: pd.Series, window: list[float]) -> float:
    """Mean of a per-epoch curve over epochs in (window[0], window[1]] x the last epoch."""
    last = curve.index.max()
    return float(curve[(curve.index > window[0] * last) & (curve.index <= window[1] * last)].mean())


# --- claim 11: the scale B/(mu wd) ----------------------------------------------------------------
@declares(min_spearman=0.9, max_within=0.25, group_by=GROUP_BY)
def scale(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Settings (B, lr, wd) with weight decay > 0, the mean final rank of each over its seeds,
    against the theorem's scale s = B m / (lr wd) (m = 1 for these matrices): the Spearman
    correlation of rank and s over the settings is at least `min_spearman`, and settings
    that share one s (different B, lr and wd) agree: the largest spread of their means is
    at most `max_within` times the range of the means over all settings."""
    selected = select_runs(runs, rule["where"])
    evidence = {"counts": count_runs(selected), "groups": {}}
    verdicts, reasons = [], []
    for label, group in group_runs(selected, rule["group_by"]):
        done = usable_runs(group)
        done = done.assign(scale=done.batch_size / (done.lr * done.weight_decay))
        settings = done.groupby(["batch_size", "lr", "weight_decay"]).agg(
            scale=("scale", "first"), rank=("final_avg_rank", "mean"),
            n=("final_avg_rank", "size")).reset_index()
        if len(settings) < 3:
            verdicts.append(INCONCLUSIVE)
            reasons.append(f"{label}: fewer than 3 settings with usable runs")
            continue
        rho = float(scipy_stats.spearmanr(settings.scale, settings["rank"]).statistic)
        spread = settings.groupby(settings.scale.round(6))["rank"].agg(["max", "min", "size"])
        shared = spread[spread["size"] >= 2]
        within = float((shared["max"] - shared["min"]).max()) if len(shared) else math.nan
        between = float(settings["rank"].max() - settings["rank"].min())
        need_rho, need_within = rule["min_spearman"], rule["max_within"]
        if not len(shared):
            verdicts.append(INCONCLUSIVE)
            reasons.append(f"{label}: no two settings share a scale")
            continue
        agree = within <= need_within * between
        verdicts.append(PASS if rho >= need_rho and agree else FAIL)
        reasons.append(f"{label}: Spearman {rho:.2f} (need {need_rho}); settings sharing a "
                       f"scale differ by up to {within:.1f} ranks = {within / between:.2f} of "
                       f"the range {between:.1f} (limit {need_within})")
        evidence["groups"][label] = {
            "spearman": rounded(rho, 3), "within_scale_spread": rounded(within, 3),
            "range": rounded(between, 3),
            "settings": [{"B": int(s.batch_size), "lr": float(s.lr), "wd": float(s.weight_decay),
                          "scale": rounded(s.scale, 1), "rank": rounded(s["rank"], 3),
                          "n": int(s.n)}
                         for _, s in settings.sort_values("scale").iterrows()]}
    return finish(verdicts, reasons, evidence)


# --- claim 1: gradient ranks --------------------------------------------------------------------
@declares(min_checks=10)
def gradient_rank(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Lemma 3.1: every recorded mini-batch gradient has rank <= B*m. Only checks with
    B*m below the matrix's smaller side can fail (a rank can never exceed that side):
    those are counted and must number at least `min_checks`; the capped ones are
    reported apart, as a check of the bookkeeping only."""
    ranks = metrics[metrics.metric == "grad_rank"]
    bounds = metrics[metrics.metric == "grad_rank_bound"]
    sizes = metrics[metrics.metric == "grad_rank_cap"]
    if ranks.empty:
        return Verdict(INCONCLUSIVE, "no gradient ranks recorded", {})
    joined = ranks.merge(bounds, on=["run_id", "step", "layer"], suffixes=("", "_bound"))
    joined = joined.merge(sizes, on=["run_id", "step", "layer"], suffixes=("", "_cap"))
    informative = joined[joined.value_bound < joined.value_cap]
    capped = joined[joined.value_bound >= joined.value_cap]
    violations = informative[informative.value > informative.value_bound]
    at_bound = int((informative.value == informative.value_bound).sum())
    evidence = {"informative_checks": int(len(informative)),
                "informative_violations": int(len(violations)),
                "informative_at_the_bound": at_bound,
                "capped_checks": int(len(capped)),
                "capped_violations": int((capped.value > capped.value_cap).sum()),
                "largest_rank_over_bound": rounded(
                    (informative.value / informative.value_bound).max(),
                                              3) if len(informative) else None}
    reason = (f"{len(informative)} gradients with B*m below the matrix size: "
              f"{len(violations)} above B*m, {at_bound} exactly at it; {len(capped)} capped "
              "checks (B*m >= size, true by construction) reported apart")
    if len(informative) < rule["min_checks"]:
        return Verdict(INCONCLUSIVE, reason, evidence)
    return Verdict(PASS if violations.empty else FAIL, reason, evidence)


def evaluate(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Apply one rule (its parameters checked, defaults filled in); several rules (`all:
    [...]`) must all pass."""
    if "all" in rule:
        parts = [evaluate(r, runs, metrics) for r in rule["all"]]
        return Verdict(combine([p.verdict for p in parts]), " | ".join(p.reason for p in parts),
                       {f"rule{i + 1}": p.evidence for i, p in enumerate(parts)})
    params = parameters(rule)
    if params["kind"] not in RULES:
        raise RankbiasError(f"rule kind {params['kind']!r} is decided by its experiment's "
                            "check, not from runs")
    return RULES[params["kind"]](params, runs, metrics)
