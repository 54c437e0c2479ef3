"""Figures of a results store: rank, accuracy and weight change over training, final rank
against a hyperparameter, per-layer heatmaps, spectra and rank against accuracy.

    from rankbias.report.plots import plot_rank_curves
    with Store("results.db", readonly=True) as store:
        runs, metrics = store.runs(), store.metrics()
    plot_rank_curves(runs, metrics, "batch_size", "rank_by_B.png")

Figures draw finished ("done") runs only; diverged, failed and unfinished runs are
counted in the title. Curves are the mean over seeds with a min-max band (the authors'
style) and every legend entry gives its number of runs n. Figure functions take the
DataFrames of `Store.runs()` / `Store.metrics()`, write one PNG atomically, close the
figure and return the path. `rankbias report` (rankbias.report.report) draws them all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window: set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from rankbias.metrics.spectral import rank_from_singular_values  # noqa: E402
from rankbias.runs.store import Store, open_store  # noqa: E402
from rankbias.utils import RankbiasError, atomic_path, natural_key  # noqa: E402

PARAMS = ("batch_size", "lr", "weight_decay")  # the knobs of Theorem 3.4
SHORT = {"batch_size": "B", "lr": "lr", "weight_decay": "wd"}
LABELS = {"batch_size": "batch size B", "lr": "learning rate μ",
          "weight_decay": "weight decay wd (PyTorch, = 2λ)"}
METRIC_LABELS = {"avg_rank": "average rank", "final_avg_rank": "final average rank",
                 "avg_weight_change": "relative weight change per epoch",
                 "train_acc": "train accuracy", "test_acc": "test accuracy",
                 "final_avg_qk_rank": "final mean rank of W_Q^T W_K per head",
                 "final_avg_ov_rank": "final mean rank of W_O W_V per head"}


# --- small helpers ----------------------------------------------------------------------
def value_text(value) -> str:
    """A config value as short text: 0.005, 16, depth=3 width=32."""
    if isinstance(value, dict):
        return " ".join(f"{k}={value_text(v)}" for k, v in value.items())
    if isinstance(value, (float, np.floating)):
        return f"{value:g}"
    return str(value)


def short_name(column: str) -> str:
    return SHORT.get(column, column)


def setting_of(row: pd.Series, params: list[str]) -> str:
    """'B=16, wd=0.005': the values of `params` in one run."""
    return ", ".join(f"{short_name(p)}={value_text(row[p])}" for p in params) or "all runs"


def _metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def _colors(n: int) -> np.ndarray:
    return plt.cm.viridis(np.linspace(0.0, 0.85, max(n, 1)))


def done_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "done"]


def _not_drawn(runs: pd.DataFrame) -> str:
    """'2 diverged, 1 failed not drawn', or '' when every run is drawn."""
    counts = runs.loc[runs["status"] != "done", "status"].value_counts()
    if counts.empty:
        return ""
    return ", ".join(f"{n} {status}" for status, n in counts.items()) + " not drawn"


def tied(runs: pd.DataFrame, a: str, b: str) -> bool:
    """Whether two varying columns determine each other (a zip, e.g. constant lr * wd)."""
    return (runs[a].nunique() > 1 and runs[b].nunique() > 1
            and runs.groupby(a)[b].nunique().max() == 1
            and runs.groupby(b)[a].nunique().max() == 1)


def _context(runs: pd.DataFrame, vary: str | None) -> str:
    """The fixed settings of a figure ('mlp on digits, lr=0.1, wd=0.005').

    Hyperparameters that vary within a curve are named "mixed"; those tied to `vary`
    are in the legend instead.
    """
    parts = [" / ".join(sorted({value_text(v) for v in runs[c]})) for c in ("model", "dataset")
             if c in runs]
    text = " on ".join(parts)
    for param in PARAMS:
        if param == vary or param not in runs or vary and tied(runs, vary, param):
            continue
        values = sorted(runs[param].unique())
        text += f", {short_name(param)}={value_text(values[0])}" if len(values) == 1 else \
            f", {short_name(param)} mixed"
    return text


def _curve_label(runs: pd.DataFrame, vary: str, value, n: int) -> str:
    """'wd=0.01 (n=3)', with the hyperparameters tied to `vary`: 'wd=0.01, lr=0.2 (n=3)'."""
    zipped = [p for p in PARAMS if p != vary and p in runs and tied(runs, vary, p)]
    return f"{setting_of(runs[runs[vary] == value].iloc[0], [vary, *zipped])} (n={n})"


def _title(ax, head: str, runs: pd.DataFrame, vary: str | None) -> None:
    done = done_runs(runs)
    note = _not_drawn(runs)
    runs = done if len(done) else runs
    ax.set_title(f"{head}\n{_context(runs, vary)}" + (f"; {note}" if note else ""),
                 fontsize=10)


@contextlib.contextmanager
def figure(path: str | os.PathLike, ncols: int = 1, width: float = 6.4,
            height: float = 4.2, **kw) -> Iterator[tuple]:
    """A figure saved atomically to `path` as PNG on success, and always closed."""
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False, **kw)
    try:
        yield fig, list(axes[0])
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def _series(runs: pd.DataFrame, metrics: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Run x epoch table of one run-level metric."""
    rows = metrics[(metrics["metric"] == metric) & (metrics["layer"] == "")
                   & metrics["run_id"].isin(runs["run_id"])]
    return rows.pivot_table(index="run_id", columns="epoch", values="value", aggfunc="last")


