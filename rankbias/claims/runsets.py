"""The runs a claim's rule looks at: selected, labelled by data set and architecture,
grouped, and counted (done, collapsed, diverged, stopped, failed, not run), so that no run
is dropped silently and a grid value without usable runs can be named.

A run is *usable* when it finished ("done") above the authors' divergence threshold on
train accuracy (0.15): a run at chance accuracy has collapsed rather than learned, and its
low rank says nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pandas as pd

from rankbias.training.collapse import collapsed as collapsed_acc
from rankbias.training.collapse import learned

GROUP_BY = ["data", "architecture"]  # the default grouping of every trend rule


def label_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` with two text columns to group by: `architecture` (the model and the options
    that differ from its defaults, e.g. "mlp(depth=4, width=64, batch_norm=False)") and
    `data` (the data set and its options, e.g. "fashion-mnist(subset=10000)")."""
    if runs.empty or "architecture" in runs:
        return runs
    from rankbias.models import MODELS, model_options

    def architecture(row) -> str:
        defaults = model_options(row.model) if row.model in MODELS else {}
        options = {k: v for k, v in (row.model_args or {}).items() if defaults.get(k) != v}
        return _call(row.model, options)

    return runs.assign(architecture=runs.apply(architecture, axis=1),
                       data=[_call(d, a or {}) for d, a in zip(runs.dataset, runs.dataset_args)])


def _call(name: str, options: dict) -> str:
    inner = ", ".join(f"{k}={v}" for k, v in options.items())
    return f"{name}({inner})" if inner else name


def select_runs(runs: pd.DataFrame, where: str | None) -> pd.DataFrame:
    runs = label_runs(runs)
    return runs.query(where) if where and len(runs) else runs


def usable_runs(selected: pd.DataFrame) -> pd.DataFrame:
    return selected[(selected.status == "done") & learned(selected.train_acc)]


def count_runs(selected: pd.DataFrame) -> dict:
    collapsed = (selected.status == "done") & collapsed_acc(selected.train_acc)
    known = ["done", "diverged", "stopped", "failed"]
    return {"runs": int(len(selected)),
            "done": int((selected.status == "done").sum() - collapsed.sum()),
            "collapsed": int(collapsed.sum()),
            **{s: int((selected.status == s).sum()) for s in known[1:]},
            "not_run": int((~selected.status.isin(known)).sum())}


def group_runs(selected: pd.DataFrame,
            group_by: list[str] | None) -> Iterator[tuple[str, pd.DataFrame]]:
    """(label, runs) per group; all runs, finished or not, so missing values show."""
    if not group_by:
        yield "all", selected
        return
    keys = [selected[k].map(_hashable) for k in group_by]
    for key, group in selected.groupby(keys, sort=True):
        values = key if isinstance(key, tuple) else (key,)
        yield ", ".join(str(v) for k, v in zip(group_by, values)), group


def _hashable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def scalar(value):
    return value.item() if hasattr(value, "item") else value


def missing_values(group: pd.DataFrame, param: str, min_runs: int) -> list[str]:
    """Values of `param` in the design with fewer than `min_runs` usable runs, each with
    what happened to its runs ("B=8: 0 of 5 usable (5 collapsed)")."""
    notes = []
    for value, runs in group.groupby(param, sort=True):
        usable = len(usable_runs(runs))
        if usable < min_runs:
            counts = {k: v for k, v in count_runs(runs).items() if v and k not in ("runs", "done")}
            what = ", ".join(f"{v} {k}" for k, v in counts.items()) or "none run"
            notes.append(f"{param}={scalar(value)}: {usable} of {len(runs)} runs usable ({what})")
    return notes


