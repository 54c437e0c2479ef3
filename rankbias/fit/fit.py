"""A fitted rank law: predict the final rank of a new (B, lr, wd) from a store's runs.

    rankbias fit --store results.db [--by model|model,dataset] [--per-layer]
                 [--format text|json] [--figure fit.png]
    rankbias predict --model mlp --batch-size 16 --lr 0.5 --weight-decay 0.02 --store results.db

    from rankbias.fit.fit import fit_store, predict
    from rankbias.fit.law import fit_law
    law = fit_law(x, rank, r_max)                  # numpy arrays, one entry per run
    result = fit_store("results.db")               # FitResult: .fits, .skipped, .excluded

Theorem 3.4 gives a *scale*, not a number: the rank bound is x * log(2/eps) with

    x = B * m / (mu * wd)        (m patches per example: 1 for Linear, output positions of a conv;
                                  mu = the configured (initial) learning rate; wd = PyTorch's
                                  weight_decay = 2*lambda)

and it is vacuous at most real settings. Here the measured final eps-rank is fitted as

    rank = min(r_max, a * x^b)

where r_max is the largest rank the matrix can have, known from the model: min(out, in) of a
matrix (a conv kernel reshaped to out x in*k*k); for the model-level fit, the mean of that
over the hidden matrices (the paper's "average rank" selection), with x = B * (mean m) /
(mu * wd). The model-level fit is named layer "average".

Which runs. Finished ("done") plain-SGD runs, the law is for plain SGD only: optimizer "sgd"
or absent, momentum 0; weight decay > 0 (at wd = 0 there is no bias and x is infinite);
final train accuracy > 0.15 (the authors' divergence rule); a positive final rank. Runs are
grouped by model (its name and options; `--by model,dataset` also splits by data set) AND
by training recipe (epochs, schedule, loss, tolerances and every other config field that
changes the numbers, except B, lr, wd and seed): a law fitted on 30-epoch runs says nothing
about 2-epoch runs. A group needs runs at >= 3 settings; smaller groups are listed as skipped.

How the law is fitted (saturated points included) and judged: rankbias/fit/law.py. This
module: the runs of a store, their groups, the report,
the figure and `predict`.

JSON fields of `rankbias fit --format json` (`{"fits": [...], "skipped": [...],
"excluded": {...}, "law": ..., "loo": ...}`), per fit:
- model, model_args (options that differ from the defaults), datasets, recipe (the config
  fields that define the group), layer ("average" or a matrix name);
- a, b: the law; knee_x: where a x^b reaches r_max (null when b <= 0);
- r2: in-sample coefficient of determination of log rank over all runs of the fit, the
  ceiling included (null when every run has the same rank);
- loo_error: leave-one-SETTING-out error in rank units: for each setting (B, lr, wd on one
  data set), all its seeds are left out, the law (knee included) is refitted on the other
  settings, and its prediction is compared with the setting's mean measured rank; the RMS of
  these errors over settings. null when a refit is impossible (x takes one value without it);
- loo_log_sd: RMS over held-out runs of log(measured rank / LOO prediction): the spread of
  one new run around the law, used for `predict`'s interval;
- n_runs, n_settings, n_saturated (settings where the fitted law is at r_max);
- x_range [min, max] of the fitted x; r_max; patches (the m used: mean over matrices for the
  average fit); tol (the rank tolerance eps);
- settings: per setting its B, lr, wd, data set, x, n_runs, mean measured rank and the LOO
  prediction (its own runs not used).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rankbias.fit.law import Fit, fit_points
from rankbias.metrics.tracker import rank_metric
from rankbias.runs.store import open_store
from rankbias.training.collapse import COLLAPSED_ACC, learned
from rankbias.training.config import RunConfig
from rankbias.utils import RankbiasError, atomic_path, plain, text_table, to_json

AVERAGE = "average"  # the layer name of the model-level (average rank) fit
MIN_SETTINGS = 3  # fewer cannot be checked: each leave-one-out refit needs >= 2 settings
Z = 2.0  # predict's interval: LOO log spread x 2, ~95% if the residuals were normal
BY = ("model", "model,dataset")  # a model is its name and options; a data set, name and options
# Config fields that are not part of the training recipe: the law's inputs (B, lr, wd), the
# seed, the grouping fields, and fields that do not change a run's numbers.
NOT_RECIPE = ("batch_size", "lr", "weight_decay", "seed", "model", "model_args", "dataset",
              "dataset_args", "device", "checkpoint_every", "track_every", "early_stop",
              "track_gradient_rank", "gradient_rank_steps")
LAW = "rank = min(r_max, a * x^b), x = B*m/(lr*wd)"
LOO = ("loo_error: RMS over settings of (LOO prediction - mean measured rank), each setting "
       "(B, lr, wd) left out with all its seeds and the law refitted without it")


# --- runs of a store --------------------------------------------------------------------
def eligible_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """The runs a law is fitted on, and how many were left out for each reason."""
    runs = runs.copy()
    for name, default in RunConfig().to_dict().items():  # stores from older versions
        if name not in runs:
            runs[name] = [default] * len(runs)
    optimizer = runs["optimizer"] if "optimizer" in runs else pd.Series(None, index=runs.index)
    number = {c: pd.to_numeric(runs[c], errors="coerce")  # None (never measured) -> NaN
              for c in ("momentum", "weight_decay", "train_acc", "final_avg_rank")}
    rules = [
        ("not done", runs["status"] != "done"),
        ("not plain SGD (optimizer other than sgd, or momentum > 0)",
         ~(optimizer.isna() | (optimizer == "sgd")) | (number["momentum"].fillna(0) != 0)),
        ("weight decay 0", ~(number["weight_decay"] > 0)),
        (f"final train accuracy <= {COLLAPSED_ACC}", ~learned(number["train_acc"])),
        ("no positive final rank", ~(number["final_avg_rank"] > 0)),
    ]
    keep = pd.Series(True, index=runs.index)
    excluded = {}
    for reason, rule in rules:
        dropped = keep & rule
        if dropped.any():
            excluded[reason] = int(dropped.sum())
        keep &= ~rule
    return runs[keep], excluded


def _json(value) -> str:
    return to_json(value, sort_keys=True)


def _model_args(model: str, args: dict) -> dict:
    """The options of `model` that differ from its defaults (so {} == explicit defaults)."""
    from rankbias.models import model_options

    defaults = model_options(model)
    return {k: v for k, v in sorted(args.items()) if k not in defaults or defaults[k] != v}


def _recipe(row: pd.Series, fields: list[str]) -> dict:
    """The recipe fields of a run read back through pandas, as plain JSON data."""
    return {f: plain(row[f]) for f in fields}


def _short_recipe(recipe: dict) -> str:
    """The recipe fields that differ from RunConfig's defaults, as 'epochs=30 schedule=...'."""
    defaults = RunConfig().to_dict()
    return " ".join(f"{k}={_fmt(v)}" for k, v in recipe.items() if defaults.get(k) != v)


