"""Verdict rules on synthetic metric tables with known answers: pass, fail, inconclusive."""

import itertools

import numpy as np
import pandas as pd
import pytest

from rankbias.claims import evaluate
from rankbias.utils import RankbiasError


def runs_table(rank_of, params, seeds=(0, 1, 2), noise=0.5, status="done", **extra):
    """One row per (param point, seed): final rank = rank_of(point) + seeded noise."""
    rng = np.random.default_rng(0)
    rows = []
    keys = list(params)
    for values in itertools.product(*params.values()):
        point = dict(zip(keys, values))
        for seed in seeds:
            rows.append({"run_id": f"{values}-{seed}", "status": status, "seed": seed,
                         "batch_size": 32, "lr": 0.5, "weight_decay": 0.01, **point,
                         "init_avg_rank": 64.0, "final_avg_rank": rank_of(point)
                         + rng.normal(0, noise), "train_acc": 1.0, "test_acc": 0.97, **extra})
    return pd.DataFrame(rows)


NO_METRICS = pd.DataFrame(columns=["run_id", "step", "epoch", "layer", "metric", "value"])
RISING_WITH_B = {"kind": "monotone", "param": "batch_size", "direction": "increasing",
                 "gap_sigma": 3, "where": "weight_decay > 0"}


def test_monotone_pass_fail_inconclusive():
    rising = runs_table(lambda p: 20 + p["batch_size"] / 4, {"batch_size": [8, 32, 128]})
    assert evaluate(RISING_WITH_B, rising, NO_METRICS).verdict == "pass"
    flat_noisy = runs_table(lambda p: 40.0, {"batch_size": [8, 32, 128]}, noise=3)
    assert evaluate(RISING_WITH_B, flat_noisy, NO_METRICS).verdict == "fail"
    one_seed = runs_table(lambda p: 20 + p["batch_size"], {"batch_size": [8, 32]}, seeds=(0,))
    assert evaluate(RISING_WITH_B, one_seed, NO_METRICS).verdict == "inconclusive"
    diverged = rising.assign(status="diverged")
    verdict = evaluate(RISING_WITH_B, diverged, NO_METRICS)
    assert verdict.verdict == "inconclusive"
    assert verdict.evidence["counts"]["diverged"] == 9  # counted, not dropped silently
    collapsed = rising.assign(train_acc=0.1)  # "done" at chance accuracy: not evidence
    verdict = evaluate(RISING_WITH_B, collapsed, NO_METRICS)
    assert verdict.verdict == "inconclusive" and verdict.evidence["counts"]["collapsed"] == 9


def test_monotone_gap_must_exceed_seed_spread():
    # strictly rising means, but a gap of ~2 against seed noise of ~3: not decided as a pass
    small_gap = runs_table(lambda p: 40 + {8: 0, 32: 1, 128: 2}[p["batch_size"]],
                           {"batch_size": [8, 32, 128]}, noise=0.0)
    small_gap.loc[small_gap.seed == 0, "final_avg_rank"] += 4  # spread, means keep order
    assert evaluate(RISING_WITH_B, small_gap, NO_METRICS).verdict == "fail"


def test_flat_rule():
    rule = {"kind": "flat", "where": "weight_decay == 0", "max_change": 0.05}
    stays = runs_table(lambda p: 63.0, {"weight_decay": [0.0]}, noise=0.1)
    assert evaluate(rule, stays, NO_METRICS).verdict == "pass"
    drops = runs_table(lambda p: 40.0, {"weight_decay": [0.0]}, noise=0.1)
    assert evaluate(rule, drops, NO_METRICS).verdict == "fail"
    assert evaluate(rule, stays.iloc[:1], NO_METRICS).verdict == "inconclusive"


def curves(run_ids, shape, metric="avg_rank", epochs=range(0, 31, 3)):
    return pd.DataFrame([{"run_id": r, "step": e * 10, "epoch": e, "layer": "",
                          "metric": metric, "value": shape(e)} for r in run_ids for e in epochs])


def test_early_rule():
    rule = {"kind": "early", "by_fraction": 0.5, "min_fraction": 0.8, "min_drop": 2}
    runs = runs_table(lambda p: 30.0, {"batch_size": [8]})
    fast = curves(runs.run_id, lambda e: 30 + 34 * np.exp(-e / 3))
    assert evaluate(rule, runs, fast).verdict == "pass"
    linear = curves(runs.run_id, lambda e: 64 - e)
    assert evaluate(rule, runs, linear).verdict == "fail"
    no_drop = curves(runs.run_id, lambda e: 64.0)
    assert evaluate(rule, runs, no_drop).verdict == "inconclusive"


