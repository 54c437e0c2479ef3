"""The report of a results store: every experiment's standard figures, in the explorer page.

    rankbias report --store results.db --out report/

    from rankbias.report.report import report_store
    report_store("results.db", "report/")           # every standard figure + report.html

Runs are grouped into experiments by every config field that changes what a run computes,
except batch size, learning rate, weight decay and seed; each experiment gets a summary
table, figures by the hyperparameters that vary in it (drawn by rankbias.report.plots) and the
interactive explorer (rankbias.report.explorer) around them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from rankbias.report.explorer import write_explorer
from rankbias.report.plots import (
    LABELS,
    PARAMS,
    done_runs,
    plot_accuracy_curves,
    plot_final_vs_param,
    plot_layer_heatmap,
    plot_rank_curves,
    plot_rank_vs_accuracy,
    plot_spectra,
    plot_weight_change,
    setting_of,
    short_name,
    tied,
    value_text,
)
from rankbias.runs.store import Store, open_store
from rankbias.training.config import NOT_IDENTITY, RunConfig
from rankbias.utils import RankbiasError, natural_key

EXPECTED = {  # what Theorem 3.4 predicts (bound = m B log(2/eps) / (lr * wd))
    "batch_size": "Theorem 3.4: smaller B, lower rank (bound grows linearly in B).",
    "lr": "Theorem 3.4: larger learning rate, lower rank (bound falls like 1/lr).",
    "weight_decay": "Theorem 3.4: larger weight decay, lower rank; no low-rank bias at wd = 0 "
                    "(the bound is infinite there).",
}


# --- the report of a store ----------------------------------------------------------------
def _key(runs: pd.DataFrame, columns: list[str]) -> pd.Series:
    """One hashable text per run of the values of `columns` (dicts and lists included)."""
    return runs[columns].apply(lambda row: json.dumps(row.tolist(), default=str), axis=1)


def _experiments(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Runs grouped by every config field except B, lr, wd and seed (and those that do not
    change a run's numbers: config.NOT_IDENTITY); each with a label."""
    fields = [f for f in RunConfig.field_names()
              if f in runs.columns and f not in PARAMS + NOT_IDENTITY + ("seed",)]
    keys = _key(runs, fields)
    groups = [runs[keys == key] for key in dict.fromkeys(keys)]
    differing = [f for f in fields if _key(runs, [f]).nunique() > 1]
    return [(_describe(group, differing), group) for group in groups]


def _describe(runs: pd.DataFrame, differing: list[str]) -> str:
    row = runs.iloc[0]
    text = f"{row['model']} ({value_text(row['model_args']) or 'defaults'}) on {row['dataset']}"
    if row["dataset_args"]:
        text += f" ({value_text(row['dataset_args'])})"
    text += f", {row['epochs']} epochs"
    extra = [f"{f}={value_text(row[f])}" for f in differing
             if f not in ("model", "model_args", "dataset", "dataset_args", "epochs")]
    return text + (f", {', '.join(extra)}" if extra else "")


def _setting(runs: pd.DataFrame, params: list[str]) -> str:
    return setting_of(runs.iloc[0], params)


def _others(runs: pd.DataFrame, vary: str) -> list[str]:
    """The hyperparameters to hold fixed while `vary` varies: not those tied to it (zip)."""
    done = done_runs(runs)
    return [p for p in PARAMS if p != vary and not tied(done, vary, p)]


def _groups(runs: pd.DataFrame, vary: str) -> list[tuple[str, pd.DataFrame]]:
    """Runs of one experiment grouped by the other hyperparameters, where `vary` varies.

    With no such group (an irregular design) all runs form one group.
    """
    others = _others(runs, vary)
    keys = _key(runs, others)
    groups = [runs[keys == key] for key in dict.fromkeys(keys)]
    found = [(_setting(g, others), g) for g in groups if done_runs(g)[vary].nunique() > 1]
    return found or [("other hyperparameters mixed", runs)]


def _strength(runs: pd.DataFrame) -> float:
    """lr * wd / B: the larger, the stronger the predicted bias (Theorem 3.4)."""
    done = done_runs(runs)
    return float((done["lr"] * done["weight_decay"] / done["batch_size"]).mean())


