"""Verdict rules on synthetic tables with known answers: pass, fail, inconclusive."""

import itertools
import json
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


def curves(run_ids, shape, metric="avg_rank", epochs=range(0, 31, 3), steps_per_epoch=10):
    return pd.DataFrame([{"run_id": r, "step": e * steps_per_epoch, "epoch": e, "layer": "",
                          "metric": metric, "value": shape(e, i)}
                         for i, r in enumerate(run_ids) for e in epochs])


def test_the_gate_names_a_low_rank_end_that_had_no_decay_budget():
    """A trend whose low-rank end (here the smallest B) never reached D >= log(2/eps) is
    inconclusive, whatever its ranks do: weight decay had no time to act. The validity of
    every setting is in the evidence, as strict JSON."""
    rising = runs_table(lambda p: 20 + p["batch_size"] / 4, {"batch_size": [8, 32, 128]},
                        epochs=100)
    verdict = evaluate(RISING_WITH_B, rising, NO_METRICS)
    assert verdict.verdict == "pass"
    validity = {v["batch_size"]: v for v in verdict.evidence["validity"]}
    # hand check, B = 8: ceil(1437 / 8) = 180 steps an epoch; multistep (the authors' 60 /
    # 100 / 200, x0.2): 60 epochs at 0.5, 40 at 0.1; D = 0.01 * 180 * (60 * 0.5 + 40 * 0.1)
    assert validity[8]["decay_budget"] == pytest.approx(0.01 * 180 * 34)
    assert validity[8]["steps"] == 18000 and validity[8]["informative"] is True
    assert validity[8]["threshold"] == pytest.approx(math.log(2000), abs=1e-4)
    assert validity[8]["k_star"] == pytest.approx(math.log(2000) / 0.005, abs=0.01)
    json.dumps(verdict.evidence, allow_nan=False)
    short = rising.assign(epochs=1)  # D = 0.9 at B = 8: below log(2000) = 7.6
    verdict = evaluate(RISING_WITH_B, short, NO_METRICS)
    assert verdict.verdict == "inconclusive"
    assert "low-rank end could not show the effect" in verdict.reason
    assert "B=8: D=0.90 vs 7.6" in verdict.reason
    # the experiment may state another threshold, with its reason, never without one
    lower = {**RISING_WITH_B, "min_budget": 0.5, "min_budget_reason": "a test"}
    assert evaluate(lower, short, NO_METRICS).verdict == "pass"
    with pytest.raises(RankbiasError, match="needs its reason"):
        evaluate({**RISING_WITH_B, "min_budget": 0.5}, short, NO_METRICS)