def _fmt(value) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def architecture(model: str, model_args: dict, dataset: str,
                 dataset_args: dict) -> dict[str, tuple[int, int]]:
    """{hidden matrix: (r_max = min(shape), m = patches per example)} of a run's model.

    Built as the trainer builds it (`create_model` on the data set's input shape); m from
    `PatchCounter` on one forward pass of two zero inputs.
    """
    import torch

    from rankbias.data import load_dataset
    from rankbias.metrics.gradient_rank import PatchCounter
    from rankbias.metrics.layers import weight_matrices
    from rankbias.models import create_model, example_input

    data = load_dataset(dataset, **dataset_args)
    net = create_model(model, data.input_shape, data.num_classes, **model_args).eval()
    with PatchCounter(net) as counter, torch.enable_grad():
        net(example_input(net, data.input_shape, batch=2))
    return {name: (min(w.shape), counter.counts[name].patches)
            for name, w in weight_matrices(net).items()}


@dataclass
class FitResult:
    fits: list[Fit]
    skipped: list[dict]  # groups with too few settings
    excluded: dict[str, int]  # runs left out, by reason
    store: str

    def as_dict(self) -> dict:
        return {"fits": [f.as_dict() for f in self.fits], "skipped": self.skipped,
                "excluded": self.excluded, "law": LAW, "loo": LOO,
                "interval": f"predict: prediction * exp(+-{Z:g} * loo_log_sd), capped at r_max"}