def _summary_table(runs: pd.DataFrame) -> list[dict]:
    """One row per (B, lr, wd): runs by status, rank and accuracy mean ± std over seeds."""
    rows = []
    for values, group in runs.groupby(list(PARAMS), sort=True):
        done = done_runs(group)
        row = {short_name(p): v for p, v in zip(PARAMS, values)}
        row.update({"done": len(done), "diverged": int((group["status"] == "diverged").sum()),
                    "other": int((~group["status"].isin(["done", "diverged"])).sum())})
        for column in ("init_avg_rank", "final_avg_rank", "test_acc"):
            x = done[column].dropna().astype(float)
            row[column] = (f"{x.mean():.4g} ± {x.std():.2g}" if len(x) > 1
                           else f"{x.mean():.4g}" if len(x) else "")
        rows.append(row)
    return rows


def _runs_section(runs: pd.DataFrame, store_path: str) -> dict:
    counts = runs["status"].value_counts()
    problems = runs[runs["status"] != "done"]
    rows = [{"run_id": r.run_id, "status": r.status, "B": r.batch_size, "lr": r.lr,
             "wd": r.weight_decay, "seed": r.seed, "diverged_step": r.diverged_step,
             "error": (r.error or "")[:200]} for r in problems.head(50).itertuples()]
    versions = ", ".join(sorted({str(v) for v in runs["code_version"]}))
    text = (f"store {store_path}: {len(runs)} runs, "
            + ", ".join(f"{n} {s}" for s, n in counts.items())
            + f".\nCode versions of the runs: {versions}.")
    if len(problems):
        text += ("\nRuns not done (diverged, failed, unfinished) are left out of every "
                 f"figure; listed below ({min(len(problems), 50)} of {len(problems)}).")
    return {"title": "Runs", "text": text, "table": rows or None}


class _Drawer:
    """Calls figure functions into one folder, logs one line each, notes the skipped ones."""

    def __init__(self, out: Path, progress: bool) -> None:
        self.out, self.progress, self.notes = out, progress, []

    def __call__(self, name: str, plot: Callable, *args, **kw) -> list[Path]:
        try:
            path = plot(*args, path=self.out / name, **kw)
        except RankbiasError as err:
            self.notes.append(f"{name} not drawn: {err}")
            return []
        if self.progress:
            print(f"report: wrote {path}", file=sys.stderr)
        return [path]


def _curve_sections(exp: pd.DataFrame, metrics: pd.DataFrame, tag: str, label: str,
                    draw: _Drawer, max_groups: int) -> list[dict]:
    """For each varied hyperparameter: curves per group and one final-vs-param figure."""
    varied = [p for p in PARAMS if done_runs(exp)[p].nunique() > 1]
    how = "Lines: mean over seeds; bands: min–max; n = runs per curve."
    sections = []
    for param in varied or ["batch_size"]:  # nothing varies: one curve of all seeds
        groups = _groups(exp, param) if varied else [(_setting(exp, list(PARAMS)), exp)]
        for j, (setting, group) in enumerate(groups[:max_groups]):
            stem = f"{tag}-{param}-{j}"
            images = (draw(f"{stem}-rank.png", plot_rank_curves, group, metrics, param)
                      + draw(f"{stem}-accuracy.png", plot_accuracy_curves, group, metrics, param)
                      + draw(f"{stem}-weight-change.png", plot_weight_change, group, metrics,
                             param))
            sections.append({"title": f"{label}: by {LABELS[param]} ({setting})",
                             "text": f"{EXPECTED[param]}\n{how}" if varied else how,
                             "images": images})
        if not varied:
            continue
        others = [p for p in _others(exp, param) if done_runs(exp)[p].nunique() > 1]
        hued = exp.assign(setting=exp.apply(setting_of, axis=1, args=(others,)))
        images = draw(f"{tag}-{param}-final.png", plot_final_vs_param, hued, param,
                      hue="setting" if others else None)
        text = EXPECTED[param]
        if len(groups) > max_groups:
            text += (f"\nCurves above for the first {max_groups} of {len(groups)} settings "
                     "(--max-groups); this figure has them all.")
        sections.append({"title": f"{label}: final average rank vs {LABELS[param]}",
                         "text": text, "images": images})
    return sections


