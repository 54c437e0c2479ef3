"""The rank trends of the paper (claims 4, 5, 6 and 11; 13-17 beyond it): how the final
average rank moves with B, the learning rate and weight decay, each rule behind the
decay-budget gate (claims/gate.py); `role_trend` reports the same trend per matrix role of
a transformer (claim 16).

Margins are in units of the seed spread (standard deviations over seeds, or standard
errors of means), so a verdict flips only if the data move by several seed spreads, which
another CPU's (equally valid, chaotic) trajectory does not. Every verdict reports its margin.
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
    missing_values,
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
    combine,
    declares,
    finish,
    rounded,
)


# --- claims 4, 5 (13-15): a monotone trend ------------------------------------------------------
@declares(param=REQUIRED, metric="final_avg_rank", direction="increasing", gap_sigma=3,
          min_step_se=2, min_seeds=2, group_by=GROUP_BY, **GATE)
def monotone(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Within every group, the mean of `metric` over seeds moves strictly in `direction`
    along `param`; every step between neighbouring values is at least `min_step_se` times
    its standard error (seed-level), and the first-to-last gap exceeds `gap_sigma` times
    the largest seed standard deviation. The gate: the trend's low-rank end (the smallest
    value of an increasing trend, the largest of a decreasing one) must have reached its
    decay budget, or the group is inconclusive. The margin reported is the smallest ratio
    of the data to these thresholds (above 1 passes)."""
    param, metric = rule["param"], rule["metric"]
    sign = 1 if rule["direction"] == "increasing" else -1
    gap_sigma, min_step_se = rule["gap_sigma"], rule["min_step_se"]
    selected = select_runs(runs, rule["where"])
    evidence = {"counts": count_runs(selected), "groups": {}}
    verdicts, reasons = [], []
    for label, group in group_runs(selected, rule["group_by"]):
        missing = missing_values(group, param, rule["min_seeds"])
        stats = usable_runs(group).groupby(param)[metric].agg(["mean", "std", "count"]).sort_index()
        stats = stats.fillna({"std": 0.0})
        if missing or len(stats) < 2:
            verdicts.append(INCONCLUSIVE)
            reasons.append(f"{label}: " + ("; ".join(missing) or f"fewer than 2 values of {param}"))
            evidence["groups"][label] = {"values": _table(stats), "missing": missing}
            continue
        low_end = group[group[param] == (stats.index.min() if sign > 0 else stats.index.max())]
        if not informative(low_end):
            verdicts.append(INCONCLUSIVE)
            reasons.append(f"{label}: its low-rank end could not show the effect, weight decay "
                           f"had too little time ({describe_budget(low_end, [param])})")
            evidence["groups"][label] = {"values": _table(stats), "gate": "low-rank end below "
                                         "its decay budget"}
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
            "steps": [{"from": scalar(a), "to": scalar(b), "step": rounded(s),
                       "se": rounded(e), "step_in_se": rounded(x, 2)}
                      for a, b, s, e, x in zip(stats.index[:-1], stats.index[1:], steps,
                                               errors, in_se)],
            "margin": rounded(margin, 2)}
    return finish(verdicts, reasons, evidence)


@declares(param=REQUIRED, direction="increasing", gap_sigma=3, min_step_se=2, min_seeds=2,
          group_by=GROUP_BY, tol=None, **GATE)