def test_early_then_flat_in_units_of_k_star():
    """Constant lr 0.5, wd 0.02, B = 32 (45 steps an epoch, k* = 760 steps): 102 epochs are
    4590 >= 6 k* steps. A rank that settles by 2 k* passes; one that falls steadily to the
    end fails; runs shorter than 6 k* are inconclusive."""
    rule = {"kind": "early", "where": "weight_decay > 0"}
    runs = runs_table(lambda p: 30, {"batch_size": [32]}, schedule="constant", lr=0.5,
                      weight_decay=0.02, epochs=102, seeds=(0, 1, 2, 3))
    epochs = range(0, 103, 2)
    def noise(e, i):  # seed-to-seed noise of a tracked rank: +-0.2
        return 0.2 * ((e // 2 + i) % 3 - 1)

    settled = curves(runs.run_id, lambda e, i: 30 + 34 * math.exp(-e / 5) + noise(e, i),
                     epochs=epochs, steps_per_epoch=45)
    verdict = evaluate(rule, runs, settled)
    assert verdict.verdict == "pass"
    group = next(iter(verdict.evidence["groups"].values()))
    assert group["share_by_flat_after_k"] > 0.99
    steady = curves(runs.run_id, lambda e, i: 64 - 0.3 * e + noise(e, i), epochs=epochs,
                    steps_per_epoch=45)
    verdict = evaluate(rule, runs, steady)
    assert verdict.verdict == "fail" and "still falling" in verdict.reason
    assert evaluate(rule, runs.assign(epochs=60), settled).verdict == "inconclusive"


def test_accuracy_vs_baseline_is_a_paired_three_way_test():
    rule = {"kind": "accuracy_vs_baseline", "margin": 0.05}
    seeds = tuple(range(6))
    jitter = [0.004, -0.003, 0.002, -0.001, 0.0, -0.002]
    base = runs_table(lambda p: 60, {"weight_decay": [0.0]}, seeds=seeds)
    base["train_acc"] = [0.99 + j for j in jitter]

    def decayed(loss, rank=40.0):
        runs = runs_table(lambda p: rank, {"weight_decay": [0.02]}, seeds=seeds, noise=0.0)
        return runs.assign(train_acc=[0.99 - loss + j for j in jitter])

    verdict = evaluate(rule, pd.concat([base, decayed(0.01)]), NO_METRICS)
    assert verdict.verdict == "pass"  # paired: the seed-to-seed jitter cancels
    (cell,) = verdict.evidence["cells"].values()
    assert cell["loss"] == pytest.approx(0.01) and cell["ci"] == [0.01, 0.01]
    assert evaluate(rule, pd.concat([base, decayed(0.1)]), NO_METRICS).verdict == "fail"
    noisy = decayed(0.04).assign(train_acc=lambda t: t.train_acc + [0.03, -0.03] * 3)
    assert evaluate(rule, pd.concat([base, noisy]), NO_METRICS).verdict == "inconclusive"
    # collapsed runs count as harm; a setting whose rank did not move is not a test
    collapsed = decayed(0.0).assign(train_acc=0.1)
    assert evaluate(rule, pd.concat([base, collapsed]), NO_METRICS).verdict == "fail"
    unmoved = evaluate(rule, pd.concat([base, decayed(0.1, rank=59)]), NO_METRICS)
    assert unmoved.verdict == "inconclusive" and "not counted" in unmoved.reason
    # still rising at the end: slower to fit, not shown harmed
    rising = curves(decayed(0.1).run_id, lambda e, i: 0.5 + e / 100, "train_acc",
                    range(0, 101, 10))
    assert evaluate(rule, pd.concat([base, decayed(0.1)]), rising).verdict == "inconclusive"


def test_claim_9_compares_trained_networks_and_says_when_runs_collapsed():
    """Full scale once had B = 8 runs at chance accuracy (train 0.195): their test accuracy
    0.73 below B = 32's came out as 'more seeds needed'. A comparison across B with a
    collapsed run is inconclusive and says so; the truncation test leaves collapsed runs
    out and counts them."""
    from rankbias.claims.generalization import _across_batch_size, _at_fixed_weights

    rule = {"margin": 0.03, "level": 0.95, "min_rank_change": 0.1}
    seeds = tuple(range(8))
    jitter = [0.002, -0.001, 0.0, 0.001, -0.002, 0.001, 0.0, -0.001]

    def runs(train_acc_at_8):
        table = runs_table(lambda p: 10 if p["batch_size"] == 8 else 30,
                           {"batch_size": [8, 32]}, seeds=seeds, noise=0.0,
                           gate_informative=True, gate_decay_budget=30.0, gate_threshold=7.6)
        table["test_acc"] = 0.95 + np.array(jitter * 2)
        table["train_acc"] = np.concatenate([train_acc_at_8, np.ones(8)])  # B = 8 first
        table["full_acc"] = table.test_acc
        table["truncated_acc"] = table.test_acc - 0.001
        return table

    trained = runs(np.full(8, 0.99))
    (across,) = _across_batch_size(trained, rule)
    assert across["verdict"] == "pass" and across["mean"] == pytest.approx(0.0)
    fell = runs(np.array([0.1, 0.1, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99]))
    fell.loc[fell.train_acc <= 0.15, "test_acc"] = 0.1
    (across,) = _across_batch_size(fell, rule)
    assert across["verdict"] == "inconclusive" and across["collapsed"] == {8: 2, 32: 0}
    assert "2 of 8 at B=8" in across["reason"] and "more seeds" not in across["reason"]
    truncated = {e["what"]: e for e in _at_fixed_weights(fell, rule)}
    at_8 = truncated["truncated to the eps-rank (B=8, lr=0.5, wd=0.01)"]
    assert at_8["verdict"] == "pass" and at_8["n"] == 6 and at_8["collapsed"] == 2
    assert "2 of 8 runs collapsed" in at_8["reason"]
    all_fell = _at_fixed_weights(runs(np.full(8, 0.1)), rule)[0]
    assert all_fell["verdict"] == "inconclusive" and "0 trained runs" in all_fell["reason"]


def test_three_way_equivalence_verdicts():
    from rankbias.claims.accuracy import three_way

    assert three_way(-0.01, 0.02, 0.03) == "pass"
    assert three_way(0.031, 0.05, 0.03) == "fail" and three_way(-0.2, -0.04, 0.03) == "fail"
    assert three_way(-0.05, -0.01, 0.03) == "inconclusive"  # the old rule called this a fail


def test_noise_plateau_rule():
    rule = {"kind": "noise_plateau"}
    runs = pd.concat([runs_table(lambda p: 40, {"weight_decay": [0.02]}, schedule="constant",
                                 epochs=60),
                      runs_table(lambda p: 63, {"weight_decay": [0.0]}, schedule="constant",
                                 epochs=60)])
    epochs = range(1, 61)
    wd_ids, no_ids = runs.run_id[runs.weight_decay > 0], runs.run_id[runs.weight_decay == 0]
    plateau = curves(wd_ids, lambda e, i: 0.05 * (1 + 0.01 * i), "avg_weight_change", epochs)
    falling = curves(no_ids, lambda e, i: 0.5 * (1 + 0.01 * i) / e, "avg_weight_change",
                     epochs)
    verdict = evaluate(rule, runs, pd.concat([plateau, falling]))
    assert verdict.verdict == "pass", verdict.reason
    flat_too = curves(no_ids, lambda e, i: 0.05 * (1 + 0.01 * i), "avg_weight_change", epochs)
    assert evaluate(rule, runs, pd.concat([plateau, flat_too])).verdict == "fail"
    assert evaluate(rule, runs, plateau).verdict == "inconclusive"
    short = runs.assign(epochs=1)  # the weight-decay runs below their decay budget
    assert evaluate(rule, short, pd.concat([plateau, falling])).verdict == "inconclusive"


def test_scale_rule_separates_its_two_hypotheses():
    rule = {"kind": "scale", "min_spearman": 0.9, "se_factor": 3}
    settings = [(b, lr, wd) for b in (8, 16, 32)
                for lr, wd in ((0.25, 0.02), (0.5, 0.01), (0.25, 0.04), (0.5, 0.02))]

    def table(rank_of):
        parts = []
        for b, lr, wd in settings:
            point = {"batch_size": [b], "lr": [lr], "weight_decay": [wd]}
            parts.append(runs_table(lambda p: rank_of(p["batch_size"], p["lr"],
                                                      p["weight_decay"]), point, noise=0.5))
        return pd.concat(parts)

    # a function of the scale alone: log2(B / (lr wd))
    verdict = evaluate(rule, table(lambda b, lr, wd: 5 * math.log2(b / (lr * wd))), NO_METRICS)
    assert verdict.verdict == "pass", verdict.reason
    group = next(iter(verdict.evidence["groups"].values()))
    assert group["lr_vs_wd"]["in_se"] <= 3 and group["b_vs_lr_wd"]["in_se"] <= 3
    # ordered by the scale, but lr matters beyond lr*wd: hypothesis (2) fails
    verdict = evaluate(rule, table(lambda b, lr, wd: 5 * math.log2(b / (lr * wd)) - 20 * lr),
                       NO_METRICS)
    assert verdict.verdict == "fail" and verdict.evidence["groups"][
        "digits, mlp(depth=4, width=64)"]["lr_vs_wd"]["in_se"] > 3
    # integer ranks, every seed alike: a gap has no standard error to be counted in
    exact = table(lambda b, lr, wd: round(5 * math.log2(b / (lr * wd))) + 5 * (lr == 0.5))
    exact["final_avg_rank"] = exact.final_avg_rank.round()
    verdict = evaluate(rule, exact, NO_METRICS)
    assert verdict.verdict == "fail" and "inf" not in verdict.reason
    assert "ranks, with no seed spread on either side (SE 0)" in verdict.reason


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
    # constant lr, 200 epochs: D >= 12 at every B, so either end may be the low-rank one
    rising = runs_table(lambda p: 20 + p["batch_size"] / 4, {"batch_size": [8, 32, 128]},
                        schedule="constant", epochs=200)
    falling = {**RISING_WITH_B, "direction": "decreasing"}
    assert evaluate({"all": [RISING_WITH_B, RISING_WITH_B]}, rising,
                    NO_METRICS).verdict == "pass"
    assert evaluate({"all": [RISING_WITH_B, falling]}, rising, NO_METRICS).verdict == "fail"
    with pytest.raises(RankbiasError, match="unknown rule kind"):
        evaluate({"kind": "magic"}, rising, NO_METRICS)


def test_controls_are_reported_beside_the_verdict_not_combined():
    rising = runs_table(lambda p: 20 + p["batch_size"] / 4, {"batch_size": [8, 32, 128]},
                        schedule="constant", epochs=200)
    falling = {**RISING_WITH_B, "direction": "decreasing"}
    verdict = evaluate({"all": [RISING_WITH_B], "controls": [falling]}, rising, NO_METRICS)
    assert verdict.verdict == "pass"  # the control fails, and says so, but decides nothing
    assert verdict.evidence["control1"]["verdict"] == "fail"
    assert "control (fail):" in verdict.reason
    with pytest.raises(RankbiasError, match="controls"):
        from rankbias.claims.verdict import check_rule

        check_rule({"all": [RISING_WITH_B], "other": []})


def test_a_fail_is_called_a_finding_only_past_the_decay_budget():
    from rankbias.claims.writeup import findings_markdown, kind_of

    past = {"informative": True, "decay_budget": 20.0}
    short = {"informative": False, "decay_budget": 2.0}
    claims = [{"claim": 4, "id": "b", "verdict": "fail", "reason": "r4",
               "evidence": {"validity": [past, short]}},
              {"claim": 2, "id": "identity", "verdict": "fail", "reason": "r2",
               "evidence": {}},
              {"claim": 5, "id": "lr", "verdict": "pass", "reason": "r5", "evidence": {}},
              {"claim": 7, "id": "early", "verdict": "inconclusive", "reason": "r7",
               "evidence": {"validity": [short]}}]
    assert [kind_of(c) for c in claims] == ["finding", "fail", "pass", "inconclusive"]
    text = findings_markdown({"scale": "quick", "claims": claims, "wall_s": 1.0,
                              "sweep": {"total": 3}})
    assert "Fail, a finding" in text and "4 (b): r4" in text
    assert "a defect to look into" in text and "2 (identity): r2" in text
    assert "- Pass: 5 (lr)." in text and "7 (early): r7" in text
    assert "(3 runs, 1 s;" in text
    resumed = findings_markdown({"scale": "full", "claims": claims, "wall_s": 90.0,
                                 "sweep": {"total": 3, "skipped": 2}})
    assert "2 of them trained by earlier calls into the same folder; the last call 90 s" in resumed