def _detail_section(store: Store, exp: pd.DataFrame, tag: str, label: str,
                    draw: _Drawer) -> dict:
    """Per-layer heatmap of the lowest-rank run, spectra per B, rank vs test accuracy."""
    done = done_runs(exp)
    best = done.loc[done["final_avg_rank"].astype(float).idxmin()] \
        if done["final_avg_rank"].notna().any() else done.iloc[0]
    tol = float((best["tolerances"] or [1e-3])[0])
    layer_rows = store.metrics(run_ids=[best["run_id"]], metrics=[f"rank@{tol:g}"])
    images = draw(f"{tag}-heatmap.png", plot_layer_heatmap, layer_rows, best["run_id"],
                  metric=f"rank@{tol:g}",
                  label=f"{setting_of(best, list(PARAMS))}, seed {best['seed']}")
    varied = [p for p in PARAMS if done[p].nunique() > 1]
    param = "batch_size" if "batch_size" in varied else (varied[0] if varied else None)
    text = "Heatmap: the run with the lowest final average rank."
    if param:
        setting, group = max(_groups(exp, param), key=lambda item: _strength(item[1]))
        first = done_runs(group).sort_values("seed").drop_duplicates(param).sort_values(param)
        by_label = {f"{short_name(param)}={value_text(r[param])}": r["run_id"]
                    for _, r in first.iterrows()}
        layer = _pick_layer(store, first["run_id"].iloc[0])
        images += draw(f"{tag}-spectra.png", plot_spectra, store, by_label, layer, tol=tol,
                       note=setting)
        text += (f"\nSpectra: {layer} at the end of training, one run (lowest seed) per "
                 f"{LABELS[param]}, at {setting} (the group with the largest lr*wd/B).")
    color_by = "batch_size" if param in (None, "batch_size") else param
    images += draw(f"{tag}-rank-vs-acc.png", plot_rank_vs_accuracy, exp, color_by=color_by)
    return {"title": f"{label}: layers, spectra, rank vs accuracy", "text": text,
            "images": images}


def _pick_layer(store: Store, run_id: str) -> str:
    """A hidden layer: the middle one of those with the longest spectrum (not the head)."""
    spectra = store.spectra(run_id)
    if not spectra:
        return ""
    last = max(step for step, _ in spectra)
    sizes = {layer: len(s) for (step, layer), s in spectra.items() if step == last}
    longest = sorted((name for name, n in sizes.items() if n == max(sizes.values())),
                     key=natural_key)
    return longest[(len(longest) - 1) // 2]


def report_store(store_path: str | os.PathLike, out_dir: str | os.PathLike,
                 progress: bool = True, max_groups: int = 4) -> Path:
    """Draw the standard figures of every experiment in a store; write OUT/report.html,
    the interactive explorer (rankbias.report.explorer) with these figures in its last section.

    Runs are grouped into experiments by every config field except batch size, learning
    rate, weight decay and seed. For each hyperparameter that varies in an experiment:
    rank, accuracy and weight-change curves per group of the other two (at most
    `max_groups` groups) and one final-rank-vs-parameter figure; then a per-layer
    heatmap, spectra per batch size and rank vs test accuracy. Returns the HTML path.
    """
    with open_store(store_path, readonly=True) as store:
        runs = store.runs()
        if not (runs["status"] == "done").any():
            what = ", ".join(f"{n} {s}" for s, n in runs["status"].value_counts().items())
            raise RankbiasError(f"{store_path} has no finished runs ({what or 'empty'}): run "
                                "`rankbias sweep` or `rankbias train` with this --store first")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        metrics = store.metrics(run_ids=done_runs(runs)["run_id"], layer="")
        draw = _Drawer(out, progress)
        sections = [_runs_section(runs, str(store_path))]
        for i, (label, exp) in enumerate(_experiments(runs)):
            if done_runs(exp).empty:
                continue
            sections.append({"title": f"{label}: summary", "table": _summary_table(exp),
                             "text": "One row per (B, lr, wd); ranks and accuracy: mean ± std "
                                     "over the done seeds."})
            sections += _curve_sections(exp, metrics, f"e{i}", label, draw, max_groups)
            sections.append(_detail_section(store, exp, f"e{i}", label, draw))
    if draw.notes:
        sections.append({"title": "Figures not drawn", "text": "\n".join(draw.notes)})
    title = f"rankbias report: {Path(store_path).name}"
    return write_explorer(out / "report.html", store_path, title, figures=sections)