def role_trend(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """The `monotone` rule, its thresholds and its gate, on the final mean rank of each
    matrix role of a transformer (W_Q, W_K, W_V, W_O, MLP in, MLP out: report/roles.py) at
    tolerance `tol` (the runs' first by default). Meant for an experiment's `reports:`:
    what each role does is shown beside the verdict, never combined into it."""
    from rankbias.report.roles import final_role_ranks

    tol = rule["tol"] if rule["tol"] is not None else _first_tolerance(runs)
    finals = final_role_ranks(metrics, tol) if tol is not None else pd.DataFrame()
    if finals.empty:
        return Verdict(INCONCLUSIVE, "no matrix of a transformer role was tracked",
                       {"roles": {}})
    columns = {role: f"final_rank_{role}" for role in finals.columns}
    runs = runs.merge(finals.rename(columns=columns), left_on="run_id", right_index=True,
                      how="left")
    per_role, verdicts = {}, []
    for role, column in columns.items():
        verdict = monotone({**rule, "metric": column}, runs, metrics)
        verdicts.append(verdict.verdict)
        per_role[role] = {"verdict": verdict.verdict, "reason": verdict.reason,
                          "groups": verdict.evidence.get("groups", {})}
    reason = (f"per matrix role at tol {tol:g}, {rule['param']} {rule['direction']} "
              "(reported, not judged): "
              + "; ".join(f"{role} {v['verdict']}" for role, v in per_role.items()))
    return Verdict(combine(verdicts), reason, {"tolerance": tol, "roles": per_role})


def _first_tolerance(runs: pd.DataFrame) -> float | None:
    lists = [t for t in runs.get("tolerances", pd.Series(dtype=object)) if t]
    return float(lists[0][0]) if lists else None


def _times(value: float, unit: float) -> str:
    return f"{value / unit:.1f} x" if unit > 0 else "inf x"


def _table(stats: pd.DataFrame) -> list[dict]:
    return [{"value": scalar(v), "mean": rounded(r["mean"]), "std": rounded(r["std"]),
             "n": int(r["count"])} for v, r in stats.iterrows()]


# --- claim 6: no bias without weight decay, against a matched control ---------------------
@declares(match=["batch_size", "lr"], max_change=0.05, min_control_drop=0.15, min_runs=2,
          min_cells=2, group_by=GROUP_BY, **GATE)
def flat_with_control(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """In every cell of `match` (B, lr), every run with weight decay 0 keeps its average rank
    within `max_change` (relative) of its initial value: one that moves more fails the
    claim. A cell tests the claim only where its matched weight decay > 0 control could
    show a change (its decay budget reached: the gate) and did (its runs lose at least
    `min_control_drop` of the rank on average); other cells are reported, not counted, and
    fewer than `min_cells` informative cells make the claim inconclusive."""
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
        budget_ok = informative(done[done.weight_decay > 0])
        counted = budget_ok and drop >= min_drop
        margin = min(max_change / worst if worst > 0 else np.inf, drop / min_drop)
        evidence["cells"][label] = {"largest_change_wd0": rounded(worst),
                                    "mean_drop_with_wd": rounded(drop),
                                    "control_budget_reached": budget_ok, "informative": counted,
                                    "control_weight_decay": sorted(
                                        {scalar(w) for w in done.weight_decay if w > 0}),
                                    "n_wd0": int(len(without)), "n_control": int(len(control)),
                                    "margin": rounded(margin, 2) if counted else None}
        if worst > max_change:
            verdicts.append(FAIL)
        elif counted:
            verdicts.append(PASS)
        if counted:
            why = "informative"
        elif not budget_ok:
            short = describe_budget(done[done.weight_decay > 0], ["weight_decay"])
            why = f"control below its decay budget, {short}: not counted"
        else:
            why = f"below {min_drop:.0%}: not counted"
        reasons.append(f"{label}: wd=0 moved at most {worst:.1%} (limit {max_change:.0%}), "
                       f"the wd>0 control fell {drop:.1%} ({why})")
    if FAIL not in verdicts and verdicts.count(PASS) < rule["min_cells"]:
        verdicts = [INCONCLUSIVE]
        reasons.insert(0, f"fewer than {rule['min_cells']} cells where the control moved")
    return finish(verdicts, reasons, evidence)


# --- claim 11: the scale B/(mu wd) ----------------------------------------------------------
@declares(min_spearman=0.9, se_factor=3, group_by=GROUP_BY, **GATE)
def scale(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Settings (B, lr, wd) with weight decay > 0 that reached their decay budget (the others
    are reported, not used), the mean final rank of each over its seeds, against the
    theorem's scale s = B m / (lr wd) (m = 1 for these matrices): (i) the Spearman
    correlation of rank and s is at least `min_spearman`; (ii) lr against wd: settings with
    one B and one product lr*wd, spelled with different lr, agree within `se_factor`
    standard errors of their difference; (iii) B against lr*wd: at one scale, the mean
    ranks of different B agree within `se_factor` standard errors of their difference."""
    selected = select_runs(runs, rule["where"])
    evidence = {"counts": count_runs(selected), "groups": {}}
    verdicts, reasons = [], []
    need_rho, factor = rule["min_spearman"], rule["se_factor"]
    for label, group in group_runs(selected, rule["group_by"]):
        done = usable_runs(group[group.weight_decay > 0])
        short = done[~done.gate_informative.fillna(False).astype(bool)]
        done = done[done.gate_informative.fillna(False).astype(bool)]
        done = done.assign(scale=done.batch_size / (done.lr * done.weight_decay),
                           product=(done.lr * done.weight_decay).round(10))
        settings = done.groupby(["batch_size", "lr", "weight_decay"]).agg(
            scale=("scale", "first"), product=("product", "first"),
            rank=("final_avg_rank", "mean"), sd=("final_avg_rank", "std"),
            n=("final_avg_rank", "size")).reset_index().fillna({"sd": 0.0})
        entry = evidence["groups"][label] = {"left_out_below_budget": describe_budget(
            short, ["batch_size", "lr", "weight_decay"]) if len(short) else None}
        if len(settings) < 3:
            verdicts.append(INCONCLUSIVE)
            reasons.append(f"{label}: fewer than 3 settings that reached their decay budget")
            continue
        rho = float(scipy_stats.spearmanr(settings.scale, settings["rank"]).statistic)
        spelled = _largest_gap(settings, ["batch_size", "product"])
        batch = _largest_gap(settings.assign(scale=settings.scale.round(6)), ["scale"],
                             across="batch_size")
        if spelled is None or batch is None:
            verdicts.append(INCONCLUSIVE)
            reasons.append(f"{label}: the design has no "
                           + ("product spelled two ways" if spelled is None else
                              "scale shared by two batch sizes"))
            continue
        ok = rho >= need_rho and spelled["in_se"] <= factor and batch["in_se"] <= factor
        verdicts.append(PASS if ok else FAIL)
        reasons.append(f"{label}: Spearman {rho:.2f} (need {need_rho}); lr vs wd at one lr*wd: "
                       f"largest gap {_gap_text(spelled)}; B vs lr*wd at one scale: largest gap "
                       f"{_gap_text(batch)} (need <= {factor} each)")
        entry.update({"spearman": rounded(rho, 3), "lr_vs_wd": spelled, "b_vs_lr_wd": batch,
                      "settings": [{"B": int(s.batch_size), "lr": float(s.lr),
                                    "wd": float(s.weight_decay), "scale": rounded(s.scale, 1),
                                    "rank": rounded(s["rank"], 3), "sd": rounded(s.sd, 3),
                                    "n": int(s.n)}
                                   for _, s in settings.sort_values("scale").iterrows()]})
    return finish(verdicts, reasons, evidence)


def _largest_gap(settings: pd.DataFrame, keys: list[str], across: str | None = None
                 ) -> dict | None:
    """Among settings sharing `keys`, the largest difference of mean ranks (of the means per
    value of `across`, when given) in standard errors of that difference; None when no two
    settings share them."""
    worst = None
    for key, same in settings.groupby(keys):
        if across is not None:
            same = same.groupby(across).apply(_pooled, include_groups=False)
        if len(same) < 2:
            continue
        high, low = same.loc[same["rank"].idxmax()], same.loc[same["rank"].idxmin()]
        gap = float(high["rank"] - low["rank"])
        error = math.sqrt(high.sd ** 2 / high.n + low.sd ** 2 / low.n)
        in_se = gap / error if error > 0 else (0.0 if gap == 0 else math.inf)
        if worst is None or in_se > worst["in_se"]:
            worst = {"at": [scalar(k) for k in (key if isinstance(key, tuple) else (key,))],
                     "gap": rounded(gap, 3), "se": rounded(error, 3),
                     "in_se": rounded(in_se, 2) if math.isfinite(in_se) else math.inf}
    return worst


def _gap_text(gap: dict) -> str:
    """"2.0 ranks = 2.8 SE"; a gap between settings whose seeds all gave one rank each has
    no standard error to count in (integer ranks at full scale): said so, not "inf SE"."""
    if math.isfinite(gap["in_se"]):
        return f"{gap['gap']:.1f} ranks = {gap['in_se']:.1f} SE"
    return f"{gap['gap']:.1f} ranks, with no seed spread on either side (SE 0)"


def _pooled(settings: pd.DataFrame) -> pd.Series:
    """The settings of one B at one scale as one: their mean rank, and the seed spread of
    the mean of their means."""
    n = settings.n.sum()
    variance = float((settings.sd ** 2 / settings.n).sum()) / len(settings) ** 2
    return pd.Series({"rank": settings["rank"].mean(), "sd": math.sqrt(variance * n), "n": n})