def test_accuracy_vs_baseline_rule():
    rule = {"kind": "accuracy_vs_baseline", "max_drop": 0.05}
    runs = runs_table(lambda p: 30.0, {"weight_decay": [0.0, 0.02]})
    assert evaluate(rule, runs, NO_METRICS).verdict == "pass"
    hurt = runs.assign(train_acc=np.where(runs.weight_decay > 0, 0.8, 1.0))
    assert evaluate(rule, hurt, NO_METRICS).verdict == "fail"
    assert evaluate(rule, runs[runs.weight_decay > 0], NO_METRICS).verdict == "inconclusive"


def test_marginal_effect_rule():
    rule = {"kind": "marginal_effect", "param": "weight_decay", "within": "batch_size",
            "max_spread": 0.03, "min_rank_change": 0.1}
    params = {"weight_decay": [0.0, 0.01, 0.02], "batch_size": [16, 32]}
    runs = runs_table(lambda p: 60 - 1000 * p["weight_decay"], params)
    verdict = evaluate(rule, runs, NO_METRICS)
    assert verdict.verdict == "pass"
    assert set(verdict.evidence["groups"]) == {"batch_size=16", "batch_size=32"}
    worse = runs.assign(test_acc=0.97 - 5 * runs.weight_decay)  # 10 points lost at wd 0.02
    assert evaluate(rule, worse, NO_METRICS).verdict == "fail"
    no_rank_change = runs.assign(final_avg_rank=60.0)
    assert evaluate(rule, no_rank_change, NO_METRICS).verdict == "inconclusive"


def test_noise_plateau_rule():
    rule = {"kind": "noise_plateau", "min_ratio": 0.7, "min_plateau": 1e-3,
            "max_ratio_no_wd": 0.7}
    runs = runs_table(lambda p: 30.0, {"weight_decay": [0.0, 0.02]})
    epochs = range(1, 31)
    with_wd = runs[runs.weight_decay > 0].run_id
    without = runs[runs.weight_decay == 0].run_id
    plateau = curves(with_wd, lambda e: 0.05 + 0.5 / e, "avg_weight_change", epochs)
    falling = curves(without, lambda e: 1.0 / e, "avg_weight_change", epochs)
    assert evaluate(rule, runs, pd.concat([plateau, falling])).verdict == "pass"
    both_fall = curves(with_wd, lambda e: 1.0 / e, "avg_weight_change", epochs)
    assert evaluate(rule, runs, pd.concat([both_fall, falling])).verdict == "fail"
    assert evaluate(rule, runs, plateau).verdict == "inconclusive"


def test_same_product_rule():
    rule = {"kind": "same_product", "max_within": 0.34}
    pairs = {"lr": [0.25, 0.5, 0.25, 0.5], "weight_decay": [0.02, 0.01, 0.01, 0.005]}
    rows = [runs_table(lambda p, lr=lr, wd=wd: 70 - 5000 * lr * wd,
                       {"lr": [lr], "weight_decay": [wd]}, noise=0.2)
            for lr, wd in zip(*pairs.values())]
    runs = pd.concat(rows, ignore_index=True)
    assert evaluate(rule, runs, NO_METRICS).verdict == "pass"
    by_lr_only = runs.assign(final_avg_rank=70 - 40 * runs.lr)
    assert evaluate(rule, by_lr_only, NO_METRICS).verdict == "fail"
    assert evaluate(rule, runs[runs.lr == 0.25], NO_METRICS).verdict == "inconclusive"


def test_gradient_rank_rule():
    def rows(rank, bound):
        return pd.DataFrame([
            {"run_id": "a", "step": 1, "epoch": 1, "layer": "w", "metric": "grad_rank",
             "value": rank},
            {"run_id": "a", "step": 1, "epoch": 1, "layer": "w", "metric": "grad_rank_bound",
             "value": bound}])
    rule = {"kind": "gradient_rank"}
    assert evaluate(rule, pd.DataFrame(), rows(4, 4)).verdict == "pass"
    assert evaluate(rule, pd.DataFrame(), rows(5, 4)).verdict == "fail"
    assert evaluate(rule, pd.DataFrame(), NO_METRICS).verdict == "inconclusive"


def test_all_of_several_rules_and_unknown_kind():
    rising = runs_table(lambda p: 20 + p["batch_size"] / 4, {"batch_size": [8, 32, 128]})
    both = {"all": [RISING_WITH_B, {"kind": "flat", "max_change": 0.05}]}
    assert evaluate(both, rising, NO_METRICS).verdict == "fail"  # ranks do change
    with pytest.raises(RankbiasError, match="unknown rule kind"):
        evaluate({"kind": "vibes"}, rising, NO_METRICS)
