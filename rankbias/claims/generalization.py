"""Claim 9: the effect of the rank reduction on test accuracy is marginal, with the rank's
own effect separated from weight decay's (a comparison of weight decay > 0 with weight
decay 0 measures weight decay, not rank).

    rankbias reproduce generalization --scale quick --out out/

Two comparisons, each a three-way equivalence test on a seed-paired confidence interval
(`level`) against +-`margin`: pass when the interval lies inside, fail only when it lies
entirely outside, inconclusive otherwise, and inconclusive too when its half-width exceeds
margin/2 (too few seeds to tell):
- **The rank at fixed weights.** Each trained run with weight decay is truncated to its
  eps-rank (every hidden matrix replaced by its best rank-r approximation, r its eps-rank:
  compress/lowrank.truncate_) and its test accuracy compared with the full model's. This is
  the rank's own effect on the function the network computes, with nothing else changed.
- **The rank across B at fixed lr and weight decay.** B changes the rank through SGD's
  noise, not through weight decay (claim 4): the smallest against the largest B, seed by
  seed, where their mean final ranks differ (either way) by at least `min_rank_change`.
Only runs that reached their decay budget count (the gate: both ends of the B comparison).
The claim is about trained networks: a run that collapsed (train accuracy <= 0.15,
training/collapse.py) is not one. It is left out of the truncation test (truncating a
network at chance says nothing) and counted there; a B comparison with a collapsed run on
either side is inconclusive, said so: dropping those pairs would compare the survivors of
one B with all runs of the other, and the collapse is itself what B and decay did.
The margin's basis is stated in the experiment file (`margin_basis`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd

from rankbias.claims.accuracy import paired, three_way
from rankbias.claims.dynamics import mean_interval
from rankbias.claims.gate import describe_budget, informative, validity_table, with_validity
from rankbias.claims.runsets import GROUP_BY, count_runs, group_runs, scalar, select_runs
from rankbias.claims.verdict import (
    GATE,
    INCONCLUSIVE,
    REQUIRED,
    Verdict,
    declare,
    finish,
    parameters,
    rounded,
)
from rankbias.training.collapse import COLLAPSED_ACC, collapsed
from rankbias.training.state import process_state

declare("generalization", margin=0.03, margin_basis=REQUIRED, level=0.95, min_rank_change=0.1,
        group_by=GROUP_BY, **GATE)


def truncated_accuracy(runs: pd.DataFrame, checkpoint_dir: str | os.PathLike,
                       progress: bool | None = None) -> pd.DataFrame:
    """Per finished run with a checkpoint: its test accuracy, and that of the same weights
    truncated to the eps-rank at the run's own tolerance."""
    from tqdm import tqdm

    from rankbias.compress.compress import accuracy, load_source
    from rankbias.compress.lowrank import truncate_
    from rankbias.data import load_dataset

    rows, datasets = [], {}
    for run in tqdm(list(runs[runs.status == "done"].itertuples()), desc="truncated models",
                    unit="run", file=sys.stderr,
                    disable=None if progress is None else not progress):
        path = Path(checkpoint_dir) / f"{run.run_id}.pt"
        if not path.is_file():
            continue
        key = (run.dataset, json.dumps(run.dataset_args, sort_keys=True), run.seed)
        if key not in datasets:
            datasets[key] = load_dataset(run.dataset, seed=run.seed, **run.dataset_args)
        model, _ = load_source(path)
        full = accuracy(model, datasets[key])
        ranks = truncate_(model, run.tolerances[0])
        rows.append({"run_id": run.run_id, "full_acc": full,
                     "truncated_acc": accuracy(model, datasets[key]),
                     "truncated_rank": sum(ranks.values()) / max(len(ranks), 1)})
    return pd.DataFrame(rows, columns=["run_id", "full_acc", "truncated_acc", "truncated_rank"])


def check_generalization(spec: dict, rule: dict, runs: pd.DataFrame,
                         checkpoint_dir: str | os.PathLike) -> Verdict:
    """The hook of `rankbias reproduce` (experiments with `check: generalization`)."""
    rule = parameters({**rule, "kind": "generalization"})
    selected = select_runs(with_validity(runs, rule), rule["where"])
    # Small matrices: more threads only contend. No bar: as check_compression's.
    with process_state(threads=1):
        truncated = truncated_accuracy(selected, checkpoint_dir, progress=False)
    selected = selected.merge(truncated, on="run_id", how="left")
    evidence = {"counts": count_runs(selected), "margin": rule["margin"],
                "margin_basis": rule["margin_basis"], "level": rule["level"],
                "missing_checkpoints": int(((selected.status == "done")
                                            & selected.full_acc.isna()).sum()),
                "comparisons": []}
    verdicts, reasons = [], []
    for label, group in group_runs(selected, rule["group_by"]):
        done = group[(group.status == "done") & group.full_acc.notna()]
        for part in (_at_fixed_weights(done, rule), _across_batch_size(done, rule)):
            for entry in part:
                entry["group"] = label
                evidence["comparisons"].append(entry)
                reasons.append(f"{label}, {entry['what']}: {entry['reason']}")
                if entry["verdict"] is not None:
                    verdicts.append(entry["verdict"])
    evidence["validity"] = validity_table(selected)
    return finish(verdicts, reasons, evidence)


