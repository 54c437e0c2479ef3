"""Verdict rules on synthetic tables with known answers: pass, fail, inconclusive."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from rankbias.claims.rules import evaluate
from rankbias.claims.runsets import label_runs
from rankbias.utils import RankbiasError

MLP = {"depth": 4, "width": 64, "batch_norm": True, "activation": "relu", "bias": True,
       "residual": False}


def runs_table(rank_of, params, seeds=(0, 1, 2), noise=0.5, status="done", model="mlp",
               model_args=None, **extra):
    """One row per (param point, seed): final rank = rank_of(point) + seeded noise."""
    rng = np.random.default_rng(0)
    rows = []
    for values in itertools.product(*params.values()):
        point = dict(zip(params, values))
        for seed in seeds:
            rows.append({"run_id": f"{model}{model_args}{values}-{seed}", "status": status,
                         "seed": seed, "model": model, "model_args": model_args or MLP,
                         "dataset": "digits", "dataset_args": {}, "schedule": "multistep",
                         "batch_size": 32, "lr": 0.5, "weight_decay": 0.01, **point,
                         "init_avg_rank": 64.0,
                         "final_avg_rank": rank_of(point) + rng.normal(0, noise),
                         "train_acc": 1.0, "test_acc": 0.97, **extra})
    return pd.DataFrame(rows)


NO_METRICS = pd.DataFrame(columns=["run_id", "step", "epoch", "layer", "metric", "value"])
RISING_WITH_B = {"kind": "monotone", "param": "batch_size", "direction": "increasing",
                 "gap_sigma": 3, "min_step_se": 2, "where": "weight_decay > 0"}


def test_runs_are_labelled_by_architecture_and_data():
    runs = label_runs(pd.concat([
        runs_table(lambda p: 1, {"seed": [0]}, seeds=(0,)),
        runs_table(lambda p: 1, {"seed": [0]}, seeds=(0,),
                   model_args={**MLP, "batch_norm": False}, dataset_args={"subset": 300})]))
    assert list(runs.architecture) == ["mlp(depth=4, width=64)",
                                       "mlp(depth=4, width=64, batch_norm=False)"]
    assert list(runs.data) == ["digits", "digits(subset=300)"]


def test_monotone_pass_fail_inconclusive():
    rising = runs_table(lambda p: 20 + p["batch_size"] / 4, {"batch_size": [8, 32, 128]})
    verdict = evaluate(RISING_WITH_B, rising, NO_METRICS)
    assert verdict.verdict == "pass"
    group = verdict.evidence["groups"]["digits, mlp(depth=4, width=64)"]
    assert group["margin"] > 1 and [s["to"] for s in group["steps"]] == [32, 128]
    flat_noisy = runs_table(lambda p: 40.0, {"batch_size": [8, 32, 128]}, noise=3)
    assert evaluate(RISING_WITH_B, flat_noisy, NO_METRICS).verdict == "fail"
    one_seed = runs_table(lambda p: 20 + p["batch_size"], {"batch_size": [8, 32]}, seeds=(0,))
    assert evaluate(RISING_WITH_B, one_seed, NO_METRICS).verdict == "inconclusive"
    diverged = rising.assign(status="diverged")
    verdict = evaluate(RISING_WITH_B, diverged, NO_METRICS)
    assert verdict.verdict == "inconclusive"
    assert verdict.evidence["counts"]["diverged"] == 9  # counted, not dropped silently


def test_a_grid_value_without_finished_runs_is_named():
    rising = runs_table(lambda p: 20 + p["batch_size"] / 4, {"batch_size": [8, 32, 128]})
    rising.loc[rising.batch_size == 8, "train_acc"] = 0.1  # collapsed: "done" at chance
    verdict = evaluate(RISING_WITH_B, rising, NO_METRICS)
    assert verdict.verdict == "inconclusive"
    assert "batch_size=8: 0 of 3 runs usable (3 collapsed)" in verdict.reason


def test_monotone_steps_must_stand_out_of_the_seed_spread():
    # strictly rising means, but steps of 1 against seed noise of ~3: not a pass
    small_steps = runs_table(lambda p: 40 + {8: 0, 32: 1, 128: 2}[p["batch_size"]],
                             {"batch_size": [8, 32, 128]}, noise=0.0)
    small_steps.loc[small_steps.seed == 0, "final_avg_rank"] += 4  # spread, means keep order
    verdict = evaluate(RISING_WITH_B, small_steps, NO_METRICS)
    # hand check: seeds 44, 40, 40 -> sd 2.31, se of a step sqrt(2 * 2.31^2 / 3) = 1.89
    assert verdict.verdict == "fail" and "smallest step 0.5 SE" in verdict.reason


def test_monotone_groups_by_architecture():
    """Two architectures each rise with B; pooled, their offset would be the 'seed spread'."""
    low = runs_table(lambda p: 10 + p["batch_size"] / 8, {"batch_size": [8, 32, 128]})
    high = runs_table(lambda p: 40 + p["batch_size"] / 8, {"batch_size": [8, 32, 128]},
                      model="convnet", model_args={"width": 8})
    verdict = evaluate(RISING_WITH_B, pd.concat([low, high]), NO_METRICS)
    assert verdict.verdict == "pass" and len(verdict.evidence["groups"]) == 2
    pooled = evaluate({**RISING_WITH_B, "group_by": None}, pd.concat([low, high]), NO_METRICS)
    assert pooled.verdict == "fail"  # the spread between models swamps the trend


def test_flat_with_control():
    rule = {"kind": "flat_with_control", "max_change": 0.05, "min_control_drop": 0.15,
            "min_cells": 2}
    cells = {"batch_size": [8, 32], "lr": [0.5]}
    stays = runs_table(lambda p: 63.0, {**cells, "weight_decay": [0.0]}, noise=0.1)
    control = runs_table(lambda p: 40.0, {**cells, "weight_decay": [0.02]}, noise=0.1)
    verdict = evaluate(rule, pd.concat([stays, control]), NO_METRICS)
    assert verdict.verdict == "pass" and len(verdict.evidence["cells"]) == 2
    drops = runs_table(lambda p: 55.0, {**cells, "weight_decay": [0.0]}, noise=0.1)
    assert evaluate(rule, pd.concat([drops, control]), NO_METRICS).verdict == "fail"
    # controls that do not move: the experiment could not have shown anything
    still = runs_table(lambda p: 62.0, {**cells, "weight_decay": [0.02]}, noise=0.1)
    verdict = evaluate(rule, pd.concat([stays, still]), NO_METRICS)
    assert verdict.verdict == "inconclusive" and not any(
        c["informative"] for c in verdict.evidence["cells"].values())
    # one cell informative, one not: too few to decide
    mixed = pd.concat([stays, control[control.batch_size == 8], still[still.batch_size == 32]])
    assert evaluate(rule, mixed, NO_METRICS).verdict == "inconclusive"
    # a wd = 0 run that moves fails the claim even where its control did not move
    assert evaluate(rule, pd.concat([drops, still]), NO_METRICS).verdict == "fail"
    assert evaluate(rule, stays, NO_METRICS).verdict == "inconclusive"  # no control


def curves(run_ids, shape, metric="avg_rank", epochs=range(0, 31, 3)):
    return pd.DataFrame([{"run_id": r, "step": e * 10, "epoch": e, "layer": "",
                          "metric": metric, "value": shape(e)} for r in run_ids for e in epochs])


def test_early_rule_per_schedule():
    rule = {"kind": "early", "by_fraction": 0.5, "min_fraction": 0.8, "min_drop": 2,
            "group_by": ["data", "architecture", "schedule"]}
    runs = pd.concat([runs_table(lambda p: 30, {"batch_size": [8]}, schedule=s)
                      .assign(run_id=lambda t, s=s: t.run_id + s)
                      for s in ("multistep", "constant")])
    fast = curves(runs.run_id, lambda e: 30 + 34 * math.exp(-e / 3))  # done by epoch 10
    verdict = evaluate(rule, runs, fast)
    assert verdict.verdict == "pass" and len(verdict.evidence["groups"]) == 2
    steady = curves(runs.run_id[runs.schedule == "constant"], lambda e: 64 - e)  # linear
    mixed = pd.concat([curves(runs.run_id[runs.schedule == "multistep"],
                              lambda e: 30 + 34 * math.exp(-e / 3)), steady])
    verdict = evaluate(rule, runs, mixed)
    assert verdict.verdict == "fail" and "constant: smallest share by 50% of training 0.50" \
        in verdict.reason
    assert evaluate(rule, runs, curves(runs.run_id, lambda e: 64.0)).verdict == "inconclusive"


def test_accuracy_vs_baseline_rule():
    rule = {"kind": "accuracy_vs_baseline", "max_drop": 0.05, "metric": "train_acc"}
    base = runs_table(lambda p: 60, {"weight_decay": [0.0]}, train_acc=1.0)
    ok = runs_table(lambda p: 40, {"weight_decay": [0.02]}, train_acc=0.98)
    bad = runs_table(lambda p: 40, {"weight_decay": [0.02]}, train_acc=0.9)
    assert evaluate(rule, pd.concat([base, ok]), NO_METRICS).verdict == "pass"
    assert evaluate(rule, pd.concat([base, bad]), NO_METRICS).verdict == "fail"
    assert evaluate(rule, ok, NO_METRICS).verdict == "inconclusive"


def test_equivalence_uses_welch_intervals():
    rule = {"kind": "equivalence", "param": "weight_decay", "within": "batch_size",
            "margin": 0.03, "level": 0.95, "min_rank_change": 0.1}
    seeds = tuple(range(6))
    base = runs_table(lambda p: 63, {"weight_decay": [0.0]}, seeds=seeds)
    lower = runs_table(lambda p: 40, {"weight_decay": [0.02]}, seeds=seeds)
    accuracies = [0.90, 0.92, 0.94, 0.91, 0.93, 0.92]
    base["test_acc"] = accuracies
    lower["test_acc"] = [a - 0.005 for a in accuracies]
    verdict = evaluate(rule, pd.concat([base, lower]), NO_METRICS)
    comparison = verdict.evidence["groups"]["digits, mlp(depth=4, width=64), 32"][
        "comparisons"][0]
    # hand check: diff -0.005, both sd 0.01414, se = 0.01414 * sqrt(2/6), t(10) = 2.228
    half = 2.2281388519649385 * 0.014142135623730963 * math.sqrt(2 / 6)
    assert comparison["ci_low"] == pytest.approx(-0.005 - half, abs=1e-4)
    assert comparison["ci_high"] == pytest.approx(-0.005 + half, abs=1e-4)
    assert verdict.verdict == "pass"
    worse = lower.assign(test_acc=lambda t: t.test_acc - 0.03)
    assert evaluate(rule, pd.concat([base, worse]), NO_METRICS).verdict == "fail"
    same_rank = lower.assign(final_avg_rank=62.0)  # rank hardly changed: nothing to test
    assert evaluate(rule, pd.concat([base, same_rank]), NO_METRICS).verdict == "inconclusive"


def test_noise_plateau_rule():
    rule = {"kind": "noise_plateau", "early_window": [0.05, 0.15], "late_window": [0.9, 1.0],
            "min_ratio_wd": 0.75, "max_ratio_no_wd": 0.5, "min_plateau": 1e-3}
    runs = pd.concat([runs_table(lambda p: 40, {"weight_decay": [0.02]}),
                      runs_table(lambda p: 63, {"weight_decay": [0.0]})])
    epochs = range(1, 61)
    wd_ids, no_ids = runs.run_id[runs.weight_decay > 0], runs.run_id[runs.weight_decay == 0]
    plateau = curves(wd_ids, lambda e: 0.05, "avg_weight_change", epochs)
    falling = curves(no_ids, lambda e: 0.5 / e, "avg_weight_change", epochs)
    assert evaluate(rule, runs, pd.concat([plateau, falling])).verdict == "pass"
    slow = curves(no_ids, lambda e: 0.5 / e ** 0.1, "avg_weight_change", epochs)
    assert evaluate(rule, runs, pd.concat([plateau, slow])).verdict == "fail"
    assert evaluate(rule, runs, plateau).verdict == "inconclusive"


def test_scale_rule():
    rule = {"kind": "scale", "min_spearman": 0.9, "max_within": 0.25}
    settings = [(8, 0.25, 0.02), (8, 0.5, 0.01), (16, 0.25, 0.02), (16, 0.5, 0.01),
                (32, 0.25, 0.02), (32, 0.5, 0.01), (32, 0.5, 0.005)]

    def table(rank_of):
        parts = []
        for b, lr, wd in settings:
            point = {"batch_size": [b], "lr": [lr], "weight_decay": [wd]}
            parts.append(runs_table(lambda p: rank_of(p["batch_size"], p["lr"],
                                                      p["weight_decay"]), point, noise=0.1))
        return pd.concat(parts)

    # a function of the scale alone: log2(B / (lr wd))
    verdict = evaluate(rule, table(lambda b, lr, wd: 5 * math.log2(b / (lr * wd))), NO_METRICS)
    assert verdict.verdict == "pass"
    # ordered by the scale, but B matters beyond it: one scale, ranks far apart
    verdict = evaluate(rule, table(lambda b, lr, wd: 5 * math.log2(1 / (lr * wd)) - b),
                       NO_METRICS)
    assert verdict.verdict == "fail"


def test_gradient_rank_rule_counts_only_bounds_below_the_matrix_size():
    rows = []  # a 64x64 linear layer at B = 4 (informative), a 4-column conv at B*m = 64
    for step in range(12):
        rows += [("r", step, 1, layer, metric, value) for layer, rank, bound, cap in
                 (("fc", 4.0, 4.0, 64.0), ("conv", 4.0, 64.0, 4.0)) for metric, value in
                 (("grad_rank", rank), ("grad_rank_bound", bound), ("grad_rank_cap", cap))]
    metrics = pd.DataFrame(rows, columns=["run_id", "step", "epoch", "layer", "metric", "value"])
    rule = {"kind": "gradient_rank", "min_checks": 10}
    verdict = evaluate(rule, pd.DataFrame(), metrics)
    assert verdict.verdict == "pass"
    assert verdict.evidence["informative_checks"] == 12
    assert verdict.evidence["capped_checks"] == 12
    assert verdict.evidence["informative_at_the_bound"] == 12
    above = metrics.copy()
    above.loc[(above.layer == "fc") & (above.metric == "grad_rank") & (above.step == 3),
              "value"] = 5.0
    assert evaluate(rule, pd.DataFrame(), above).verdict == "fail"
    only_capped = metrics[metrics.layer == "conv"]
    assert evaluate(rule, pd.DataFrame(), only_capped).verdict == "inconclusive"


def test_all_of_several_rules_and_unknown_kind():
    rising = runs_table(lambda p: 20 + p["batch_size"] / 4, {"batch_size": [8, 32, 128]})
    falling = {**RISING_WITH_B, "direction": "decreasing"}
    assert evaluate({"all": [RISING_WITH_B, RISING_WITH_B]}, rising,
                    NO_METRICS).verdict == "pass"
    assert evaluate({"all": [RISING_WITH_B, falling]}, rising, NO_METRICS).verdict == "fail"
    with pytest.raises(RankbiasError, match="unknown rule kind"):
        evaluate({"kind": "magic"}, rising, NO_METRICS)
