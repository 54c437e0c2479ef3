"""Figures and a self-contained HTML report of a results store.

    rankbias report --store results.db --out report/

    from rankbias.report import plot_rank_curves, report_store
    with Store("results.db") as store:
        runs, metrics = store.runs(), store.metrics()
    plot_rank_curves(runs, metrics, "batch_size", "rank_by_B.png")
    report_store("results.db", "report/")           # every standard figure + report.html

Figures draw finished ("done") runs only; diverged, failed and unfinished runs are
counted in the title. Curves are the mean over seeds with a min-max band (the authors'
style) and every legend entry gives its number of runs n. Figure functions take the
DataFrames of `Store.runs()` / `Store.metrics()`, write one PNG, close the figure and
return the path.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window: set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from rankbias.config import RunConfig  # noqa: E402
from rankbias.store import Store, open_store  # noqa: E402
from rankbias.utils import (  # noqa: E402
    RankbiasError,
    atomic_path,
    code_version,
    library_versions,
)

PARAMS = ("batch_size", "lr", "weight_decay")  # the knobs of Theorem 3.4
SHORT = {"batch_size": "B", "lr": "lr", "weight_decay": "wd"}
LABELS = {"batch_size": "batch size B", "lr": "learning rate μ",
          "weight_decay": "weight decay wd (PyTorch, = 2λ)"}
EXPECTED = {  # what Theorem 3.4 predicts (bound = m B log(2/eps) / (lr * wd))
    "batch_size": "Theorem 3.4: smaller B, lower rank (bound grows linearly in B).",
    "lr": "Theorem 3.4: larger learning rate, lower rank (bound falls like 1/lr).",
    "weight_decay": "Theorem 3.4: larger weight decay, lower rank; no low-rank bias at wd = 0 "
                    "(the bound is infinite there).",
}
METRIC_LABELS = {"avg_rank": "average rank", "final_avg_rank": "final average rank",
                 "avg_weight_change": "relative weight change per epoch",
                 "train_acc": "train accuracy", "test_acc": "test accuracy"}
# Config fields that do not change a run's numbers: experiments are not split by them.
NOT_IDENTITY = ("device", "checkpoint_every", "seed")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VERDICT_COLORS = {"pass": "#2e7d32", "fail": "#c62828", "inconclusive": "#b26a00"}
SECTION_KEYS = {"title", "text", "images", "table", "verdict"}


# --- small helpers ----------------------------------------------------------------------
def _fmt(value) -> str:
    """A config value as short text: 0.005, 16, depth=3 width=32."""
    if isinstance(value, dict):
        return " ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, (float, np.floating)):
        return f"{value:g}"
    return str(value)


def _name(column: str) -> str:
    return SHORT.get(column, column)


def _metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def _natural(text: str) -> list:
    """Sort key that puts blocks.2 before blocks.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _colors(n: int) -> np.ndarray:
    return plt.cm.viridis(np.linspace(0.0, 0.85, max(n, 1)))


def _done(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "done"]


def _not_drawn(runs: pd.DataFrame) -> str:
    """'2 diverged, 1 failed not drawn', or '' when every run is drawn."""
    counts = runs.loc[runs["status"] != "done", "status"].value_counts()
    if counts.empty:
        return ""
    return ", ".join(f"{n} {status}" for status, n in counts.items()) + " not drawn"


def _tied(runs: pd.DataFrame, a: str, b: str) -> bool:
    """Whether two varying columns determine each other (a zip, e.g. constant lr * wd)."""
    return (runs[a].nunique() > 1 and runs[b].nunique() > 1
            and runs.groupby(a)[b].nunique().max() == 1
            and runs.groupby(b)[a].nunique().max() == 1)


def _context(runs: pd.DataFrame, vary: str | None) -> str:
    """The fixed settings of a figure ('mlp on digits, lr=0.1, wd=0.005').

    Hyperparameters that vary within a curve are named "mixed"; those tied to `vary`
    are in the legend instead.
    """
    parts = [" / ".join(sorted({_fmt(v) for v in runs[c]})) for c in ("model", "dataset")
             if c in runs]
    text = " on ".join(parts)
    for param in PARAMS:
        if param == vary or param not in runs or vary and _tied(runs, vary, param):
            continue
        values = sorted(runs[param].unique())
        text += f", {_name(param)}={_fmt(values[0])}" if len(values) == 1 else \
            f", {_name(param)} mixed"
    return text