def _judge(differences: pd.Series, rule: dict) -> tuple[str, str, dict]:
    """The three-way verdict of a paired difference, with its numbers."""
    mean, low, high = mean_interval(differences, rule["level"])
    margin = rule["margin"]
    verdict = three_way(low, high, margin)
    if (high - low) / 2 > margin / 2:
        verdict = INCONCLUSIVE
    numbers = {"n": int(len(differences)), "mean": rounded(mean), "ci": [rounded(low),
                                                                        rounded(high)],
               "half_width": rounded((high - low) / 2)}
    text = (f"test acc {mean:+.4f} [{low:+.4f}, {high:+.4f}] over {len(differences)} seeds "
            f"against +-{margin:g}: {verdict}"
            + (" (half-width above margin/2: more seeds needed)"
               if (high - low) / 2 > margin / 2 else ""))
    return verdict, text, numbers


def _at_fixed_weights(done: pd.DataFrame, rule: dict) -> list[dict]:
    entries = []
    for (b, lr, wd), setting in done[done.weight_decay > 0].groupby(
            ["batch_size", "lr", "weight_decay"]):
        what = f"truncated to the eps-rank (B={scalar(b)}, lr={scalar(lr)}, wd={scalar(wd)})"
        if not informative(setting):
            entries.append({"what": what, "verdict": None, "reason": "below its decay budget "
                            f"({describe_budget(setting, ['batch_size'])}): not counted"})
            continue
        fell = collapsed(setting.train_acc)
        trained = setting[~fell]
        note = (f"; {int(fell.sum())} of {len(setting)} runs collapsed (train accuracy <= "
                f"{COLLAPSED_ACC}), left out" if fell.any() else "")
        if len(trained) < 2:
            entries.append({"what": what, "verdict": INCONCLUSIVE, "collapsed": int(fell.sum()),
                            "reason": f"{len(trained)} trained runs{note}"})
            continue
        difference = (trained.truncated_acc - trained.full_acc).astype(float)
        verdict, text, numbers = _judge(difference, rule)
        entries.append({"what": what, "verdict": verdict, "reason": text + note, **numbers,
                        "collapsed": int(fell.sum()),
                        "rank": rounded(trained.final_avg_rank.mean(), 2)})
    return entries


def _across_batch_size(done: pd.DataFrame, rule: dict) -> list[dict]:
    entries = []
    for (lr, wd), cell in done[done.weight_decay > 0].groupby(["lr", "weight_decay"]):
        sizes = sorted(cell.batch_size.unique())
        if len(sizes) < 2:
            continue
        small, large = (cell[cell.batch_size == b] for b in (sizes[0], sizes[-1]))
        what = (f"B={scalar(sizes[0])} against B={scalar(sizes[-1])} (lr={scalar(lr)}, "
                f"wd={scalar(wd)})")
        change = 1 - small.final_avg_rank.mean() / large.final_avg_rank.mean()
        if not (informative(small) and informative(large)):
            entries.append({"what": what, "verdict": None, "reason": "below the decay budget ("
                            f"{describe_budget(cell, ['batch_size'])}): not counted"})
            continue
        sides = {scalar(b): side for b, side in ((sizes[0], small), (sizes[-1], large))}
        fell = {b: int(collapsed(side.train_acc).sum()) for b, side in sides.items()}
        if any(fell.values()):
            entries.append({"what": what, "verdict": INCONCLUSIVE, "collapsed": fell,
                            "reason": "collapsed runs (train accuracy <= "
                            f"{COLLAPSED_ACC}): " + ", ".join(
                                f"{fell[b]} of {len(side)} at B={b}" for b, side in sides.items())
                            + f" (mean train accuracy {small.train_acc.mean():.2f} against "
                            f"{large.train_acc.mean():.2f}): no comparison of trained networks"})
            continue
        if abs(change) < rule["min_rank_change"]:
            entries.append({"what": what, "verdict": None, "reason": f"mean ranks differ by "
                            f"{abs(change):.0%} (< {rule['min_rank_change']:.0%}): not counted"})
            continue
        verdict, text, numbers = _judge(paired(small, large, "test_acc"), rule)
        entries.append({"what": what, "verdict": verdict,
                        "reason": f"rank {-change:+.0%} at the smaller B, {text}",
                        "rank_change": rounded(change, 3), **numbers})
    return entries