def fit_store(path: str | os.PathLike, by: str = "model", per_layer: bool = False) -> FitResult:
    """Fit the law to every group of eligible runs of the store at `path`.

    by: "model" (model name and options) or "model,dataset"; runs are also split by training
    recipe. per_layer: also one fit per hidden matrix. Raises RankbiasError when the store is
    missing, has no eligible run, or no group has runs at >= 3 settings.
    """
    if by not in BY:
        raise RankbiasError(f"--by must be one of {', '.join(BY)}, got {by!r}")
    with open_store(path, readonly=True) as store:
        all_runs = store.runs()
        runs, excluded = eligible_runs(all_runs)
        if runs.empty:
            raise RankbiasError(
                f"no eligible runs in {path} ({len(all_runs)} runs): the fit uses finished "
                "plain-SGD runs (momentum 0) with weight decay > 0 and final train accuracy > "
                f"{COLLAPSED_ACC}" + (f"; left out: {_excluded_text(excluded)}" if excluded
                                      else ""))
        recipe_fields = [f for f in RunConfig.field_names() if f not in NOT_RECIPE
                         and f in runs and f not in ("momentum", "optimizer")]
        runs = runs.assign(
            model_key=[_json(_model_args(m, a)) for m, a in zip(runs["model"], runs["model_args"])],
            dataset_key=[_json([d, a]) for d, a in zip(runs["dataset"], runs["dataset_args"])],
            recipe_key=[_json(_recipe(r, recipe_fields)) for _, r in runs.iterrows()])
        keys = ["model", "model_key", "recipe_key"] + (["dataset_key"] if by != "model" else [])
        fits, skipped, archs = [], [], {}
        metrics = store.metrics(runs["run_id"], sorted({rank_metric(t[0]) for t in
                                                        runs["tolerances"]})) if per_layer else None
    for _, group in runs.groupby(keys, sort=False):
        first = group.iloc[0]
        describe = dict(model=first["model"], model_args=json.loads(first["model_key"]),
                        datasets=sorted(set(group["dataset"])),
                        recipe=_recipe(first, recipe_fields), tol=float(first["tolerances"][0]))
        n_settings = len(group[["dataset_key", "batch_size", "lr", "weight_decay"]]
                         .drop_duplicates())
        skip = {**{k: describe[k] for k in ("model", "model_args", "datasets")},
                "recipe": _short_recipe(describe["recipe"]), "n_runs": len(group),
                "n_settings": n_settings,
                "reason": f"fewer than {MIN_SETTINGS} settings (B, lr, wd)"}
        try:
            if n_settings < MIN_SETTINGS:
                raise RankbiasError(skip["reason"])
            fits += [fit_points(points, layer=layer, **describe)
                     for layer, points in _layer_points(group, archs, metrics).items()]
        except RankbiasError as err:  # too few settings, or all at one x
            skipped.append({**skip, "reason": str(err)})
    if not fits:
        largest = max(skipped, key=lambda s: s["n_settings"])
        if largest["n_settings"] < MIN_SETTINGS:
            raise RankbiasError(
                f"fewer than {MIN_SETTINGS} settings to fit in {path}: a fit needs runs at >= "
                f"{MIN_SETTINGS} settings (B, lr, wd) of one model and recipe, the largest "
                f"group has {largest['n_settings']}; vary B, lr or wd (e.g. `rankbias sweep`)")
        raise RankbiasError(f"no group of runs in {path} can be fitted: {largest['reason']}")
    return FitResult(fits, skipped, excluded, str(path))


