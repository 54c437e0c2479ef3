"""The verdict rules of `rankbias reproduce`: each claim of PAPER.md section 5 is decided by a
rule stated in advance in its experiment file, applied to the finished runs.

A rule is a mapping with a `kind` and its parameters, e.g.

    rule: {kind: monotone, param: batch_size, direction: increasing,
           where: "weight_decay > 0", gap_sigma: 3}

Every rule returns a `Verdict`: pass | fail | inconclusive, with the numbers behind it.
A rule with too few finished runs is inconclusive, never pass. Diverged runs are counted in
the evidence, never silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rankbias.utils import RankbiasError

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"


@dataclass
class Verdict:
    verdict: str
    reason: str
    evidence: dict = field(default_factory=dict)


COLLAPSED_ACC = 0.15  # the authors' divergence threshold on train accuracy


def _finished(runs: pd.DataFrame, where: str | None) -> tuple[pd.DataFrame, dict]:
    """Runs selected by `where`; done runs returned, the others counted.

    A run that finished at train accuracy <= 0.15 (the authors' divergence threshold) has
    collapsed rather than learned: its low rank says nothing, so it is counted, not used.
    """
    selected = runs.query(where) if where and len(runs) else runs
    collapsed = (selected.status == "done") & (selected.train_acc <= COLLAPSED_ACC)
    counts = {"runs": int(len(selected)),
              "done": int((selected.status == "done").sum() - collapsed.sum()),
              "collapsed": int(collapsed.sum()),
              "diverged": int((selected.status == "diverged").sum()),
              "stopped": int((selected.status == "stopped").sum()),
              "failed": int((selected.status == "failed").sum()),
              "not_run": int((~selected.status.isin(["done", "diverged", "stopped",
                                                      "failed"])).sum())}
    return selected[(selected.status == "done") & ~collapsed], counts


def _per_value(done: pd.DataFrame, param: str, metric: str) -> pd.DataFrame:
    stats = done.groupby(param)[metric].agg(["mean", "std", "count"]).sort_index()
    return stats.fillna({"std": 0.0})


def _table(stats: pd.DataFrame) -> list[dict]:
    return [{"value": _plain(v), "mean": round(float(r["mean"]), 4),
             "std": round(float(r["std"]), 4), "n": int(r["count"])}
            for v, r in stats.iterrows()]


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _groups(done: pd.DataFrame, group_by: list[str] | None):
    if not group_by:
        yield "all", done
        return
    for key, group in done.groupby(group_by):
        label = ", ".join(f"{k}={_plain(v)}" for k, v in
                          zip(group_by, key if isinstance(key, tuple) else (key,)))
        yield label, group


def monotone(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """The mean of `metric` moves strictly in `direction` along `param`, within every group,
    and the first-vs-last gap exceeds `gap_sigma` times the largest seed spread (std)."""
    param, metric = rule["param"], rule.get("metric", "final_avg_rank")
    sign = 1 if rule.get("direction", "increasing") == "increasing" else -1
    done, counts = _finished(runs, rule.get("where"))
    evidence, reasons, verdicts = {"counts": counts, "groups": {}}, [], []
    for label, group in _groups(done, rule.get("group_by")):
        stats = _per_value(group, param, metric)
        evidence["groups"][label] = _table(stats)
        if len(stats) < 2 or stats["count"].min() < rule.get("min_seeds", 2):
            verdicts.append(INCONCLUSIVE)
            reasons.append(f"{label}: fewer than 2 values of {param} with "
                           f"{rule.get('min_seeds', 2)}+ finished seeds")
            continue
        steps = np.diff(stats["mean"].to_numpy()) * sign
        gap = float(stats["mean"].iloc[-1] - stats["mean"].iloc[0]) * sign
        spread = float(stats["std"].max())
        ok = bool((steps > 0).all()) and gap > rule.get("gap_sigma", 3) * spread
        verdicts.append(PASS if ok else FAIL)
        reasons.append(f"{label}: gap {gap:.2f} vs {rule.get('gap_sigma', 3)} x spread "
                       f"{spread:.2f}, {'strictly ' if (steps > 0).all() else 'not '}monotone")
    if not verdicts:
        return Verdict(INCONCLUSIVE, "no finished run", evidence)
    return Verdict(_combine(verdicts), "; ".join(reasons), evidence)


def _combine(verdicts: list[str]) -> str:
    if FAIL in verdicts:
        return FAIL
    return INCONCLUSIVE if INCONCLUSIVE in verdicts else PASS


def flat(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """|final - init| / init of `metric` stays within `max_change` for every selected run."""
    done, counts = _finished(runs, rule.get("where"))
    if len(done) < rule.get("min_runs", 2):
        return Verdict(INCONCLUSIVE, f"only {len(done)} finished runs", {"counts": counts})
    change = ((done["final_avg_rank"] - done["init_avg_rank"]) / done["init_avg_rank"]).abs()
    worst = float(change.max())
    limit = rule.get("max_change", 0.05)
    evidence = {"counts": counts, "max_relative_change": round(worst, 4),
                "mean_init": round(float(done["init_avg_rank"].mean()), 3),
                "mean_final": round(float(done["final_avg_rank"].mean()), 3)}
    return Verdict(PASS if worst <= limit else FAIL,
                   f"largest relative change of the average rank {worst:.3f} "
                   f"(limit {limit})", evidence)


def _curve(metrics: pd.DataFrame, run_id: str, metric: str = "avg_rank") -> pd.Series:
    rows = metrics[(metrics.run_id == run_id) & (metrics.layer == "") & (metrics.metric == metric)]
    return rows.set_index("epoch")["value"].sort_index()


def early(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """At least `min_fraction` of each run's rank reduction is reached by `by_fraction` of
    its epochs (runs that lose under `min_drop` ranks do not count)."""
    done, counts = _finished(runs, rule.get("where"))
    by, need = rule.get("by_fraction", 0.5), rule.get("min_fraction", 0.8)
    fractions = {}
    for _, run in done.iterrows():
        curve = _curve(metrics, run.run_id)
        drop = curve.iloc[0] - curve.iloc[-1]
        if drop < rule.get("min_drop", 2):
            continue
        at = curve[curve.index <= by * curve.index.max()].iloc[-1]
        fractions[run.run_id] = float((curve.iloc[0] - at) / drop)
    evidence = {"counts": counts, "fraction_by_epoch_fraction": by,
                "fractions": {k: round(v, 3) for k, v in fractions.items()}}
    if len(fractions) < rule.get("min_runs", 2):
        return Verdict(INCONCLUSIVE, f"only {len(fractions)} runs with a rank reduction",
                       evidence)
    worst = min(fractions.values())
    return Verdict(PASS if worst >= need else FAIL,
                   f"smallest share of the reduction reached by {by:.0%} of training: "
                   f"{worst:.2f} (need {need})", evidence)


def accuracy_floor(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Every finished selected run reaches `floor` of `metric` (train accuracy)."""
    done, counts = _finished(runs, rule.get("where"))
    metric, floor = rule.get("metric", "train_acc"), rule.get("floor", 0.95)
    if len(done) < rule.get("min_runs", 2):
        return Verdict(INCONCLUSIVE, f"only {len(done)} finished runs", {"counts": counts})
    worst = float(done[metric].min())
    evidence = {"counts": counts, f"min_{metric}": round(worst, 4),
                f"mean_{metric}": round(float(done[metric].mean()), 4)}
    return Verdict(PASS if worst >= floor else FAIL,
                   f"lowest {metric} {worst:.4f} (floor {floor}); {counts['diverged']} "
                   "diverged runs reported, not counted", evidence)


def marginal_effect(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Within each fixed `within` (B), across `param` (wd): the mean test accuracy moves by at
    most `max_spread` while the mean final rank moves by at least `min_rank_change` (relative).
    Also reports the Spearman correlation of final rank and test accuracy per group."""
    done, counts = _finished(runs, rule.get("where"))
    param, max_spread = rule.get("param", "weight_decay"), rule.get("max_spread", 0.03)
    evidence, verdicts, reasons = {"counts": counts, "groups": {}}, [], []
    for label, group in _groups(done, [rule.get("within", "batch_size")]):
        acc = group.groupby(param)["test_acc"].mean()
        rank = group.groupby(param)["final_avg_rank"].mean()
        if len(acc) < 2:
            verdicts.append(INCONCLUSIVE)
            continue
        spread = float(acc.max() - acc.min())
        rank_change = float((rank.max() - rank.min()) / rank.max())
        rho = group["final_avg_rank"].rank().corr(group["test_acc"].rank())
        evidence["groups"][label] = {"test_acc_spread": round(spread, 4),
                                     "rank_relative_change": round(rank_change, 4),
                                     "spearman_rank_vs_test_acc": None if math.isnan(rho)
                                     else round(float(rho), 3), "n": int(len(group))}
        if rank_change < rule.get("min_rank_change", 0.1):
            reasons.append(f"{label}: not tested, rank changed only {rank_change:.1%}")
            continue
        verdicts.append(PASS if spread <= max_spread else FAIL)
        reasons.append(f"{label}: test accuracy spread {spread:.3f} while rank changed "
                       f"{rank_change:.0%}")
    if not verdicts:
        return Verdict(INCONCLUSIVE, "no group where the rank changed: " + "; ".join(reasons),
                       evidence)
    return Verdict(_combine(verdicts), "; ".join(reasons), evidence)


def accuracy_vs_baseline(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Within each `group_by` (B, lr): the mean `metric` of every weight decay > 0 is at most
    `max_drop` below the mean of weight decay 0 (the baseline)."""
    done, counts = _finished(runs, rule.get("where"))
    metric, max_drop = rule.get("metric", "train_acc"), rule.get("max_drop", 0.03)
    evidence, drops = {"counts": counts, "groups": {}}, {}
    for label, group in _groups(done, rule.get("group_by", ["batch_size", "lr"])):
        means = group.groupby("weight_decay")[metric].mean()
        if 0.0 not in means.index or len(means) < 2:
            continue
        drop = float(means[0.0] - means.drop(0.0).min())
        drops[label] = drop
        evidence["groups"][label] = {f"{metric}_wd0": round(float(means[0.0]), 4),
                                     f"lowest_{metric}_wd>0": round(float(means.drop(0.0).min()),
                                                                    4),
                                     "drop": round(drop, 4)}
    if not drops:
        return Verdict(INCONCLUSIVE, "no group with runs at weight decay 0 and > 0", evidence)
    worst = max(drops.values())
    return Verdict(PASS if worst <= max_drop else FAIL,
                   f"largest {metric} drop against weight decay 0: {worst:.4f} (limit "
                   f"{max_drop}) over {len(drops)} (B, lr) groups; {counts['diverged']} diverged "
                   "runs reported", evidence)


def noise_plateau(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Per-epoch relative weight change: with wd > 0 its last-quarter mean stays above
    `min_plateau` and above `min_ratio` x its second-quarter mean (a plateau); with wd = 0 it
    keeps falling: last quarter below `max_ratio_no_wd` x second quarter."""
    done, counts = _finished(runs, None)
    ratios = {}
    for _, run in done.iterrows():
        curve = _curve(metrics, run.run_id, "avg_weight_change").dropna()
        if len(curve) < 8:
            continue
        n = len(curve)
        middle, last = curve.iloc[n // 4: n // 2].mean(), curve.iloc[3 * n // 4:].mean()
        ratios[run.run_id] = (float(run.weight_decay), float(last / middle), float(last))
    with_wd = [r for r in ratios.values() if r[0] > 0]
    without = [r for r in ratios.values() if r[0] == 0]
    evidence = {"counts": counts, "last_over_middle_with_wd": [round(r[1], 3) for r in with_wd],
                "last_quarter_change_with_wd": [float(f"{r[2]:.3g}") for r in with_wd],
                "last_over_middle_without_wd": [round(r[1], 3) for r in without]}
    if len(with_wd) < 2 or len(without) < 2:
        return Verdict(INCONCLUSIVE, "needs 2+ finished runs with and without weight decay",
                       evidence)
    plateau = all(r[1] >= rule.get("min_ratio", 0.7) and r[2] >= rule.get("min_plateau", 1e-3)
                  for r in with_wd)
    falling = all(r[1] <= rule.get("max_ratio_no_wd", 0.7) for r in without)
    return Verdict(PASS if plateau and falling else FAIL,
                   f"with wd the change {'plateaus' if plateau else 'does not plateau'}; "
                   f"without wd it {'keeps falling' if falling else 'does not keep falling'}",
                   evidence)


def same_product(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Runs with the same lr*wd (and B) reach similar ranks: the spread of mean final rank
    within a product is below `max_within` x the spread between products."""
    done, counts = _finished(runs, rule.get("where"))
    done = done.assign(product=(done.lr * done.weight_decay).round(12))
    evidence = {"counts": counts, "products": {}}
    within, means = [], []
    for product, group in done.groupby("product"):
        per_pair = group.groupby(["lr", "weight_decay"])["final_avg_rank"].mean()
        evidence["products"][f"{product:g}"] = {f"lr={lr:g} wd={wd:g}": round(float(v), 2)
                                                for (lr, wd), v in per_pair.items()}
        if len(per_pair) >= 2:
            within.append(float(per_pair.max() - per_pair.min()))
        means.append(float(per_pair.mean()))
    if not within or len(means) < 2:
        return Verdict(INCONCLUSIVE, "needs 2+ products with 2+ (lr, wd) pairs each", evidence)
    between = max(means) - min(means)
    evidence.update(within_spread=round(max(within), 3), between_spread=round(between, 3))
    ok = max(within) <= rule.get("max_within", 0.34) * between
    return Verdict(PASS if ok else FAIL, f"largest spread within a product {max(within):.2f} "
                   f"vs {between:.2f} between products", evidence)


def gradient_rank(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Lemma 3.1: every recorded mini-batch gradient rank is <= its bound B*m."""
    ranks = metrics[metrics.metric == "grad_rank"]
    bounds = metrics[metrics.metric == "grad_rank_bound"]
    if ranks.empty:
        return Verdict(INCONCLUSIVE, "no gradient ranks recorded", {})
    joined = ranks.merge(bounds, on=["run_id", "step", "layer"], suffixes=("", "_bound"))
    violations = joined[joined.value > joined.value_bound]
    at_bound = int((joined.value == joined.value_bound).sum())
    evidence = {"checked": int(len(joined)), "violations": int(len(violations)),
                "at_the_bound": at_bound, "max_rank": float(joined.value.max()),
                "max_bound": float(joined.value_bound.max())}
    return Verdict(PASS if violations.empty else FAIL,
                   f"{len(joined)} gradients checked, {len(violations)} above B*m, "
                   f"{at_bound} exactly at it", evidence)


RULES: dict[str, Callable[[dict, pd.DataFrame, pd.DataFrame], Verdict]] = {
    "monotone": monotone, "flat": flat, "early": early, "accuracy_floor": accuracy_floor,
    "accuracy_vs_baseline": accuracy_vs_baseline,
    "marginal_effect": marginal_effect, "noise_plateau": noise_plateau,
    "same_product": same_product, "gradient_rank": gradient_rank,
}


def evaluate(rule: dict, runs: pd.DataFrame, metrics: pd.DataFrame) -> Verdict:
    """Apply one rule; several rules (`all: [...]`) must all pass."""
    if "all" in rule:
        parts = [evaluate(r, runs, metrics) for r in rule["all"]]
        return Verdict(_combine([p.verdict for p in parts]), " | ".join(p.reason for p in parts),
                       {f"rule{i + 1}": p.evidence for i, p in enumerate(parts)})
    kind = rule.get("kind")
    if kind not in RULES:
        raise RankbiasError(f"unknown rule kind {kind!r}; choose from {', '.join(RULES)}")
    return RULES[kind](rule, runs, metrics)