def _draw_curves(ax, runs: pd.DataFrame, metrics: pd.DataFrame, vary: str,
                 metric: str) -> None:
    """One line per value of `vary`: the mean over its runs, a min-max band around it."""
    done = done_runs(runs)
    table = _series(done, metrics, metric)
    values = sorted(done[vary].unique())
    drawn = 0
    for color, value in zip(_colors(len(values)), values):
        curves = table.reindex(done.loc[done[vary] == value, "run_id"]).dropna(how="all")
        if curves.empty:
            continue
        epochs = curves.columns.to_numpy()
        ax.plot(epochs, curves.mean().to_numpy(), color=color, lw=1.8,
                label=_curve_label(done, vary, value, len(curves)))
        if len(curves) > 1:
            ax.fill_between(epochs, curves.min().to_numpy(), curves.max().to_numpy(),
                            color=color, alpha=0.2, lw=0)
        drawn += 1
    if not drawn:
        raise RankbiasError(f"no finished run has the metric {metric!r} to plot")
    ax.set_xlabel("epoch")
    ax.set_ylabel(_metric_label(metric))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def legend(ax, title: str | None = None) -> None:
    ax.legend(title=title, fontsize=8, title_fontsize=8, loc="best", framealpha=0.8)


def _param_axis(ax, param: str, values) -> None:
    """Log x for positive lr / wd / B; symlog when 0 is among them; ticks at the values."""
    values = np.asarray(sorted(set(values)), dtype=float)
    positive = values[values > 0]
    base = 2 if param == "batch_size" else 10
    if param in PARAMS and len(positive) and len(positive) < len(values):
        ax.set_xscale("symlog", linthresh=positive.min(), base=base)
    elif param in PARAMS and len(positive):
        ax.set_xscale("log", base=base)
    if len(values) <= 10:
        ax.set_xticks(values)
        ax.set_xticklabels([value_text(v) for v in values])
        ax.minorticks_off()
    ax.set_xlabel(LABELS.get(param, param))


# --- figures ------------------------------------------------------------------------------
def plot_rank_curves(runs: pd.DataFrame, metrics: pd.DataFrame, vary: str,
                     path: str | os.PathLike, metric: str = "avg_rank") -> Path:
    """Average rank vs epoch, one curve per value of `vary` (mean over seeds, min-max band).

    `runs` should differ only in `vary` and seed; other hyperparameters that vary are
    named "mixed" in the title.
    """
    with figure(path) as (fig, (ax,)):
        _draw_curves(ax, runs, metrics, vary, metric)
        _title(ax, f"{_metric_label(metric)} by {LABELS.get(vary, vary)}", runs, vary)
        legend(ax, "mean, band min–max over n seeds")
    return Path(path)


