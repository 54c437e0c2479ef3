"""Figures of transformer runs (claims 16 and 17): the rank of each matrix role over
training, the per-head attention products W_Q^T W_K and W_O W_V over training, and the
timeline of the rank against train and test accuracy (when generalization comes late:
grokking).

    from rankbias.report.transformer_plots import plot_role_curves
    with Store("out/results.db", readonly=True) as store:
        plot_role_curves(store.runs(), store.metrics(), "weight_decay", "roles.png")

The x axis is the SGD step (designs at equal steps compare at equal x). Curves are the
mean over seeds with a min-max band, as in report/plots.py, whose helpers these share.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from rankbias.metrics.tracker import avg_product_metric, product_rank_metric
from rankbias.report.plots import (
    LABELS,
    _colors,
    _context,
    _curve_label,
    _not_drawn,
    done_runs,
    figure,
    legend,
)
from rankbias.report.roles import ROLE_LABELS, role_ranks
from rankbias.utils import RankbiasError

KINDS = {"qk": "W_Q^h^T W_K^h (per head)", "ov": "W_O^h W_V^h (per head)"}


def _tolerance(runs: pd.DataFrame, tol: float | None) -> float:
    """`tol`, or the first tolerance the runs tracked."""
    if tol is not None:
        return tol
    lists = [t for t in runs["tolerances"] if t] if "tolerances" in runs else []
    return float(lists[0][0]) if lists else 1e-3


def _runs_of(table: pd.DataFrame, run_ids) -> pd.DataFrame:
    """The rows of `run_ids` in a run x step table, without the steps none of them tracked
    (runs of another B track at other steps)."""
    return table.reindex(run_ids).dropna(how="all").dropna(axis=1, how="all")


def _band(ax, table: pd.DataFrame, color, label: str | None, lw: float = 1.8) -> None:
    """The mean over the rows of a run x step table, with its min-max band."""
    steps = table.columns.to_numpy(dtype=float)
    ax.plot(steps, table.mean().to_numpy(), color=color, lw=lw, label=label)
    if len(table) > 1:
        ax.fill_between(steps, table.min().to_numpy(), table.max().to_numpy(), color=color,
                        alpha=0.2, lw=0)


def _suptitle(fig, head: str, runs: pd.DataFrame, vary: str) -> None:
    note = _not_drawn(runs)
    fig.suptitle(f"{head} by {LABELS.get(vary, vary)}: {_context(done_runs(runs), vary)}"
                 + (f"; {note}" if note else ""), fontsize=10)


def plot_role_curves(runs: pd.DataFrame, metrics: pd.DataFrame, vary: str,
                     path: str | os.PathLike, tol: float | None = None) -> Path:
    """One panel per matrix role (W_Q, W_K, W_V, W_O, MLP in, MLP out): the mean rank of
    that role's matrices over training, one curve per value of `vary`."""
    done = done_runs(runs)
    tol = _tolerance(done, tol)
    frame = role_ranks(metrics[metrics["run_id"].isin(done["run_id"])], tol)
    if frame.empty:
        raise RankbiasError("no finished run has matrices of a transformer role")
    roles = [r for r in ROLE_LABELS if r in set(frame["role"])]
    values = sorted(done[vary].unique())
    with figure(path, ncols=len(roles), width=3.4, height=3.4, sharey=True) as (fig, axes):
        for ax, role in zip(axes, roles):
            table = frame[frame["role"] == role].pivot_table(index="run_id", columns="step",
                                                             values="value", observed=True)
            for color, value in zip(_colors(len(values)), values):
                curves = _runs_of(table, done.loc[done[vary] == value, "run_id"])
                if len(curves):
                    _band(ax, curves, color, _curve_label(done, vary, value, len(curves)))
            ax.set_title(ROLE_LABELS[role], fontsize=10)
            ax.set_xlabel("SGD step")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"mean rank@{tol:g} of the role's matrices")
        legend(axes[-1], "mean, band min–max")
        _suptitle(fig, "rank per matrix role", runs, vary)
    return Path(path)