def _layer_points(group: pd.DataFrame, archs: dict,
                  metrics: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    """Rows (run, x, rank, r_max, m, ...) of the average fit and, with metrics, per layer."""
    rows: dict[str, list[dict]] = {AVERAGE: []}
    final = None
    if metrics is not None:
        final = (metrics[metrics["run_id"].isin(group["run_id"])]
                 .groupby(["run_id", "layer", "metric"])["value"].last())
    for _, run in group.iterrows():
        arch_key = (run["model"], _json(run["model_args"]), run["dataset"],
                    _json(run["dataset_args"]))
        if arch_key not in archs:
            archs[arch_key] = architecture(run["model"], run["model_args"], run["dataset"],
                                           run["dataset_args"])
        arch = archs[arch_key]
        scale = run["batch_size"] / (run["lr"] * run["weight_decay"])
        base = {"run_id": run["run_id"], "batch_size": run["batch_size"], "lr": run["lr"],
                "weight_decay": run["weight_decay"], "seed": run["seed"],
                "dataset": run["dataset"],
                "setting": _json([run["dataset_key"], run["batch_size"], run["lr"],
                                  run["weight_decay"]])}
        m = float(np.mean([p for _, p in arch.values()]))
        rows[AVERAGE].append({**base, "x": scale * m, "m": m, "rank": run["final_avg_rank"],
                              "r_max": float(np.mean([r for r, _ in arch.values()]))})
        metric = rank_metric(run["tolerances"][0])
        for layer, (r_max, patches) in arch.items() if final is not None else ():
            value = final.get((run["run_id"], layer, metric))
            if value is not None and value > 0:
                rows.setdefault(layer, []).append({**base, "x": scale * patches, "m": patches,
                                                   "rank": float(value), "r_max": float(r_max)})
    frames = {layer: pd.DataFrame(r) for layer, r in rows.items() if r}
    return {layer: f for layer, f in frames.items() if f["setting"].nunique() >= MIN_SETTINGS}


def _excluded_text(excluded: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in excluded.items())


# --- text output ------------------------------------------------------------------------
def _g(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def fit_report(result: FitResult, fmt: str = "text") -> str:
    """What `rankbias fit` prints: a table per group, or the JSON document (strict)."""
    if fmt == "json":
        return to_json(result.as_dict())
    lines = [f"law: {LAW}  (fitted in log space; the knee chosen by least squares)",
             f"{LOO}; in rank units", ""]
    groups: dict[str, list[Fit]] = {}
    for fit in result.fits:
        groups.setdefault(_group_title(fit), []).append(fit)
    for title, fits in groups.items():
        rows = [["layer", "a", "b", "r2", "loo_error", "n_runs", "n_settings", "saturated",
                 "x_range", "r_max", "m"]]
        for fit in fits:
            d = fit.as_dict()
            rows.append([fit.layer, _g(d["a"]), _g(d["b"]), _g(d["r2"]), _g(d["loo_error"]),
                         str(d["n_runs"]), str(d["n_settings"]), str(d["n_saturated"]),
                         f"{d['x_range'][0]:.3g}-{d['x_range'][1]:.3g}", f"{d['r_max']:g}",
                         f"{d['patches']:.3g}"])
        lines += [title, text_table(rows)]
    for s in result.skipped:
        lines.append(f"skipped: {_title(s['model'], s['model_args'], s['datasets'], s['recipe'])}"
                     f": {s['n_settings']} setting(s), {s['n_runs']} runs ({s['reason']})")
    if result.excluded:
        lines.append(f"runs left out: {_excluded_text(result.excluded)}")
    return "\n".join(lines).rstrip()


def _title(model: str, model_args: dict, datasets: list[str], recipe: str) -> str:
    """'mlp depth=4 width=64 on digits, epochs=30 schedule=multistep'."""
    model = f"{model} {_fmt(model_args)}".strip()
    return f"{model} on {'+'.join(datasets)}" + (f", {recipe}" if recipe else "")


def _group_title(fit: Fit) -> str:
    return (_title(fit.model, fit.model_args, fit.datasets, _short_recipe(fit.recipe))
            + f", eps={fit.tol:g}")


# --- the figure -------------------------------------------------------------------------
def plot_fits(fits: Sequence[Fit], path: str | os.PathLike) -> Path:
    """One panel per fit: measured final ranks (dots: runs; circles: setting means) against x
    (log axis), the fitted law, r_max and Theorem 3.4's bound x * log(2/eps)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not fits:
        raise RankbiasError("no fit to draw")
    ncols = min(3, len(fits))
    nrows = math.ceil(len(fits) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 4.4 * nrows), squeeze=False)
    try:
        groups = list(dict.fromkeys(_group_title(f) for f in fits))
        for i, (ax, fit) in enumerate(zip(axes.flat, fits)):
            _draw_fit(ax, fit, legend=i == 0)
            head = "" if len(groups) == 1 else textwrap.fill(_group_title(fit), 70) + "\n"
            ax.set_title(f"{head}{fit.layer}: {fit.law.a:.3g}·x^{fit.law.b:.3g}, "
                         f"r2 {_g(fit.r2, 2)}, LOO error {_g(fit.loo_error, 2)}", fontsize=9)
        for ax in list(axes.flat)[len(fits):]:
            ax.set_visible(False)
        if len(groups) == 1:
            fig.suptitle(f"final rank vs x: {groups[0]}", fontsize=10)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def _draw_fit(ax, fit: Fit, legend: bool) -> None:
    p = fit.points
    ax.scatter(p["x"], p["rank"], s=12, color="#440154", alpha=0.45, label="runs")
    means = pd.DataFrame(fit.settings)
    ax.scatter(means["x"], means["rank_mean"], s=40, facecolor="none", edgecolor="#21918c",
               lw=1.3, label="setting means")
    lo, hi = fit.x_range
    grid = np.geomspace(lo / 1.5, hi * 1.5, 200)
    ax.plot(grid, fit.law(grid, fit.r_max), color="#e07b00", lw=2.2,
            label=f"fit min(r_max, a·x^b), {len(p)} runs")
    ax.axhline(fit.r_max, color="grey", ls="--", lw=1, label=f"r_max {fit.r_max:g}")
    factor = math.log(2 / fit.tol)
    top = fit.r_max * 1.12
    where = ", above the axis" if lo * factor > top else ""
    ax.plot(grid, grid * factor, color="#c62828", ls=":", lw=1.5,
            label=f"Theorem 3.4 bound ({lo * factor:.2g}–{hi * factor:.2g}{where})")
    ax.set_xscale("log")
    ax.set_ylim(0, top)
    ax.set_xlabel("x = B·m / (lr·wd)")
    ax.set_ylabel(f"final rank (eps {fit.tol:g})")
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="lower right", framealpha=0.8)


# --- predict ----------------------------------------------------------------------------
def predict(model: str, batch_size: int, lr: float, weight_decay: float,
            store: str | os.PathLike | None = None, dataset: str | None = None,
            eps: float = 1e-3, patches: int = 1) -> dict:
    """The predicted final average rank of a setting, from a store's fit; or, without a
    store, Theorem 3.4's bound (an upper bound per matrix, NOT a prediction).

    With a store: predicted = the law at x = B*m/(lr*wd) (m of the fit's model), and the
    interval predicted * exp(-+Z * loo_log_sd) (the spread of held-out runs around the law;
    high capped at r_max); "extrapolated" when x is outside the fitted x range. At weight
    decay 0 no fit applies: predicted, low, high and x are None (null in JSON).
    """
    from rankbias.models import list_models
    from rankbias.theory.bound import min_steps, rank_bound

    if model not in list_models():
        raise RankbiasError(f"unknown model {model!r}; choose from {', '.join(list_models())}")
    bound = rank_bound(batch_size, lr, weight_decay, eps, patches)  # also checks the inputs
    setting = {"model": model, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay}
    if store is None:
        return {**setting, "source": "bound", "predicted": plain(bound), "low": None,
                "high": None, "patches": patches, "eps": eps,
                "min_steps": plain(min_steps(lr, weight_decay, eps)),
                "note": ("no fit applies at weight decay 0: the theorem gives no bound "
                         "(infinite) and no low-rank bias is expected" if weight_decay == 0
                         else "an upper bound on the eps-rank of each weight matrix with this "
                         "many patches, not a prediction of the rank you will measure; give "
                         "--store with finished runs of this model for a fitted prediction")}
    result = fit_store(store, by="model,dataset" if dataset else "model")
    candidates = [f for f in result.fits if f.layer == AVERAGE and f.model == model
                  and (dataset is None or dataset in f.datasets)]
    if not candidates:
        fitted = sorted({f"{f.model} on {'+'.join(f.datasets)}" for f in result.fits})
        raise RankbiasError(f"no fit for model {model!r}" + (f" on {dataset!r}" if dataset else "")
                            + f" in {store}; fits: {', '.join(fitted)}")
    fit = max(candidates, key=lambda f: len(f.points))
    d = fit.as_dict()
    out = {**setting, "source": "fit", "fit_of": _group_title(fit),
           "model_args": fit.model_args, "datasets": fit.datasets, "recipe": fit.recipe,
           "a": d["a"], "b": d["b"], "r2": d["r2"], "loo_error": d["loo_error"],
           "loo_log_sd": d["loo_log_sd"], "n_settings": d["n_settings"], "r_max": d["r_max"],
           "patches": d["patches"], "tol": fit.tol, "x_range": d["x_range"],
           "other_fits": len(candidates) - 1}
    if weight_decay == 0:
        return {**out, "x": None, "predicted": None, "low": None, "high": None,
                "extrapolated": None, "bound": None,
                "note": "no fit applies at weight decay 0: the law is fitted on wd > 0 runs "
                        "(x is infinite); without weight decay the rank is expected to stay "
                        "near its initial value"}
    x = batch_size * fit.patches / (lr * weight_decay)
    predicted = float(fit.law(x, fit.r_max))
    spread = fit.loo_log_sd
    low = None if spread is None else predicted * math.exp(-Z * spread)
    high = None if spread is None else min(fit.r_max, predicted * math.exp(Z * spread))
    lo, hi = fit.x_range
    return {**out, "x": x, "predicted": predicted, "low": low, "high": high,
            "extrapolated": not lo <= x <= hi, "bound": x * math.log(2 / fit.tol),
            "note": f"interval: prediction * exp(-+{Z:g} * loo_log_sd), the spread of held-out "
                    "runs around the law (about 95% if it were normal in log space)"}


def predict_report(result: dict, fmt: str = "text") -> str:
    """What `rankbias predict` prints on stdout."""
    if fmt == "json":
        return to_json(result)
    setting = (f"B={result['batch_size']}, lr={result['lr']:g}, "
               f"wd={result['weight_decay']:g}")
    if result["source"] == "bound":
        if result["predicted"] is None:
            return f"{result['model']} at {setting}: {result['note']}"
        return (f"Theorem 3.4 bound: rank <= {result['predicted']:.4g} per matrix "
                f"({setting}, patches={result['patches']}, eps={result['eps']:g})\n"
                f"this is {result['note']}")
    head = f"{result['model']} at {setting}"
    fit_line = (f"fit: {result['fit_of']}: rank = min({result['r_max']:g}, "
                f"{result['a']:.4g} * x^{result['b']:.4g}), r2 {_g(result['r2'])}, "
                f"LOO error {_g(result['loo_error'])} ({result['n_settings']} settings)")
    if result["predicted"] is None:
        return f"{head}: {result['note']}\n{fit_line}"
    lo, hi = result["x_range"]
    interval = ("no interval (leave-one-out impossible)" if result["low"] is None
                else f"interval {result['low']:.4g} - {result['high']:.4g}")
    return "\n".join([
        f"{head}: predicted average rank {result['predicted']:.4g} "
        f"(r_max {result['r_max']:g}), {interval}",
        f"x = B*m/(lr*wd) = {result['x']:.4g}, fitted x range {lo:.4g} - {hi:.4g}"
        + (" (EXTRAPOLATED)" if result["extrapolated"] else ""),
        fit_line,
        result["note"],
        f"Theorem 3.4 bound for comparison: {result['bound']:.4g} per matrix (an upper bound)"])