def plot_accuracy_curves(runs: pd.DataFrame, metrics: pd.DataFrame, vary: str,
                         path: str | os.PathLike) -> Path:
    """Train (left) and test (right) accuracy vs epoch, one curve per value of `vary`."""
    with figure(path, ncols=2, width=5.0, sharey=True) as (fig, axes):
        for ax, metric in zip(axes, ("train_acc", "test_acc")):
            _draw_curves(ax, runs, metrics, vary, metric)
            ax.set_title(_metric_label(metric), fontsize=10)
        legend(axes[1], "mean, band min–max over n seeds")
        note, done = _not_drawn(runs), done_runs(runs)
        fig.suptitle(f"accuracy by {LABELS.get(vary, vary)}: {_context(done, vary)}"
                     + (f"; {note}" if note else ""), fontsize=10)
    return Path(path)


def plot_weight_change(runs: pd.DataFrame, metrics: pd.DataFrame, vary: str,
                       path: str | os.PathLike) -> Path:
    """Per-epoch relative weight change ||W_t - W_t-1|| / ||W_t-1|| (mean over layers), log y."""
    with figure(path) as (fig, (ax,)):
        _draw_curves(ax, runs, metrics, vary, "avg_weight_change")
        ax.set_yscale("log")
        _title(ax, f"relative weight change by {LABELS.get(vary, vary)}", runs, vary)
        legend(ax, "mean, band min–max over n seeds")
    return Path(path)


def plot_final_vs_param(runs: pd.DataFrame, param: str, path: str | os.PathLike,
                        metric: str = "final_avg_rank", hue: str | None = None) -> Path:
    """Final average rank (or `metric`) vs a hyperparameter: mean ± std over seeds.

    Dots are the single runs. `hue`: a column whose values get separate lines.
    """
    done = done_runs(runs).dropna(subset=[metric])
    if done.empty:
        raise RankbiasError(f"no finished run has {metric!r} to plot")
    if hue is not None:  # lines in the order of the hue, else of B, lr, wd (text hues)
        numeric = pd.api.types.is_numeric_dtype(done[hue])
        done = done.sort_values(([hue] if numeric else []) + [p for p in PARAMS if p in done])
    groups = [(None, done)] if hue is None else list(done.groupby(hue, sort=False))
    with figure(path) as (fig, (ax,)):
        for color, (value, group) in zip(_colors(len(groups)), groups):
            stats = group.groupby(param)[metric].agg(["mean", "std", "count"]).sort_index()
            n = f"n={stats['count'].min()}" + (f"–{stats['count'].max()}"
                                               if stats["count"].nunique() > 1 else "")
            name = ("mean ± std" if hue is None else value if isinstance(value, str)
                    else f"{short_name(hue)}={value_text(value)}")
            ax.errorbar(stats.index.to_numpy(dtype=float), stats["mean"].to_numpy(),
                        yerr=stats["std"].fillna(0).to_numpy(), color=color, marker="o",
                        capsize=3, lw=1.5, label=f"{name} ({n} seeds)")
            ax.scatter(group[param].astype(float), group[metric], color=color, s=10, alpha=0.4)
        _param_axis(ax, param, done[param])
        ax.set_ylabel(_metric_label(metric))
        ax.grid(alpha=0.3)
        _title(ax, f"{_metric_label(metric)} vs {LABELS.get(param, param)}", runs, param)
        legend(ax, "dots: single runs")
    return Path(path)


