"""The data of the explorer page (rankbias.report.explorer), read from a results store: one column
per run field, the rank curves of every run, and each run's spectra as a script of its own.

    from rankbias.report.explorer_data import explorer_data, spectra_payload
    with Store("results.db", readonly=True) as store:
        data = explorer_data(store)                  # JSON-ready: runs, curves, layers
        spectra = spectra_payload(store, data["runs"]["run_id"][0])

Numbers are rounded to a few significant digits (the page loads them all at once) and
NaN/Inf become null (strict JSON).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time

import numpy as np
import pandas as pd

from rankbias.metrics.tracker import rank_metric
from rankbias.runs.store import Store
from rankbias.training.config import NOT_IDENTITY, RunConfig
from rankbias.utils import code_version, natural_key

# The picker's fields, in order; other config fields join them when they vary.
FILTERS = {"model": "model", "dataset": "data set", "batch_size": "B", "lr": "lr",
           "weight_decay": "wd", "seed": "seed", "status": "status"}
NOT_PICKED = (*NOT_IDENTITY, "tolerances")  # never change what a run means
# Run-level metrics kept per tracking point, under one-letter keys (the data is loaded once).
CURVES = {"avg_rank": "r", "avg_weight_change": "w", "train_acc": "a", "test_acc": "t"}
SUMMARY = ("init_avg_rank", "final_avg_rank", "train_acc", "test_acc")


def _number(value, digits: int = 4):
    """A float as a short JSON number (`digits` significant digits); None for NaN/missing."""
    if value is None or isinstance(value, str):
        return value
    value = float(value)
    if not math.isfinite(value):
        return None
    if value == int(value) and abs(value) < 1e15:
        return int(value)
    return float(f"{value:.{digits}g}")


def _text(value) -> str:
    """A config value as picker text: 0.005, depth=4 width=64, [15, 22]."""
    if isinstance(value, dict):
        return " ".join(f"{k}={_text(v)}" for k, v in value.items()) or "default"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, (float, np.floating)):
        return f"{value:g}"
    return "none" if value is None else str(value)


def spectra_file(run_id: str) -> str:
    """The file name of a run's spectra: its id when that is a safe name, else a hash."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
        return f"{run_id}.js"
    return "h" + hashlib.sha1(run_id.encode()).hexdigest()[:20] + ".js"


def _tolerance(tolerances) -> float:
    """The tolerance of a run's rank (its first; the paper's 1e-3 when none is stored)."""
    if isinstance(tolerances, (list, tuple)) and tolerances:
        return float(tolerances[0])
    return 1e-3


def _picked_fields(runs: pd.DataFrame) -> list[str]:
    """The picker's fields: the standard ones, then other config fields that vary."""
    extra = [f for f in RunConfig.field_names()
             if f in runs and f not in FILTERS and f not in NOT_PICKED
             and runs[f].map(_text).nunique() > 1]
    return [f for f in FILTERS if f in runs] + extra


def _column(runs: pd.DataFrame, field: str) -> list:
    """One picker column: numbers stay numbers (sorted as such), anything else is text."""
    values = runs[field]
    if field in FILTERS and pd.api.types.is_numeric_dtype(values):
        return [_number(v, 6) for v in values]
    return [_text(v) for v in values]


