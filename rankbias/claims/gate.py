"""The decay-budget gate: a rank rule may only conclude from runs whose weight decay had
the time to act (docs/theory.md, "The decay budget").

Each run's setting gets, from its config and lr schedule (training/budget.py): `steps`,
`k_star`, `decay_budget` (D; measured during training for Adam with L2 decay),
`threshold` (log(2/eps) at the rank's tolerance eps, unless the experiment file states
another with its reason) and `informative` (D >= threshold). Every rank rule reports the
settings it looked at under `validity` in its evidence, and concludes only where the
theory says the effect could show: a trend needs its low-rank end informative, a control
must be informative to count.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from rankbias.training.budget import validity
from rankbias.training.config import RunConfig

# What a setting is, in the validity table (besides its data set and architecture).
SETTING = ["optimizer", "momentum", "batch_size", "lr", "weight_decay", "schedule", "epochs"]
GATE_COLUMNS = ["steps", "k_star", "decay_budget", "threshold", "informative"]


def _config(row: pd.Series) -> RunConfig:
    fields = {f: row[f] for f in RunConfig.field_names() if f in row.index}
    fields = {k: v for k, v in fields.items() if not (isinstance(v, float) and math.isnan(v))}
    return RunConfig.from_dict(fields)


def with_validity(runs: pd.DataFrame, rule: dict, eps: float | None = None) -> pd.DataFrame:
    """`runs` with the gate's columns (prefixed gate_) for each run's setting."""
    if runs.empty:
        return runs.assign(**{f"gate_{c}": [] for c in GATE_COLUMNS})
    rows = []
    for _, run in runs.iterrows():
        measured = run.get("decay_budget")
        rows.append(validity(_config(run), eps=eps, min_budget=rule.get("min_budget"),
                             measured=None if pd.isna(measured) else float(measured)))
    table = pd.DataFrame(rows, index=runs.index).add_prefix("gate_")
    return pd.concat([runs.drop(columns=[c for c in table if c in runs]), table], axis=1)


def validity_table(runs: pd.DataFrame) -> list[dict]:
    """One entry per setting (seeds together) of runs carrying the gate's columns: the
    setting's fields and the gate's numbers (D: the mean over its runs, for a measured D).
    Strict JSON (no NaN)."""
    if runs.empty:
        return []
    keys = [k for k in ["data", "architecture", *SETTING] if k in runs]
    entries = []
    for values, group in runs.groupby(keys, sort=True, dropna=False):
        entry = {k: _plain(v) for k, v in zip(keys, values)}
        budgets = group.gate_decay_budget.dropna()
        budget = float(budgets.mean()) if len(budgets) else None
        threshold = float(group.gate_threshold.iloc[0])
        entry.update(steps=int(group.gate_steps.iloc[0]), k_star=_plain(group.gate_k_star.iloc[0]),
                     decay_budget=None if budget is None else round(budget, 4),
                     threshold=round(threshold, 4),
                     informative=None if budget is None else bool(budget >= threshold))
        entries.append(entry)
    return entries


def informative(runs: pd.DataFrame) -> bool:
    """Whether every run here reached its threshold (a measured D unknown: not)."""
    return bool(len(runs)) and bool(runs.gate_informative.fillna(False).astype(bool).all())


def describe_budget(runs: pd.DataFrame, fields: list[str]) -> str:
    """"B=128: D=2.0 < 7.6" for the settings of `runs` (seeds together)."""
    parts = []
    for values, group in runs.groupby(fields, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        label = ", ".join(f"{_short(k)}={_plain(v)}" for k, v in zip(fields, values))
        budgets = group.gate_decay_budget.dropna()
        budget = f"{budgets.mean():.2f}" if len(budgets) else "unknown"
        parts.append(f"{label}: D={budget} vs {group.gate_threshold.iloc[0]:.1f}")
    return "; ".join(parts)


def _short(field: str) -> str:
    return {"batch_size": "B", "weight_decay": "wd"}.get(field, field)


def _plain(value):
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