def plot_layer_heatmap(metrics: pd.DataFrame, run_id: str, path: str | os.PathLike,
                       metric: str = "rank@0.001", label: str | None = None) -> Path:
    """Per-layer rank (or `metric`) over training of one run: layers x epochs."""
    rows = metrics[(metrics["run_id"] == run_id) & (metrics["metric"] == metric)
                   & (metrics["layer"] != "")]
    if rows.empty:
        raise RankbiasError(f"run {run_id} has no per-layer {metric!r} rows")
    table = rows.pivot_table(index="layer", columns="epoch", values="value", aggfunc="last")
    table = table.reindex(sorted(table.index, key=natural_key))
    height = max(3.0, 0.32 * len(table) + 1.8)
    with figure(path, width=7.0, height=height) as (fig, (ax,)):
        mesh = ax.pcolormesh(table.columns.to_numpy(), np.arange(len(table)), table.to_numpy(),
                             shading="nearest", cmap="viridis")
        middle = (mesh.norm.vmin + mesh.norm.vmax) / 2
        for (i, j), value in np.ndenumerate(table.to_numpy() if table.size <= 300 else []):
            if np.isfinite(value):  # small grids: the number in every cell
                ax.text(table.columns[j], i, f"{value:.0f}", ha="center", va="center",
                        fontsize=6, color="white" if value < middle else "black")
        ax.set_yticks(np.arange(len(table)))
        ax.set_yticklabels(table.index, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("epoch")
        ax.set_ylabel("layer")
        fig.colorbar(mesh, ax=ax, label=metric)
        ax.set_title(f"per-layer {metric} of run {run_id} (one run)"
                     + (f"\n{label}" if label else ""), fontsize=10)
    return Path(path)


def plot_spectra(store: Store | str | os.PathLike, run_ids_by_label: dict[str, str],
                 layer: str, path: str | os.PathLike, tol: float = 1e-3,
                 note: str | None = None) -> Path:
    """End-of-training singular values sigma / ||sigma||_2 of one layer, one curve per label.

    The rank at tolerance `tol` (the paper's measure) is the number of values above the
    dashed line; each curve is one run. `note`: the fixed settings, shown in the title.
    """
    if not run_ids_by_label:
        raise RankbiasError("plot_spectra needs at least one run")
    owned = not isinstance(store, Store)
    store = open_store(store, readonly=True) if owned else store
    try:
        curves = {label: _last_spectrum(store, run_id, layer)
                  for label, run_id in run_ids_by_label.items()}
    finally:
        if owned:
            store.close()
    with figure(path) as (fig, (ax,)):
        for color, (label, (sigma, epoch)) in zip(_colors(len(curves)), curves.items()):
            norm = np.linalg.norm(sigma)
            normed = sigma / norm if norm > 0 else np.zeros_like(sigma)
            rank = rank_from_singular_values(sigma, tol)
            ax.plot(np.arange(1, len(sigma) + 1), normed, color=color, marker=".",
                    label=f"{label} (rank {rank}, epoch {epoch})")
        ax.axhline(tol, color="grey", ls="--", lw=1, label=f"tolerance {tol:g}")
        ax.set_yscale("log")
        ax.set_xlabel("index i of the singular value")
        ax.set_ylabel("σ_i / ||σ||_2")
        ax.grid(alpha=0.3)
        ax.set_title(f"end-of-training spectrum of {layer}\none run per curve"
                     + (f"; {note}" if note else ""), fontsize=10)
        legend(ax)
    return Path(path)


def _last_spectrum(store: Store, run_id: str, layer: str) -> tuple[np.ndarray, int]:
    """The singular values of `layer` at the last recorded step of a run, and its epoch."""
    spectra = {step: sigma for (step, name), sigma in store.spectra(run_id).items()
               if name == layer}
    if not spectra:
        raise RankbiasError(f"run {run_id} has no stored spectrum of layer {layer!r}")
    step = max(spectra)
    return spectra[step], store.epoch_of_step(run_id, step)


def plot_rank_vs_accuracy(runs: pd.DataFrame, path: str | os.PathLike,
                          color_by: str = "batch_size") -> Path:
    """Final average rank (x) vs final test accuracy (y), one colour per value of `color_by`."""
    done = done_runs(runs).dropna(subset=["final_avg_rank", "test_acc"])
    if done.empty:
        raise RankbiasError("no finished run has a final average rank and test accuracy")
    values = sorted(done[color_by].unique())
    hollow = (done["weight_decay"] == 0) & (color_by != "weight_decay")
    with figure(path) as (fig, (ax,)):
        for color, value in zip(_colors(len(values)), values):
            group = done[done[color_by] == value]
            filled, empty = group[~hollow[group.index]], group[hollow[group.index]]
            label = f"{short_name(color_by)}={value_text(value)} (n={len(group)} runs)"
            ax.scatter(filled["final_avg_rank"], filled["test_acc"], s=30, color=color,
                       edgecolor="black", lw=0.5, label=label if len(filled) else None)
            ax.scatter(empty["final_avg_rank"], empty["test_acc"], s=30, facecolor="none",
                       edgecolor=color, lw=1.2, label=None if len(filled) else label)
        ax.set_xlabel("final average rank")
        ax.set_ylabel("final test accuracy")
        ax.grid(alpha=0.3)
        _title(ax, "final average rank vs test accuracy (one dot per run)", runs, color_by)
        legend(ax, "hollow: weight decay 0" if hollow.any() else None)
    return Path(path)
