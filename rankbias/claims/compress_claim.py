"""A claim beyond the paper: small batches with weight decay buy a smaller network.

    rankbias reproduce compression --scale quick --out out/

Statement: runs trained at a small batch size B with weight decay compress (`rankbias
compress`, one tolerance for every hidden layer) to fewer parameters, at the same accuracy
budget, than runs at a large B or without weight decay.

For each finished run with a checkpoint, `compression_curves` factorizes the final weights at
every tolerance of a log-spaced grid and records (parameters, accuracy) on two halves of
the run's own test set, split once by a fixed permutation: the compression curve. A run's
*parameters at the budget* are those of the largest tolerance whose accuracy on the
validation half is at most `budget` below the dense model's there (the dense model itself
when none is); the test half, which chose nothing, reports the accuracy at that tolerance.

The rule (`compression_verdict`), stated in the experiment file, per data set: the test
setting is the smallest B among the runs with weight decay > 0 (at the largest weight
decay), and it must have reached its decay budget (claims/gate.py; else the data set is
inconclusive: its runs could not show the effect); every other
(B, weight decay) setting is a control. Against each control, the test setting's mean
parameters at the budget must be (i) at most `max_ratio` times the control's mean (a
saving that matters) and (ii) below it by more than `sigma` standard errors of the
difference of the two means, sqrt(s_test^2/n_test + s_control^2/n_control) (s: the seed
standard deviation; the seed spread is in the margin). A setting with fewer than
`min_seeds` finished runs with a checkpoint makes the verdict inconclusive.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from rankbias.claims.gate import validity_table, with_validity
from rankbias.claims.runsets import select_runs
from rankbias.claims.verdict import (
    FAIL,
    GATE,
    INCONCLUSIVE,
    PASS,
    Verdict,
    declare,
    finish,
    parameters,
    rounded,
)
from rankbias.training.state import process_state
from rankbias.utils import RankbiasError


def tolerance_grid(spec: dict | None = None) -> list[float]:
    """Log-spaced tolerances {min, max, count} (default 1e-4 ... 0.5, 100 points)."""
    spec = spec or {}
    return [float(t) for t in np.geomspace(spec.get("min", 1e-4), spec.get("max", 0.5),
                                           spec.get("count", 100))]


def halves(data) -> tuple[torch.Tensor, torch.Tensor]:
    """The row indices of the test set's validation and test halves (a fixed permutation:
    the same split for every run of a data set)."""
    order = torch.randperm(len(data.x_test), generator=torch.Generator().manual_seed(0))
    return order[: len(order) // 2], order[len(order) // 2:]


def run_curve(checkpoint: str | os.PathLike, tolerances: list[float], data=None
              ) -> tuple[dict, list[dict]]:
    """One run's dense numbers and its compression curve, one point per tolerance, with the
    accuracy on the validation half (`val_acc`) and on the test half (`test_acc`)."""
    from rankbias.compress.compress import load_source, source_data
    from rankbias.compress.lowrank import choose_ranks, count_params, factorize, plan_layers
    from rankbias.training.sgd import evaluate

    model, config = load_source(checkpoint)
    data = data or source_data(model, config)
    parts = halves(data)

    def accuracies(net) -> tuple[float, float]:
        return tuple(evaluate(net, data.x_test[i], data.y_test[i], F.cross_entropy)[1]
                     for i in parts)

    layers = plan_layers(model)
    val, test = accuracies(model)
    dense = {"dense_params": count_params(model), "dense_val_acc": val, "dense_acc": test}
    points, seen = [], {}
    for tol in sorted(tolerances):
        ranks = choose_ranks(layers, tol=tol)
        key = tuple(ranks.values())
        if key not in seen:  # neighbouring tolerances often give the same ranks
            small, _ = factorize(model, layers, ranks)
            seen[key] = (count_params(small), *accuracies(small))
        params, val, test = seen[key]
        points.append({"tol": tol, "params": params, "val_acc": val, "test_acc": test})
    return dense, points


def at_budget(dense: dict, points: list[dict], budget: float, by: str = "val_acc") -> dict:
    """Parameters of the largest tolerance within `budget` of the dense accuracy on `by`
    (the validation half), and the test half's accuracy there."""
    dense_key = "dense_acc" if by == "test_acc" else f"dense_{by}"
    floor = dense[dense_key] - budget - 1e-12  # accuracies are fractions k/n
    within = [p for p in points if p[by] >= floor]
    best = max(within, key=lambda p: p["tol"]) if within else None
    return {"params_at_budget": best["params"] if best else dense["dense_params"],
            "tol_at_budget": best["tol"] if best else None,
            "test_acc_at_budget": best["test_acc"] if best else dense["dense_acc"]}


