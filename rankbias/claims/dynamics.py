"""The rank and the weights over training (claims 7 and 10): when the rank falls, and
whether SGD with weight decay keeps moving; `timeline` (claims 16 and 17) reports when the
rank falls relative to when a run fits and when it generalizes (grokking). Time is measured
in units of Theorem 3.4's k* (the steps a constant learning rate needs to reach the decay
budget log(2/eps)), so "early" means the same thing at every B.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from rankbias.claims.gate import describe_budget, informative
from rankbias.claims.runsets import (
    GROUP_BY,
    count_runs,
    group_runs,
    scalar,
    select_runs,
    usable_runs,
)
from rankbias.claims.verdict import (
    FAIL,
    GATE,
    INCONCLUSIVE,
    PASS,
    REQUIRED,
    Verdict,
    declares,
    finish,
    rounded,
)


def curve(metrics: pd.DataFrame, run_id: str, metric: str = "avg_rank",
          by: str = "epoch") -> pd.Series:
    """A run-level metric over training, indexed by epoch (or step)."""
    rows = metrics[(metrics.run_id == run_id) & (metrics.layer == "") & (metrics.metric == metric)]
    return rows.set_index(by)["value"].sort_index()


def mean_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t confidence interval of a mean over seeds."""
    values = np.asarray(values, float)
    mean = float(values.mean())
    if len(values) < 2 or float(values.std(ddof=1)) == 0:
        return mean, mean, mean
    half = float(scipy_stats.t.ppf(0.5 + level / 2, len(values) - 1)
                 * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


# --- claim 7: early, then flat ----------------------------------------------------------------
@declares(flat_after_k=2.0, min_total_k=6.0, se_factor=2.0, min_drop=2.0, min_runs=2,
          group_by=[*GROUP_BY, "batch_size"], **GATE)
def early(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """In units of k* (each run's own): every run trained T >= `min_total_k` k* steps (the
    gate: else the group is inconclusive); then, per group (each B), the rank is flat after
    `flat_after_k` k* when the mean over seeds of rank(flat_after_k k*) - rank(T) is at most
    `se_factor` standard errors (of that mean) above 0. A group whose rank fell by less
    than `min_drop` before flat_after_k k* is reported, not counted. Also reported: the
    share of each run's reduction reached by then."""
    selected = select_runs(runs, rule["where"])
    evidence = {"counts": count_runs(selected), "flat_after_k_star": rule["flat_after_k"],
                "groups": {}}
    verdicts, reasons = [], []
    for label, group in group_runs(selected, rule["group_by"]):
        done = usable_runs(group)
        too_short = done[done.gate_steps < rule["min_total_k"] * done.gate_k_star.astype(float)]
        if len(done) < rule["min_runs"] or len(too_short) or not informative(done):
            verdicts.append(INCONCLUSIVE)
            reasons.append(f"{label}: " + (f"{len(done)} usable runs" if len(done) < rule[
                "min_runs"] else f"trained less than {rule['min_total_k']:g} k* or below the "
                f"decay budget ({describe_budget(done, ['batch_size'])})"))
            continue
        later, shares, drops = [], [], []
        for run in done.itertuples():
            ranks = curve(metrics, run.run_id, by="step")
            at = ranks[ranks.index >= rule["flat_after_k"] * float(run.gate_k_star)]
            if at.empty:
                continue
            first, mid, last = ranks.iloc[0], at.iloc[0], ranks.iloc[-1]
            later.append(mid - last)
            drops.append(first - mid)
            shares.append((first - mid) / (first - last) if first != last else math.nan)
        mean, low, high = mean_interval(later)
        se = (float(np.std(later, ddof=1)) / math.sqrt(len(later))) if len(later) > 1 else 0.0
        entry = evidence["groups"][label] = {
            "runs": len(later), "drop_before": rounded(float(np.mean(drops))),
            "drop_after": rounded(mean), "drop_after_se": rounded(se),
            "share_by_flat_after_k": rounded(float(np.nanmean(shares)), 3)}
        if np.mean(drops) < rule["min_drop"]:
            reasons.append(f"{label}: the rank fell {np.mean(drops):.1f} < {rule['min_drop']:g} "
                           "before then: not counted")
            continue
        flat = mean <= rule["se_factor"] * se if se > 0 else mean <= 0
        entry["flat"] = bool(flat)
        verdicts.append(PASS if flat else FAIL)
        reasons.append(f"{label}: fell {np.mean(drops):.1f} by {rule['flat_after_k']:g} k* "
                       f"({np.nanmean(shares):.0%} of the reduction), then "
                       f"{mean:.2f} +- {se:.2f} (SE) more to the end "
                       f"({'flat' if flat else 'still falling'}: limit "
                       f"{rule['se_factor']:g} SE)")
    return finish(verdicts, reasons, evidence)


# --- claim 10: SGD noise ------------------------------------------------------------------------
@declares(early_window=[0.05, 0.15], late_window=[0.9, 1.0], slope_window=[0.5, 1.0],
          sd_factor=3.0, level=0.95, min_runs=2, group_by=GROUP_BY, **GATE)
def noise_plateau(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Per run, the per-epoch relative weight change: its late/early ratio (means over
    those fractions of the epochs) and its late slope (least squares of log change per
    epoch over `slope_window`). Pass, per group, when (i) without weight decay the ratio
    is below the weight-decay runs' by more than `sd_factor` seed standard deviations (the
    larger of the two), (ii) its late slope is negative with a confidence interval
    (`level`, over seeds) that excludes 0, and (iii) with weight decay the late slope is
    not negative beyond its interval (a plateau). Fail only on evidence against: the
    ratios not apart, the slope without weight decay above 0 beyond its interval, or the
    weight-decay runs still falling; a slope whose interval holds 0 is inconclusive (the
    seeds cannot tell). The weight-decay runs must have reached their decay budget."""
    selected = select_runs(runs, rule["where"])
    evidence = {"counts": count_runs(selected), "groups": {}}
    verdicts, reasons = [], []
    for label, group in group_runs(selected, rule["group_by"]):
        measured = {True: [], False: []}
        for run in usable_runs(group).itertuples():
            change = curve(metrics, run.run_id, "avg_weight_change").dropna()
            change = change[change > 0]
            if len(change) >= 8:
                ratio = _window(change, rule["late_window"]).mean() / _window(
                    change, rule["early_window"]).mean()
                measured[run.weight_decay > 0].append((ratio, _slope(change,
                                                                     rule["slope_window"])))
        with_wd, without = measured[True], measured[False]
        if len(with_wd) < rule["min_runs"] or len(without) < rule["min_runs"]:
            verdicts.append(INCONCLUSIVE)
            reasons.append(f"{label}: needs {rule['min_runs']}+ usable runs with and without "
                           "weight decay")
            continue
        decayed = usable_runs(group)[usable_runs(group).weight_decay > 0]
        if not informative(decayed):
            verdicts.append(INCONCLUSIVE)
            reasons.append(f"{label}: the weight-decay runs are below their decay budget "
                           f"({describe_budget(decayed, ['weight_decay'])})")
            continue
        r_wd, s_wd = np.array(with_wd).T
        r_no, s_no = np.array(without).T
        spread = max(float(np.std(r_wd, ddof=1)), float(np.std(r_no, ddof=1)))
        gap = float(r_wd.mean() - r_no.mean())
        slope_no, slope_wd = mean_interval(s_no, rule["level"]), mean_interval(s_wd,
                                                                                rule["level"])
        apart = gap > rule["sd_factor"] * spread
        falling = slope_no[2] < 0
        plateau = slope_wd[2] >= 0
        if apart and falling and plateau:
            verdicts.append(PASS)
        elif not apart or slope_no[1] > 0 or not plateau:
            verdicts.append(FAIL)
        else:
            verdicts.append(INCONCLUSIVE)
        reasons.append(f"{label}: late/early change {r_wd.mean():.2f} with wd, {r_no.mean():.2f} "
                       f"without: {gap / spread if spread else math.inf:.1f} seed sd apart (need "
                       f"> {rule['sd_factor']:g}); late slope without wd {slope_no[0]:+.4f} "
                       f"[{slope_no[1]:+.4f}, {slope_no[2]:+.4f}] "
                       f"({'falling' if falling else 'not shown to fall'}), with wd "
                       f"{slope_wd[0]:+.4f} [{slope_wd[1]:+.4f}, {slope_wd[2]:+.4f}] "
                       f"({'plateau' if plateau else 'still falling'})")
        evidence["groups"][label] = {
            "ratio_with_wd": [rounded(r, 3) for r in r_wd],
            "ratio_without_wd": [rounded(r, 3) for r in r_no],
            "gap_in_seed_sd": rounded(gap / spread, 2) if spread else None,
            "late_slope_without_wd": [rounded(v, 5) for v in slope_no],
            "late_slope_with_wd": [rounded(v, 5) for v in slope_wd]}
    return finish(verdicts, reasons, evidence)


def _window(series: pd.Series, window: list[float]) -> pd.Series:
    """The points of a per-epoch curve with epochs in (window[0], window[1]] x the last."""
    last = series.index.max()
    return series[(series.index > window[0] * last) & (series.index <= window[1] * last)]


def _slope(series: pd.Series, window: list[float]) -> float:
    """Least-squares slope of log(values) per epoch over the window."""
    part = _window(series, window)
    if len(part) < 3:
        return math.nan
    return float(np.polyfit(part.index.to_numpy(float), np.log(part.to_numpy(float)), 1)[0])


# --- claims 16, 17: when the rank falls, against fitting and generalizing -----------------------
@declares(vary=REQUIRED, acc=0.9, ranks=["avg_rank", "avg_qk_rank", "avg_ov_rank"],
          group_by=GROUP_BY)
def timeline(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Reported, no verdict (an experiment's `reports:`). Per usable run, in SGD steps: when
    train accuracy first reaches `acc` (it fits), when test accuracy does (it generalizes;
    long after the fit is grokking), and when each rank metric of `ranks` has made half of
    its fall from its first to its last tracked value (none when it fell by less than 1).
    Per group and value of `vary`: the medians over seeds, and the median of each run's
    half-fall step minus its generalization step (negative: the rank fell first)."""
    selected = select_runs(runs, rule["where"])
    evidence = {"counts": count_runs(selected), "acc": rule["acc"], "groups": {}}
    lines = []
    for label, group in group_runs(selected, rule["group_by"]):
        entry = evidence["groups"][label] = {}
        for value, setting in usable_runs(group).groupby(rule["vary"], sort=True):
            events = [_events(metrics, run_id, rule["acc"], rule["ranks"])
                      for run_id in setting.run_id]
            summary = {"runs": len(events)}
            for key in ("fit", "generalize", *[f"half_fall_{m}" for m in rule["ranks"]]):
                steps = [e[key] for e in events if e[key] is not None]
                summary[key] = _median(steps)
                summary[f"{key}_reached"] = len(steps)
            for metric in rule["ranks"]:
                gaps = [e[f"half_fall_{metric}"] - e["generalize"] for e in events
                        if e[f"half_fall_{metric}"] is not None and e["generalize"] is not None]
                summary[f"half_fall_{metric}_minus_generalize"] = _median(gaps)
            entry[str(scalar(value))] = summary
            lines.append(f"{rule['vary']}={scalar(value)}: fit {summary['fit']}, generalized "
                         f"{summary['generalize']}, rank half-fallen " + ", ".join(
                             f"{m} {summary[f'half_fall_{m}']}" for m in rule["ranks"]))
    reason = (f"timeline in SGD steps, medians over seeds (accuracy {rule['acc']:g}; reported, "
              "no verdict): " + ("; ".join(lines) or "no usable run"))
    return Verdict(INCONCLUSIVE, reason, evidence)


def _events(metrics: pd.DataFrame, run_id: str, acc: float, ranks: list[str]) -> dict:
    """The steps of one run's events (None: never reached)."""
    def first_step(series: pd.Series, reached) -> int | None:
        hits = series[reached(series)]
        return int(hits.index[0]) if len(hits) else None

    events = {"fit": first_step(curve(metrics, run_id, "train_acc", "step"), lambda s: s >= acc),
              "generalize": first_step(curve(metrics, run_id, "test_acc", "step"),
                                       lambda s: s >= acc)}
    for metric in ranks:
        rank = curve(metrics, run_id, metric, "step").dropna()
        fell = float(rank.iloc[0] - rank.iloc[-1]) if len(rank) else 0.0
        half = float(rank.iloc[0]) - fell / 2 if len(rank) else 0.0
        events[f"half_fall_{metric}"] = None if fell < 1 else first_step(
            rank, lambda s, level=half: s <= level)
    return events


def _median(values: list[int]) -> int | None:
    return int(np.median(values)) if values else None