def _curve_label(runs: pd.DataFrame, vary: str, value, n: int) -> str:
    """'wd=0.01 (n=3)', with the hyperparameters tied to `vary`: 'wd=0.01, lr=0.2 (n=3)'."""
    tied = [p for p in PARAMS if p != vary and p in runs and _tied(runs, vary, p)]
    return f"{_setting_of(runs[runs[vary] == value].iloc[0], [vary, *tied])} (n={n})"


def _title(ax, head: str, runs: pd.DataFrame, vary: str | None) -> None:
    done = _done(runs)
    note = _not_drawn(runs)
    runs = done if len(done) else runs
    ax.set_title(f"{head}\n{_context(runs, vary)}" + (f"; {note}" if note else ""),
                 fontsize=10)


@contextlib.contextmanager
def _figure(path: str | os.PathLike, ncols: int = 1, width: float = 6.4,
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
    done = _done(runs)
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


def _legend(ax, title: str | None = None) -> None:
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
        ax.set_xticklabels([_fmt(v) for v in values])
        ax.minorticks_off()
    ax.set_xlabel(LABELS.get(param, param))


# --- figures ------------------------------------------------------------------------------
def plot_rank_curves(runs: pd.DataFrame, metrics: pd.DataFrame, vary: str,
                     path: str | os.PathLike, metric: str = "avg_rank") -> Path:
    """Average rank vs epoch, one curve per value of `vary` (mean over seeds, min-max band).

    `runs` should differ only in `vary` and seed; other hyperparameters that vary are
    named "mixed" in the title.
    """
    with _figure(path) as (fig, (ax,)):
        _draw_curves(ax, runs, metrics, vary, metric)
        _title(ax, f"{_metric_label(metric)} by {LABELS.get(vary, vary)}", runs, vary)
        _legend(ax, "mean, band min–max over n seeds")
    return Path(path)


def plot_accuracy_curves(runs: pd.DataFrame, metrics: pd.DataFrame, vary: str,
                         path: str | os.PathLike) -> Path:
    """Train (left) and test (right) accuracy vs epoch, one curve per value of `vary`."""
    with _figure(path, ncols=2, width=5.0, sharey=True) as (fig, axes):
        for ax, metric in zip(axes, ("train_acc", "test_acc")):
            _draw_curves(ax, runs, metrics, vary, metric)
            ax.set_title(_metric_label(metric), fontsize=10)
        _legend(axes[1], "mean, band min–max over n seeds")
        note, done = _not_drawn(runs), _done(runs)
        fig.suptitle(f"accuracy by {LABELS.get(vary, vary)}: {_context(done, vary)}"
                     + (f"; {note}" if note else ""), fontsize=10)
    return Path(path)


def plot_weight_change(runs: pd.DataFrame, metrics: pd.DataFrame, vary: str,
                       path: str | os.PathLike) -> Path:
    """Per-epoch relative weight change ||W_t - W_t-1|| / ||W_t-1|| (mean over layers), log y."""
    with _figure(path) as (fig, (ax,)):
        _draw_curves(ax, runs, metrics, vary, "avg_weight_change")
        ax.set_yscale("log")
        _title(ax, f"relative weight change by {LABELS.get(vary, vary)}", runs, vary)
        _legend(ax, "mean, band min–max over n seeds")
    return Path(path)


def plot_final_vs_param(runs: pd.DataFrame, param: str, path: str | os.PathLike,
                        metric: str = "final_avg_rank", hue: str | None = None) -> Path:
    """Final average rank (or `metric`) vs a hyperparameter: mean ± std over seeds.

    Dots are the single runs. `hue`: a column whose values get separate lines.
    """
    done = _done(runs).dropna(subset=[metric])
    if done.empty:
        raise RankbiasError(f"no finished run has {metric!r} to plot")
    if hue is not None:  # lines in the order of the hue, else of B, lr, wd (text hues)
        numeric = pd.api.types.is_numeric_dtype(done[hue])
        done = done.sort_values(([hue] if numeric else []) + [p for p in PARAMS if p in done])
    groups = [(None, done)] if hue is None else list(done.groupby(hue, sort=False))
    with _figure(path) as (fig, (ax,)):
        for color, (value, group) in zip(_colors(len(groups)), groups):
            stats = group.groupby(param)[metric].agg(["mean", "std", "count"]).sort_index()
            n = f"n={stats['count'].min()}" + (f"–{stats['count'].max()}"
                                               if stats["count"].nunique() > 1 else "")
            name = ("mean ± std" if hue is None else value if isinstance(value, str)
                    else f"{_name(hue)}={_fmt(value)}")
            ax.errorbar(stats.index.to_numpy(dtype=float), stats["mean"].to_numpy(),
                        yerr=stats["std"].fillna(0).to_numpy(), color=color, marker="o",
                        capsize=3, lw=1.5, label=f"{name} ({n} seeds)")
            ax.scatter(group[param].astype(float), group[metric], color=color, s=10, alpha=0.4)
        _param_axis(ax, param, done[param])
        ax.set_ylabel(_metric_label(metric))
        ax.grid(alpha=0.3)
        _title(ax, f"{_metric_label(metric)} vs {LABELS.get(param, param)}", runs, param)
        _legend(ax, "dots: single runs")
    return Path(path)


def plot_layer_heatmap(metrics: pd.DataFrame, run_id: str, path: str | os.PathLike,
                       metric: str = "rank@0.001", label: str | None = None) -> Path:
    """Per-layer rank (or `metric`) over training of one run: layers x epochs."""
    rows = metrics[(metrics["run_id"] == run_id) & (metrics["metric"] == metric)
                   & (metrics["layer"] != "")]
    if rows.empty:
        raise RankbiasError(f"run {run_id} has no per-layer {metric!r} rows")
    table = rows.pivot_table(index="layer", columns="epoch", values="value", aggfunc="last")
    table = table.reindex(sorted(table.index, key=_natural))
    height = max(3.0, 0.32 * len(table) + 1.8)
    with _figure(path, width=7.0, height=height) as (fig, (ax,)):
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
    store = open_store(store, must_exist=True) if owned else store
    try:
        curves = {label: _last_spectrum(store, run_id, layer)
                  for label, run_id in run_ids_by_label.items()}
    finally:
        if owned:
            store.close()
    with _figure(path) as (fig, (ax,)):
        for color, (label, (sigma, epoch)) in zip(_colors(len(curves)), curves.items()):
            norm = np.linalg.norm(sigma)
            normed = sigma / norm if norm > 0 else np.zeros_like(sigma)
            rank = int((normed > tol).sum())
            ax.plot(np.arange(1, len(sigma) + 1), normed, color=color, marker=".",
                    label=f"{label} (rank {rank}, epoch {epoch})")
        ax.axhline(tol, color="grey", ls="--", lw=1, label=f"tolerance {tol:g}")
        ax.set_yscale("log")
        ax.set_xlabel("index i of the singular value")
        ax.set_ylabel("σ_i / ||σ||_2")
        ax.grid(alpha=0.3)
        ax.set_title(f"end-of-training spectrum of {layer}\none run per curve"
                     + (f"; {note}" if note else ""), fontsize=10)
        _legend(ax)
    return Path(path)


def _last_spectrum(store: Store, run_id: str, layer: str) -> tuple[np.ndarray, int]:
    """The singular values of `layer` at the last recorded step of a run, and its epoch."""
    spectra = {step: sigma for (step, name), sigma in store.spectra(run_id).items()
               if name == layer}
    if not spectra:
        raise RankbiasError(f"run {run_id} has no stored spectrum of layer {layer!r}")
    step = max(spectra)
    epoch = store.db.execute("SELECT MAX(epoch) FROM spectra WHERE run_id=? AND step=?",
                             (run_id, step)).fetchone()[0]
    return spectra[step], epoch


def plot_rank_vs_accuracy(runs: pd.DataFrame, path: str | os.PathLike,
                          color_by: str = "batch_size") -> Path:
    """Final average rank (x) vs final test accuracy (y), one colour per value of `color_by`."""
    done = _done(runs).dropna(subset=["final_avg_rank", "test_acc"])
    if done.empty:
        raise RankbiasError("no finished run has a final average rank and test accuracy")
    values = sorted(done[color_by].unique())
    hollow = (done["weight_decay"] == 0) & (color_by != "weight_decay")
    with _figure(path) as (fig, (ax,)):
        for color, value in zip(_colors(len(values)), values):
            group = done[done[color_by] == value]
            filled, empty = group[~hollow[group.index]], group[hollow[group.index]]
            label = f"{_name(color_by)}={_fmt(value)} (n={len(group)} runs)"
            ax.scatter(filled["final_avg_rank"], filled["test_acc"], s=30, color=color,
                       edgecolor="black", lw=0.5, label=label if len(filled) else None)
            ax.scatter(empty["final_avg_rank"], empty["test_acc"], s=30, facecolor="none",
                       edgecolor=color, lw=1.2, label=None if len(filled) else label)
        ax.set_xlabel("final average rank")
        ax.set_ylabel("final test accuracy")
        ax.grid(alpha=0.3)
        _title(ax, "final average rank vs test accuracy (one dot per run)", runs, color_by)
        _legend(ax, "hollow: weight decay 0" if hollow.any() else None)
    return Path(path)



def plot_residual(rows: list[dict], path: str | os.PathLike) -> Path:
    """Theorem 3.4 over the last k steps: the residual ||W_T/||W_T|| - U_k|| and its bound
    (equal, by Lemma 3.2), against the distance to the best approximation of the same rank
    as U_k; and rank(U_k) against the k*B of the theorem. Median over matrices."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        raise RankbiasError("no residual rows to draw")
    per_k = frame.groupby("k")[["actual", "bound", "best_rank_distance", "rank_uk",
                                "rank_limit"]].median()
    with _figure(path, ncols=2) as (fig, (left, right)):
        left.plot(per_k.index, per_k["bound"], "o-", label="bound (1-μ·wd)^k ||W_{T-k}||/||W_T||")
        left.plot(per_k.index, per_k["actual"], "x--", label="actual ||W_T/||W_T|| - U_k||")
        left.plot(per_k.index, per_k["best_rank_distance"], "s:",
                  label="best approximation of rank(U_k)")
        left.set_yscale("log")
        left.set_xscale("log", base=2)
        left.set_xlabel("k (steps unrolled)")
        left.set_ylabel("distance (median over matrices)")
        left.set_title(f"Theorem 3.4 residual ({frame.layer.nunique()} matrices)")
        _legend(left)
        right.plot(per_k.index, per_k["rank_uk"], "o-", label="rank(U_k)")
        right.plot(per_k.index, per_k["rank_limit"], "k--", label="k·B (Lemma 3.1 and 3.2)")
        right.set_xscale("log", base=2)
        right.set_yscale("log", base=2)
        right.set_xlabel("k (steps unrolled)")
        right.set_ylabel("rank")
        right.set_title("rank of the truncated sum U_k")
        _legend(right)
    return Path(path)

# --- HTML -----------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.4}
header{border-bottom:1px solid #ccc;margin-bottom:1em}
.meta{color:#555;font-size:.9em}
section{border-top:1px solid #eee;padding-top:.5em;margin-top:1.5em}
.text{white-space:pre-wrap}
figure{display:inline-block;margin:.5em}
img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.8em;color:#666}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3}
.badge{color:#fff;border-radius:4px;padding:1px 8px;font-size:.75em;vertical-align:middle}
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _badge(verdict: str | None) -> str:
    if verdict is None:
        return ""
    if verdict not in VERDICT_COLORS:
        raise RankbiasError(f"verdict must be one of {', '.join(VERDICT_COLORS)}, "
                            f"got {verdict!r}")
    return (f'<span class="badge verdict-{verdict}" '
            f'style="background:{VERDICT_COLORS[verdict]}">{verdict}</span>')


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return _esc(f"{value:.4g}")
    return _esc(value)


def _table_html(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image_html(path: str | os.PathLike) -> str:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RankbiasError(f"cannot read image {path}: {err.strerror}") from err
    if not data.startswith(PNG_MAGIC):
        raise RankbiasError(f"{path} is not a PNG file")
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="{uri}" alt="{_esc(path.name)}">'
            f"<figcaption>{_esc(path.name)}</figcaption></figure>")


def _section_html(index: int, section: dict) -> str:
    unknown = set(section) - SECTION_KEYS
    if unknown or "title" not in section:
        raise RankbiasError(f"a report section needs a title and may only have "
                            f"{', '.join(sorted(SECTION_KEYS))}; got {sorted(section)}")
    parts = [f'<section id="s{index}"><h2>{_esc(section["title"])} '
             f'{_badge(section.get("verdict"))}</h2>']
    if section.get("text"):
        parts.append(f'<p class="text">{_esc(section["text"])}</p>')
    if section.get("table"):
        parts.append(_table_html(section["table"]))
    parts += [_image_html(image) for image in section.get("images") or []]
    return "\n".join(parts) + "</section>"


def _header_html(title: str) -> str:
    import matplotlib as mpl

    versions = {**library_versions(), "pandas": pd.__version__, "matplotlib": mpl.__version__}
    libs = ", ".join(f"{k} {v}" for k, v in versions.items())
    return (f"<header><h1>{_esc(title)}</h1><p class='meta'>generated "
            f"{_esc(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} by rankbias "
            f"{_esc(code_version())}<br>{_esc(libs)}</p></header>")


def _toc_html(sections: list[dict]) -> str:
    items = "".join(f'<li><a href="#s{i}">{_esc(s.get("title", ""))}</a> '
                    f'{_badge(s.get("verdict"))}</li>' for i, s in enumerate(sections))
    return f"<nav><ol>{items}</ol></nav>"


def write_html(path: str | os.PathLike, title: str, sections: list[dict]) -> Path:
    """Write a self-contained HTML page (images embedded as base64 data URIs), atomically.

    Each section: {"title", "text" (plain text), "images" (PNG paths), "table" (list of
    dict rows), "verdict" ("pass" | "fail" | "inconclusive")}; all but title optional.
    """
    body = "\n".join(_section_html(i, s) for i, s in enumerate(sections))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n"
            f"{_header_html(title)}\n{_toc_html(sections)}\n{body}\n</body></html>\n")
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(path)


# --- the report of a store ----------------------------------------------------------------
def _key(runs: pd.DataFrame, columns: list[str]) -> pd.Series:
    """One hashable text per run of the values of `columns` (dicts and lists included)."""
    return runs[columns].apply(lambda row: json.dumps(row.tolist(), default=str), axis=1)


def _experiments(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Runs grouped by every config field except B, lr, wd and seed; each with a label."""
    fields = [f for f in RunConfig.field_names()
              if f in runs.columns and f not in PARAMS + NOT_IDENTITY]
    keys = _key(runs, fields)
    groups = [runs[keys == key] for key in dict.fromkeys(keys)]
    differing = [f for f in fields if _key(runs, [f]).nunique() > 1]
    return [(_describe(group, differing), group) for group in groups]


def _describe(runs: pd.DataFrame, differing: list[str]) -> str:
    row = runs.iloc[0]
    text = f"{row['model']} ({_fmt(row['model_args']) or 'defaults'}) on {row['dataset']}"
    if row["dataset_args"]:
        text += f" ({_fmt(row['dataset_args'])})"
    text += f", {row['epochs']} epochs"
    extra = [f"{f}={_fmt(row[f])}" for f in differing
             if f not in ("model", "model_args", "dataset", "dataset_args", "epochs")]
    return text + (f", {', '.join(extra)}" if extra else "")


def _setting_of(row: pd.Series, params: list[str]) -> str:
    """'B=16, wd=0.005': the values of `params` in one run."""
    return ", ".join(f"{_name(p)}={_fmt(row[p])}" for p in params) or "all runs"


def _setting(runs: pd.DataFrame, params: list[str]) -> str:
    return _setting_of(runs.iloc[0], params)


def _others(runs: pd.DataFrame, vary: str) -> list[str]:
    """The hyperparameters to hold fixed while `vary` varies: not those tied to it (zip)."""
    done = _done(runs)
    return [p for p in PARAMS if p != vary and not _tied(done, vary, p)]


def _groups(runs: pd.DataFrame, vary: str) -> list[tuple[str, pd.DataFrame]]:
    """Runs of one experiment grouped by the other hyperparameters, where `vary` varies.

    With no such group (an irregular design) all runs form one group.
    """
    others = _others(runs, vary)
    keys = _key(runs, others)
    groups = [runs[keys == key] for key in dict.fromkeys(keys)]
    found = [(_setting(g, others), g) for g in groups if _done(g)[vary].nunique() > 1]
    return found or [("other hyperparameters mixed", runs)]


def _strength(runs: pd.DataFrame) -> float:
    """lr * wd / B: the larger, the stronger the predicted bias (Theorem 3.4)."""
    done = _done(runs)
    return float((done["lr"] * done["weight_decay"] / done["batch_size"]).mean())


def _summary_table(runs: pd.DataFrame) -> list[dict]:
    """One row per (B, lr, wd): runs by status, rank and accuracy mean ± std over seeds."""
    rows = []
    for values, group in runs.groupby(list(PARAMS), sort=True):
        done = _done(group)
        row = {_name(p): v for p, v in zip(PARAMS, values)}
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
    varied = [p for p in PARAMS if _done(exp)[p].nunique() > 1]
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
        others = [p for p in _others(exp, param) if _done(exp)[p].nunique() > 1]
        hued = exp.assign(setting=exp.apply(_setting_of, axis=1, args=(others,)))
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
    done = _done(exp)
    best = done.loc[done["final_avg_rank"].astype(float).idxmin()] \
        if done["final_avg_rank"].notna().any() else done.iloc[0]
    tol = float((best["tolerances"] or [1e-3])[0])
    layer_rows = store.metrics(run_ids=[best["run_id"]], metrics=[f"rank@{tol:g}"])
    images = draw(f"{tag}-heatmap.png", plot_layer_heatmap, layer_rows, best["run_id"],
                  metric=f"rank@{tol:g}",
                  label=f"{_setting_of(best, list(PARAMS))}, seed {best['seed']}")
    varied = [p for p in PARAMS if done[p].nunique() > 1]
    param = "batch_size" if "batch_size" in varied else (varied[0] if varied else None)
    text = "Heatmap: the run with the lowest final average rank."
    if param:
        setting, group = max(_groups(exp, param), key=lambda item: _strength(item[1]))
        first = _done(group).sort_values("seed").drop_duplicates(param).sort_values(param)
        by_label = {f"{_name(param)}={_fmt(r[param])}": r["run_id"] for _, r in first.iterrows()}
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
                     key=_natural)
    return longest[(len(longest) - 1) // 2]


def report_store(store_path: str | os.PathLike, out_dir: str | os.PathLike,
                 progress: bool = True, max_groups: int = 4) -> Path:
    """Draw the standard figures of every experiment in a store; write OUT/report.html,
    the interactive explorer (rankbias.explorer) with these figures in its last section.

    Runs are grouped into experiments by every config field except batch size, learning
    rate, weight decay and seed. For each hyperparameter that varies in an experiment:
    rank, accuracy and weight-change curves per group of the other two (at most
    `max_groups` groups) and one final-rank-vs-parameter figure; then a per-layer
    heatmap, spectra per batch size and rank vs test accuracy. Returns the HTML path.
    """
    with open_store(store_path, must_exist=True) as store:
        runs = store.runs()
        if not (runs["status"] == "done").any():
            what = ", ".join(f"{n} {s}" for s, n in runs["status"].value_counts().items())
            raise RankbiasError(f"{store_path} has no finished runs ({what or 'empty'}): run "
                                "`rankbias sweep` or `rankbias train` with this --store first")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        metrics = store.metrics(run_ids=_done(runs)["run_id"], layer="")
        draw = _Drawer(out, progress)
        sections = [_runs_section(runs, str(store_path))]
        for i, (label, exp) in enumerate(_experiments(runs)):
            if _done(exp).empty:
                continue
            sections.append({"title": f"{label}: summary", "table": _summary_table(exp),
                             "text": "One row per (B, lr, wd); ranks and accuracy: mean ± std "
                                     "over the done seeds."})
            sections += _curve_sections(exp, metrics, f"e{i}", label, draw, max_groups)
            sections.append(_detail_section(store, exp, f"e{i}", label, draw))
    if draw.notes:
        sections.append({"title": "Figures not drawn", "text": "\n".join(draw.notes)})
    title = f"rankbias report: {Path(store_path).name}"
    from rankbias.explorer import write_explorer  # imported here: it uses this module

    return write_explorer(out / "report.html", store_path, title, figures=sections)


__all__ = ["plot_accuracy_curves", "plot_final_vs_param", "plot_layer_heatmap",
           "plot_rank_curves", "plot_rank_vs_accuracy", "plot_spectra", "plot_weight_change",
           "report_store", "write_html"]