def plot_product_curves(runs: pd.DataFrame, metrics: pd.DataFrame, vary: str,
                        path: str | os.PathLike, tol: float | None = None) -> Path:
    """Two panels, W_Q^T W_K and W_O W_V: per value of `vary`, the mean over heads and
    seeds of the products' rank over training (thick, min-max band over seeds) and every
    head of its first seed's run (thin)."""
    done = done_runs(runs)
    tol = _tolerance(done, tol)
    values = sorted(done[vary].unique())
    mine = metrics[metrics["run_id"].isin(done["run_id"])]
    with figure(path, ncols=2, width=5.0, sharey=True) as (fig, axes):
        drawn = 0
        for ax, (kind, label) in zip(axes, KINDS.items()):
            means = mine[(mine["layer"] == "") & (mine["metric"] == avg_product_metric(kind,
                                                                                        tol))]
            heads = mine[mine["layer"].str.endswith(f".{kind}")
                         & (mine["metric"] == product_rank_metric(tol))]
            table = means.pivot_table(index="run_id", columns="step", values="value")
            for color, value in zip(_colors(len(values)), values):
                setting = done[done[vary] == value].sort_values("seed")
                curves = _runs_of(table, setting["run_id"])
                if curves.empty:
                    continue
                _band(ax, curves, color, _curve_label(done, vary, value, len(curves)))
                first = heads[heads["run_id"] == setting["run_id"].iloc[0]]
                for _, head in first.groupby("layer"):
                    ax.plot(head["step"], head["value"], color=color, lw=0.6, alpha=0.5)
                drawn += 1
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("SGD step")
            ax.grid(alpha=0.3)
        if not drawn:
            raise RankbiasError("no finished run has attention products to plot")
        axes[0].set_ylabel(f"rank@{tol:g} of the product")
        legend(axes[1], "thick: mean over heads and seeds; thin: each head, first seed")
        _suptitle(fig, "attention products", runs, vary)
    return Path(path)


def plot_timeline(runs: pd.DataFrame, metrics: pd.DataFrame, vary: str,
                  path: str | os.PathLike, acc: float = 0.9) -> Path:
    """One panel per value of `vary`: train and test accuracy (left axis) and the average
    rank and the products' mean ranks, each as a share of its initial value (right axis),
    over training, means over seeds; dotted lines where train and test accuracy first
    reach `acc` (the mean curves). A test accuracy that rises long after the train accuracy
    is grokking; the figure shows whether the rank falls before, with or after it."""
    done = done_runs(runs)
    values = sorted(done[vary].unique())
    if not values:
        raise RankbiasError("no finished run to draw a timeline of")
    series = {m: metrics[(metrics["layer"] == "") & (metrics["metric"] == m)]
              .pivot_table(index="run_id", columns="step", values="value")
              for m in ("train_acc", "test_acc", "avg_rank", "avg_qk_rank", "avg_ov_rank")}
    styles = {"train_acc": ("tab:blue", "-"), "test_acc": ("tab:orange", "-"),
              "avg_rank": ("black", "--"), "avg_qk_rank": ("tab:green", "--"),
              "avg_ov_rank": ("tab:purple", "--")}
    with figure(path, ncols=len(values), width=4.2, height=3.6) as (fig, axes):
        for ax, value in zip(axes, values):
            ids = done.loc[done[vary] == value, "run_id"]
            twin = ax.twinx()
            for metric, table in series.items():
                curves = _runs_of(table, ids)
                if curves.empty:
                    continue
                rank = metric.startswith("avg_")
                if rank:  # a share of the initial value: the three ranks on one axis
                    curves = curves.div(curves.iloc[:, 0], axis=0)
                color, style = styles[metric]
                target = twin if rank else ax
                target.plot(curves.columns, curves.mean().to_numpy(), color=color, ls=style,
                            lw=1.5, label=metric + (" / initial" if rank else ""))
                if not rank:
                    reached = np.flatnonzero(curves.mean().to_numpy() >= acc)
                    if len(reached):
                        ax.axvline(curves.columns[reached[0]], color=color, ls=":", lw=1)
            ax.set_ylim(-0.02, 1.02)
            twin.set_ylim(0, 1.05)
            ax.set_title(f"{_curve_label(done, vary, value, len(ids))}", fontsize=9)
            ax.set_xlabel("SGD step")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("accuracy (solid)")
        twin.set_ylabel("rank / its initial value (dashed)")
        handles = [h for a in (axes[-1], twin) for h in a.get_legend_handles_labels()[0]]
        axes[-1].legend(handles=handles, fontsize=7, loc="lower left", framealpha=0.8)
        _suptitle(fig, f"accuracy and rank over training (dotted: accuracy first >= {acc:g})",
                  runs, vary)
    return Path(path)