def compression_curves(runs: pd.DataFrame, checkpoint_dir: str | os.PathLike,
                       tolerances: list[float], budget: float, progress: bool | None = None
                       ) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Compression curves of the finished runs of `runs` that have a checkpoint in
    `checkpoint_dir` (`store.checkpoint_dir_for(store)` unless the sweep was told another).

    Returns (points: one row per run and tolerance; per_run: one row per run with its
    dense numbers and parameters at the budget; run ids that have no checkpoint).
    """
    from tqdm import tqdm

    from rankbias.data import load_dataset

    folder = Path(checkpoint_dir)
    done = runs[runs.status == "done"]
    points, per_run, missing, datasets = [], [], [], {}
    for run in tqdm(list(done.itertuples()), desc="compression curves", unit="run",
                    file=sys.stderr, disable=None if progress is None else not progress):
        path = folder / f"{run.run_id}.pt"
        if not path.is_file():
            missing.append(run.run_id)
            continue
        key = (run.dataset, json.dumps(run.dataset_args, sort_keys=True), run.seed)
        if key not in datasets:
            datasets[key] = load_dataset(run.dataset, seed=run.seed, **run.dataset_args)
        dense, curve = run_curve(path, tolerances, datasets[key])
        setting = {"run_id": run.run_id, "data": getattr(run, "data", run.dataset),
                   "batch_size": int(run.batch_size),
                   "weight_decay": float(run.weight_decay), "seed": int(run.seed),
                   "informative": bool(getattr(run, "gate_informative", True))}
        per_run.append({**setting, **dense, **at_budget(dense, curve, budget)})
        points += [{**setting, **point} for point in curve]
    return pd.DataFrame(points), pd.DataFrame(per_run), missing


def _label(batch_size, weight_decay) -> str:
    return f"B={batch_size}, wd={weight_decay:g}"


declare("compression", budget=0.01, max_ratio=1.0, sigma=3, min_seeds=2, tolerances=None,
        **GATE)


def compression_verdict(per_run: pd.DataFrame, rule: dict, missing: int = 0) -> Verdict:
    """Apply the rule of the module docstring to the per-run table (`rule`: its parameters;
    the declared defaults fill in the others), one verdict per data set, combined."""
    rule = parameters({**rule, "kind": "compression"})
    if per_run.empty:
        return Verdict(INCONCLUSIVE, f"no finished run with a checkpoint ({missing} without "
                       "one: every run writes one when it ends; rerun the sweep, or pass "
                       "--checkpoint-dir if they are elsewhere)", {"missing_checkpoints": missing})
    per_run = per_run.assign(**{c: per_run[c] if c in per_run else d
                                for c, d in (("data", "all"), ("informative", True),
                                             ("test_acc_at_budget", math.nan))})
    parts = {data: _data_set_verdict(runs, rule) for data, runs in per_run.groupby("data")}
    evidence = {"budget": rule["budget"], "missing_checkpoints": missing,
                "data_sets": {data: v.evidence for data, v in parts.items()}}
    return finish([v.verdict for v in parts.values()],
                  [f"{data}: {v.reason}" if len(parts) > 1 else v.reason
                   for data, v in parts.items()], evidence)


def _data_set_verdict(per_run: pd.DataFrame, rule: dict) -> Verdict:
    sigma, min_seeds, max_ratio = rule["sigma"], rule["min_seeds"], rule["max_ratio"]
    stats = per_run.groupby(["batch_size", "weight_decay"]).agg(
        mean=("params_at_budget", "mean"), std=("params_at_budget", "std"),
        count=("params_at_budget", "size"), informative=("informative", "all"),
        test_acc=("test_acc_at_budget", "mean")).fillna({"std": 0.0})
    settings = [{"setting": _label(b, wd), "batch_size": int(b), "weight_decay": float(wd),
                 "mean_params": round(float(r["mean"]), 1), "std": round(float(r["std"]), 1),
                 "n": int(r["count"]), "test_acc_at_budget": rounded(r["test_acc"]),
                 "informative": bool(r["informative"])} for (b, wd), r in stats.iterrows()]
    evidence = {"settings": settings}
    with_wd = [s for s in settings if s["weight_decay"] > 0]
    if not with_wd or len(settings) < 2:
        return Verdict(INCONCLUSIVE, "needs a setting with weight decay > 0 and a control",
                       evidence)
    test = min(with_wd, key=lambda s: (s["batch_size"], -s["weight_decay"]))
    if not test["informative"]:
        return Verdict(INCONCLUSIVE, f"{test['setting']} did not reach its decay budget: it "
                       "could not show the effect", evidence)
    short = [s["setting"] for s in settings if s["n"] < min_seeds]
    if short:
        return Verdict(INCONCLUSIVE, f"fewer than {min_seeds} runs with a checkpoint for "
                       f"{', '.join(short)} (rerun the sweep, or pass --checkpoint-dir if "
                       "they are elsewhere)", evidence)
    comparisons, verdicts = [], []
    for control in (s for s in settings if s is not test):
        gap = control["mean_params"] - test["mean_params"]
        error = math.sqrt(test["std"] ** 2 / test["n"] + control["std"] ** 2 / control["n"])
        ratio = test["mean_params"] / control["mean_params"]
        ok = ratio <= max_ratio and (gap > sigma * error if error > 0 else gap > 0)
        verdicts.append(PASS if ok else FAIL)
        comparisons.append({"control": control["setting"], "gap": round(gap, 1),
                            "standard_error": round(error, 1), "ratio": round(ratio, 3),
                            "pass": ok})
    evidence.update(test=test["setting"], comparisons=comparisons)
    reason = (f"{test['setting']}: {test['mean_params']:.0f} parameters at the budget (mean "
              f"of {test['n']}); " + "; ".join(
                  f"{c['control']}: {c['ratio']:.2f}x of its mean (need <= {max_ratio:g}), "
                  f"gap {c['gap'] / c['standard_error'] if c['standard_error'] else math.inf:.1f}"
                  f" SE (need > {sigma:g})" for c in comparisons))
    return Verdict(FAIL if FAIL in verdicts else PASS, reason, evidence)


def check_compression(spec: dict, rule: dict, runs: pd.DataFrame,
                      checkpoint_dir: str | os.PathLike) -> Verdict:
    """The hook of `rankbias reproduce` (experiments with `check: compression`)."""
    rule = parameters({**rule, "kind": "compression"})
    budget = rule["budget"]
    runs = select_runs(with_validity(runs, rule), rule["where"])
    # small matrices: more threads only contend (docs/performance.md). No bar of its own:
    # reproduce shows one over the claims, and --no-progress must silence every bar.
    with process_state(threads=1):
        points, per_run, missing = compression_curves(
            runs, checkpoint_dir, tolerance_grid(rule["tolerances"]), budget, progress=False)
    verdict = compression_verdict(per_run, rule, len(missing))
    verdict.evidence["runs"] = per_run.to_dict("records")
    verdict.evidence["rows"] = points.to_dict("records")  # the curves, for the figure
    verdict.evidence["validity"] = validity_table(runs)
    return verdict


def plot_compression_curves(points: pd.DataFrame, per_run: pd.DataFrame,
                            path: str | os.PathLike, budget: float | None = None) -> Path:
    """Parameters (x) against test accuracy (y) across tolerances: one colour per
    (B, weight decay) setting (dashed: weight decay 0), a line per run, a dot at each run's
    parameters at the budget. Left: every tolerance; right: near the dense accuracy."""
    import matplotlib.pyplot as plt

    from rankbias.report.plots import figure, legend

    if points.empty:
        raise RankbiasError("no compression curve to plot (no run with a checkpoint)")
    settings = sorted(per_run.groupby(["batch_size", "weight_decay"]).groups)
    colors = plt.cm.tab10(np.arange(len(settings)) % 10)
    with figure(path, ncols=2) as (fig, axes):
        for ax in axes:
            for color, (b, wd) in zip(colors, settings):
                mine = per_run[(per_run.batch_size == b) & (per_run.weight_decay == wd)]
                for i, run in enumerate(mine.itertuples()):
                    curve = points[points.run_id == run.run_id].sort_values("tol")
                    ax.plot(curve["params"], curve["test_acc"], color=color, lw=1.1, alpha=0.75,
                            ls="--" if wd == 0 else "-",
                            label=f"{_label(b, wd)} (n={len(mine)})" if i == 0 else None)
                    at = curve[curve.tol == run.tol_at_budget]  # empty: the dense model kept
                    ax.scatter(at["params"] if len(at) else [run.dense_params],
                               at["test_acc"] if len(at) else [run.dense_acc], color=color,
                               edgecolor="black", lw=0.6, s=30, zorder=3)
            ax.set_xscale("log")
            ax.set_xlabel("parameters after factorizing (log scale)")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
        top = float(per_run.dense_acc.max())
        axes[1].set_ylim(top - 4 * (budget or 0.01), top + 0.005)
        axes[0].set_title("every tolerance (right end: dense, left: tol 0.5)", fontsize=10)
        axes[1].set_title("near the dense accuracy; dots: parameters at the budget"
                          + (f" (drop <= {budget:g})" if budget else ""), fontsize=10)
        legend(axes[0])
    return Path(path)
