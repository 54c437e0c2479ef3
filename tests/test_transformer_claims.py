"""Claims 16 and 17 (issue 25): their experiment files load and print their decay budgets,
the reported rules (per matrix role, the timeline) on tables with known answers, and the
transformer figures drawn from real runs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rankbias.claims.pipeline import list_experiments
from rankbias.claims.rules import evaluate
from rankbias.claims.verdict import check_rule
from rankbias.cli.main import main
from rankbias.report.roles import final_role_ranks, role_ranks
from rankbias.runs.store import Store
from rankbias.training.config import RunConfig
from rankbias.training.ensemble import train_ensemble
from rankbias.utils import RankbiasError

ARCH = {"depth": 1, "width": 32, "heads": 4, "mlp_ratio": 4.0, "causal": True, "vocab": None}
LAYERS = {f"attention_{p}": f"blocks.0.attn.{p}_proj.weight" for p in "qkvo"} | {
    "mlp_in": "blocks.0.mlp.fc_in.weight", "mlp_out": "blocks.0.mlp.fc_out.weight"}


def test_the_claim_files_load_and_print_their_budgets(capsys, tmp_path):
    for scale in ("quick", "full", "paper"):
        chosen = [e for e in list_experiments(scale) if e.claim in (16, 17)]
        assert [e.section for e in chosen] == ["beyond", "beyond"]
        assert all(c.model == "transformer" for e in chosen for c in e.configs)
    assert main(["reproduce", "16", "17", "--scale", "quick", "--dry-run",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "16 transformer_sgd" in out and "17 transformer_adamw" in out
    # claim 16: 6000 equal steps, lr 0.05 and wd 0.05: D = 8.4 at every B; claim 17: AdamW
    # lr 3e-3 over 3006 steps: D = 9.02 at wd 1 and 18.04 at wd 2
    assert out.count("8.4") >= 3 and "9.02" in out and "18.04" in out


def role_table(final_by_role: dict, batch_sizes=(16, 32, 64), seeds=(0, 1, 2)):
    """Transformer runs (constant lr 0.05, wd 0.05, long enough to pass the gate) and the
    per-layer rows of their last tracking point: role r's rank = final_by_role[r](B) plus
    a seeded +-0.3, and a head.weight row (the classifier: no role)."""
    runs, rows = [], []
    for b in batch_sizes:
        for seed in seeds:
            run_id = f"B{b}-{seed}"
            runs.append({"run_id": run_id, "status": "done", "seed": seed,
                         "model": "transformer", "model_args": ARCH,
                         "dataset": "modular-addition", "dataset_args": {"p": 23},
                         "batch_size": b, "lr": 0.05, "weight_decay": 0.05,
                         "schedule": "constant", "epochs": 3000, "optimizer": "sgd",
                         "tolerances": [0.001], "train_acc": 1.0, "test_acc": 1.0,
                         "init_avg_rank": 32.0, "final_avg_rank": 10.0})
            for role, layer in LAYERS.items():
                for step, value in ((0, 32.0), (900, final_by_role[role](b) + 0.3 * (seed - 1))):
                    rows.append({"run_id": run_id, "step": step, "epoch": step // 9,
                                 "layer": layer, "metric": "rank@0.001", "value": value})
            rows.append({"run_id": run_id, "step": 900, "epoch": 100, "layer": "head.weight",
                         "metric": "rank@0.001", "value": 23.0})
    return pd.DataFrame(runs), pd.DataFrame(rows)


def test_role_trend_judges_each_role_and_is_only_reported():
    rising = {role: (lambda b: 4 + b / 8) for role in LAYERS}
    rising["attention_q"] = lambda b: 6.0  # the query matrices do not move with B
    runs, metrics = role_table(rising)
    finals = final_role_ranks(metrics, 1e-3)
    assert list(finals.columns) == list(LAYERS)  # the classifier is no role
    assert finals.loc["B64-2", "mlp_in"] == pytest.approx(4 + 8 + 0.3)
    rule = {"kind": "role_trend", "param": "batch_size", "direction": "increasing"}
    verdict = evaluate(rule, runs, metrics)
    roles = verdict.evidence["roles"]
    assert roles["attention_q"]["verdict"] == "fail" and roles["mlp_in"]["verdict"] == "pass"
    group = next(iter(roles["mlp_in"]["groups"].values()))
    assert [v["mean"] for v in group["values"]] == pytest.approx([6.0, 8.0, 12.0])
    # in a claim's reports: shown beside the verdict, never combined into it
    main_rule = {"kind": "monotone", "param": "batch_size", "direction": "decreasing",
                 "metric": "final_avg_rank", "min_seeds": 2}
    flat = runs.assign(final_avg_rank=10.0 - runs.batch_size / 8)  # falling: the rule passes
    combined = evaluate({"all": [main_rule], "reports": [rule]}, flat, metrics)
    assert combined.verdict == "pass" and "attention_q fail" in combined.reason
    assert combined.evidence["report1"]["kind"] == "role_trend"
    json.dumps(combined.evidence, allow_nan=False)
    check_rule({"all": [main_rule], "reports": [rule]})
    with pytest.raises(RankbiasError, match="optionally `controls` and `reports`"):
        check_rule({"all": [main_rule], "notes": [rule]})


def test_timeline_finds_fit_generalization_and_the_half_fall():
    """Run i of a setting: train accuracy jumps to 1 at step 100, test accuracy at step
    400 + 100 i (grokking), the rank falls from 30 to 10 linearly over steps 200-600: it has
    made half its fall (20) at step 400."""
    runs, _ = role_table({r: (lambda b: 5.0) for r in LAYERS}, batch_sizes=(16,))
    steps = range(0, 1001, 50)
    rows = []
    for i, run_id in enumerate(runs.run_id):
        for s in steps:
            values = {"train_acc": 1.0 if s >= 100 else 0.1,
                      "test_acc": 1.0 if s >= 400 + 100 * i else 0.1,
                      "avg_rank": 30 - 20 * min(max(s - 200, 0), 400) / 400,
                      "avg_qk_rank": 8.0}  # never falls: no half-fall step
            rows += [{"run_id": run_id, "step": s, "epoch": s // 10, "layer": "",
                      "metric": m, "value": v} for m, v in values.items()]
    verdict = evaluate({"kind": "timeline", "vary": "batch_size",
                        "ranks": ["avg_rank", "avg_qk_rank"]}, runs, pd.DataFrame(rows))
    assert verdict.verdict == "inconclusive" and "no verdict" in verdict.reason
    entry = next(iter(verdict.evidence["groups"].values()))["16"]
    assert (entry["fit"], entry["generalize"], entry["half_fall_avg_rank"]) == (100, 500, 400)
    assert entry["half_fall_avg_rank_minus_generalize"] == -100  # median of 0, -100, -200
    assert entry["half_fall_avg_qk_rank"] is None and entry["half_fall_avg_qk_rank_reached"] == 0


def test_the_transformer_figures_draw_from_real_runs(tmp_path):
    from rankbias.report.transformer_plots import (
        plot_product_curves,
        plot_role_curves,
        plot_timeline,
    )

    configs = [RunConfig(model="transformer", model_args=dict(depth=1, width=16, heads=2),
                         dataset="modular-addition", dataset_args=dict(p=11),
                         optimizer="adamw", lr=3e-3, weight_decay=wd, wd_scope="weights",
                         batch_size=16, epochs=6, track_every=2, seed=seed, device="cpu")
               for wd in (0.0, 1.0) for seed in (0, 1)]
    with Store(tmp_path / "s.db") as store:
        for result in [r for group in ([0, 1], [2, 3])
                       for r in train_ensemble([configs[i] for i in group])]:
            store.save_result(result)
        runs, metrics = store.runs(), store.metrics()
    frame = role_ranks(metrics, 1e-3)
    one = metrics[(metrics.run_id == runs.run_id[0]) & (metrics.step == 0)
                  & metrics.layer.str.contains("mlp") & (metrics.metric == "rank@0.001")]
    first = frame[(frame.run_id == runs.run_id[0]) & (frame.step == 0)].set_index("role")
    assert first.loc["mlp_in", "value"] == one[one.layer.str.contains("fc_in")].value.mean()
    assert not np.isnan(runs.final_avg_qk_rank).any()
    for plot in (plot_role_curves, plot_product_curves, plot_timeline):
        path = plot(runs, metrics, "weight_decay", tmp_path / f"{plot.__name__}.png")
        assert path.stat().st_size > 10_000