def _curves(store: Store, runs: pd.DataFrame, tols: list[float]) -> tuple[list, list[str]]:
    """Per run: tracking points and the run-level and per-layer series; the layer names."""
    rank_of_run = {r: rank_metric(t) for r, t in zip(runs["run_id"], tols)}
    rows = store.metrics(metrics=list(CURVES) + sorted(set(rank_of_run.values())))
    run_level = rows["layer"] == ""
    own_rank = rows["metric"].to_numpy() == rows["run_id"].map(rank_of_run).to_numpy()
    rows = rows[(run_level & rows["metric"].isin(list(CURVES))) | (~run_level & own_rank)]
    if rows.empty:
        return [None] * len(runs), []
    rows = rows.assign(column=np.where(rows["layer"] == "", rows["metric"], "L" + rows["layer"]))
    wide = rows.pivot_table(index=["run_id", "step"], columns="column", values="value",
                            aggfunc="last")
    epochs = rows.groupby(["run_id", "step"])["epoch"].max()  # one epoch per tracking point
    layers = sorted({c[1:] for c in wide.columns if c.startswith("L")}, key=natural_key)
    keys = [(CURVES[c], None) if c in CURVES else ("L", str(layers.index(c[1:])))
            for c in wide.columns]
    values = wide.to_numpy()
    steps = wide.index.get_level_values("step").to_numpy()
    epochs = epochs.reindex(wide.index).to_numpy()
    ids = wide.index.get_level_values("run_id").to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    by_run = {}
    for start, end in zip(starts, np.r_[starts[1:], len(ids)]):
        curve = {"s": steps[start:end].tolist(), "e": epochs[start:end].tolist(), "L": {}}
        block = values[start:end]
        for (name, layer), column in zip(keys, block.T):
            if np.isnan(column).all():
                continue
            series = [_number(v) for v in column]
            if layer is None:
                curve[name] = series
            else:
                curve["L"][layer] = series
        by_run[ids[start]] = curve
    return [by_run.get(r) for r in runs["run_id"]], layers


def explorer_data(store: Store) -> dict:
    """Everything the page shows except the spectra, as plain JSON-ready values.

    runs: one column per field (run_id, status, config fields, summary numbers, tol, ...);
    curves[i]: run i's tracking points s (steps) and e (epochs), run-level series r (average
    rank), w (weight change), a / t (train / test accuracy), and L: layer index -> rank at the
    run's tolerance; layers: the layer names.
    """
    runs = store.runs()
    tols = [_tolerance(t) for t in runs.get("tolerances", pd.Series([None] * len(runs)))]
    fields = _picked_fields(runs)
    counted = store.spectra_counts()
    columns = {"run_id": list(runs["run_id"]), "tol": tols,
               "spectra": [spectra_file(r) if counted.get(r) else None for r in runs["run_id"]],
               "error": [(e or "")[:300] if s != "done" else "" for e, s in
                         zip(runs["error"].fillna(""), runs["status"])]}
    for field in fields:
        columns[field] = _column(runs, field)
    for field in SUMMARY:
        columns[field] = [_number(v) for v in runs[field]] if field in runs else []
    curves, layers = _curves(store, runs, tols) if len(runs) else ([], [])
    return {"store": str(store.path), "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "version": code_version(), "fields": [[f, FILTERS.get(f, f)] for f in fields],
            "runs": columns, "curves": curves, "layers": layers}


def spectra_payload(store: Store, run_id: str) -> dict:
    """One run's spectra, normalized: sigma_i / ||sigma||_2 (= sigma_i(W / ||W||_F)).

    {"run", "steps", "epochs", "layers": {name: [float64 array at each step, or None]}}.
    """
    rows = store.spectra_rows(run_id)
    steps = sorted({row[0] for row in rows})
    epochs = {step: epoch for step, epoch, _, _ in rows}
    position = {step: i for i, step in enumerate(steps)}
    layers: dict[str, list] = {}
    for step, _, layer, sigma in rows:
        norm = float(np.sqrt(np.sum(sigma**2)))
        layers.setdefault(layer, [None] * len(steps))[position[step]] = \
            sigma / norm if norm > 0 else np.zeros_like(sigma)
    return {"run": run_id, "steps": steps, "epochs": [epochs[s] for s in steps],
            "layers": {name: layers[name] for name in sorted(layers, key=natural_key)}}


def spectra_script(payload: dict) -> str:
    """The text of a run's spectra file: one call of rankbiasSpectra (defined by the page)
    with the payload, values to 5 significant digits."""
    def values(array) -> str:  # one %-format of the whole vector: 15x faster than per value
        return "null" if array is None else "[" + ("%.5g," * len(array) % tuple(array))[:-1] + "]"

    layers = ",".join(f"{json.dumps(name)}:[{','.join(values(a) for a in series)}]"
                      for name, series in payload["layers"].items())
    head = json.dumps({k: payload[k] for k in ("run", "steps", "epochs")},
                      separators=(",", ":"))[:-1]
    return f'rankbiasSpectra({head},"layers":{{{layers}}}}});\n'
