"""`rankbias reproduce`: every claim of the paper as an experiment, a figure set and a verdict.

    rankbias reproduce --scale quick --out out/            # CPU, digits, minutes
    rankbias reproduce batch_size 6 --scale full --out out/ # some claims, by id or number

One experiment file per claim (rankbias/claims/experiments/*.yaml) holds its statement, its rule
(stated in advance), the figures to draw and a sweep per scale. All sweeps of the chosen
claims run as one resumable sweep into DIR/results.db (runs shared between claims are
trained once; a rerun reuses finished runs), then every rule is applied and
DIR/claims.json and DIR/report.html are written. Claims 2 and 3 (Lemma 3.2, Theorem 3.4)
are exact computations on recorded SGD steps, not sweeps.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import pandas as pd

from rankbias.claims.compress_claim import check_compression
from rankbias.claims.generalization import check_generalization
from rankbias.claims.rules import evaluate
from rankbias.claims.runsets import select_runs
from rankbias.claims.verdict import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    Verdict,
    check_rule,
    declare,
    keyword_defaults,
    parameters,
)
from rankbias.claims.writeup import claims_markdown, verdict_table
from rankbias.runs.store import Store, checkpoint_dir_for
from rankbias.runs.sweep import expand, read_experiment, run_sweep
from rankbias.theory.checks import THEORY_CHECKS
from rankbias.training.state import process_state
from rankbias.utils import RankbiasError, atomic_write_text, available_cpus, text_table, to_json

for _kind, _check in THEORY_CHECKS.items():  # their rule parameters: the checks' keywords
    declare(_kind, **keyword_defaults(_check))
EXPERIMENTS = Path(__file__).parent / "experiments"

if TYPE_CHECKING:
    from rankbias.runs.backends.slurm import SlurmOptions


@dataclass
class Experiment:
    id: str
    claim: int
    statement: str
    rule_text: str
    rule: dict
    figures: list
    spec: dict  # the sweep (or the theory-check settings) of the chosen scale
    check: str | None = None  # theory: unrolled_identity | theorem_residual; compression
    section: str = "paper"  # beyond: a claim of ours, not the paper's

    @functools.cached_property
    def configs(self):  # expanded once: it is asked for per claim and for the sweep
        theory = self.check in THEORY_CHECKS
        return [] if theory else expand(self.spec, f"{self.id} experiment")


def list_experiments(scale: str = "quick", folder: str | os.PathLike | None = None
                     ) -> list[Experiment]:
    """All experiment files of `folder` (the built-in ones by default), in file order."""
    experiments = []
    paths = sorted(Path(folder or EXPERIMENTS).glob("*.yaml"))
    if not paths:
        raise RankbiasError(f"no experiment files (*.yaml) in {folder or EXPERIMENTS}")
    for path in paths:
        raw = read_experiment(path, scale)
        try:
            check_rule(raw["rule"])
        except RankbiasError as err:
            raise RankbiasError(f"{path}: {err}") from err
        experiments.append(Experiment(raw["id"], raw["claim"], raw["statement"],
                                      raw["rule_text"], raw["rule"], raw.get("figures") or [],
                                      raw["scales"][scale], raw.get("check"),
                                      raw.get("section", "paper")))
    return experiments


def select(experiments: list[Experiment], wanted: list[str] | None) -> list[Experiment]:
    """Experiments named by id or claim number (all when `wanted` is empty)."""
    if not wanted:
        return experiments
    chosen = []
    for word in wanted:
        match = [e for e in experiments if word in (e.id, str(e.claim))]
        if not match:
            names = ", ".join(f"{e.id} ({e.claim})" for e in experiments)
            raise RankbiasError(f"unknown claim {word!r}; choose from {names}")
        chosen += [e for e in match if e not in chosen]
    return chosen


def all_configs(experiments: list[Experiment]) -> list:
    """The runs of these experiments, each once (experiments share runs)."""
    return list({c.run_id(): c for e in experiments for c in e.configs}.values())


def experiment_table(experiments: list[Experiment]) -> str:
    """One line per claim: its runs and SGD steps, or the theory check it computes."""
    from rankbias.runs.estimate import run_steps

    rows = [["claim", "id", "section", "runs", "SGD steps"]]
    for e in experiments:
        work = ([str(len(e.configs)), f"{sum(run_steps(c) for c in e.configs):,}"]
                if e.configs else ["-", f"({e.check} check)"])
        rows.append([str(e.claim), e.id, e.section, *work])
    return text_table(rows)


def budget_tables(experiments: list[Experiment]) -> str:
    """Per claim, its settings' decay budgets (T, k*, D, T/k*): an experiment that cannot
    show the effect is seen before any run."""
    from rankbias.runs.estimate import budget_table

    parts = [f"\n{e.claim} {e.id}:\n" + budget_table(e.configs, str(e.claim))
             for e in experiments if e.configs]
    return "".join(parts) + ("\nD = sum of lr_t*wd over the steps (the decay budget; AdamW: "
                             "its decoupled lr*wd; Adam with L2: measured while training); * "
                             "marks D below log(2/eps), where the eps-rank cannot have fallen\n"
                             if parts else "")


# --- figures ---------------------------------------------------------------------------------
def _hidden_layer(metrics: pd.DataFrame, run_id: str) -> str | None:
    """A middle hidden matrix: layers in model order, the classifier (last) left out."""
    layers = [layer for layer in dict.fromkeys(
        metrics[(metrics.run_id == run_id) & (metrics.layer != "")].layer)]
    hidden = layers[:-1] or layers
    return hidden[len(hidden) // 2] if hidden else None


def draw_figures(experiment: Experiment, runs: pd.DataFrame, metrics: pd.DataFrame,
                 store: Store, folder: Path, verdict: Verdict) -> list[Path]:
    """The figures an experiment file asks for, one per group (data set, architecture) for
    figures of training curves and spectra (averaging across models would mean nothing);
    a figure that cannot be drawn is skipped with a line on stderr. A figure's own `where`
    replaces the rule's (e.g. an arm the rule does not judge, drawn all the same)."""
    paths = []
    for index, figure in enumerate(experiment.figures):
        selected = select_runs(runs, figure.get("where", experiment.rule.get("where")))
        if len(selected):  # the theorem's scale B/(lr wd), a figure axis of claim 11
            selected = selected.assign(scale=selected.batch_size / (selected.lr
                                                                    * selected.weight_decay))
        groups = (list(selected.groupby(["data", "architecture"], sort=True)) if len(selected)
                  else [])
        stem = f"claim{experiment.claim:02d}_{experiment.id}_{index}_{figure['kind']}"
        try:
            if figure["kind"] in PER_GROUP:
                for g, ((data, architecture), group) in enumerate(groups):
                    suffix = f"_{g}" if len(groups) > 1 else ""
                    path = _figure(figure, group, metrics, store, folder / f"{stem}{suffix}.png",
                                   f"{architecture} on {data}")
                    paths += [path] if path else []
            else:
                path = _figure(figure, selected, metrics, store, folder / f"{stem}.png", None,
                               hue="architecture" if len(groups) > 1 else None, verdict=verdict,
                               budget=experiment.rule.get("budget"))
                paths += [path] if path else []
        except RankbiasError as err:
            print(f"reproduce: figure {stem} not drawn: {err}", file=sys.stderr)
    return paths


PER_GROUP = ("rank_curves", "accuracy_curves", "weight_change", "layer_heatmap", "spectra",
             "role_curves", "product_curves", "timeline")
# Figures of transformer runs (report/transformer_plots.py), each with a `vary`.
TRANSFORMER_FIGURES = {"role_curves": "plot_role_curves", "product_curves": "plot_product_curves",
                       "timeline": "plot_timeline"}


def _figure(figure: dict, runs: pd.DataFrame, metrics: pd.DataFrame, store: Store, path: Path,
            label: str | None, hue: str | None = None, verdict: Verdict | None = None,
            budget: float | None = None) -> Path | None:
    from rankbias.report import plots

    kind, done = figure["kind"], runs[runs.status == "done"]
    if kind == "rank_curves":
        return plots.plot_rank_curves(runs, metrics, figure["vary"], path)
    if kind == "accuracy_curves":
        return plots.plot_accuracy_curves(runs, metrics, figure["vary"], path)
    if kind == "weight_change":
        return plots.plot_weight_change(runs, metrics, figure["vary"], path)
    if kind == "final_vs_param":
        return plots.plot_final_vs_param(runs, figure["param"], path,
                                         metric=figure.get("metric", "final_avg_rank"),
                                         hue=figure.get("hue") or hue)
    if kind == "rank_vs_accuracy":
        return plots.plot_rank_vs_accuracy(runs, path)
    if kind in TRANSFORMER_FIGURES:
        from rankbias.report import transformer_plots

        return getattr(transformer_plots, TRANSFORMER_FIGURES[kind])(runs, metrics,
                                                                     figure["vary"], path)
    if kind == "layer_heatmap" and len(done):
        run_id = done.sort_values("final_avg_rank").run_id.iloc[0]
        return plots.plot_layer_heatmap(metrics, run_id, path, label=label)
    if kind == "spectra" and len(done):
        first_seed = done[done.seed == done.seed.min()].sort_values(figure["vary"])
        by_label = {f"{figure['vary']}={getattr(r, figure['vary'])}": r.run_id
                    for r in first_seed.itertuples()}
        layer = _hidden_layer(metrics, first_seed.run_id.iloc[0])
        return plots.plot_spectra(store, by_label, layer, path, note=label)
    if kind == "compression_curves":
        from rankbias.claims.compress_claim import plot_compression_curves

        return plot_compression_curves(pd.DataFrame(verdict.evidence["rows"]),
                                       pd.DataFrame(verdict.evidence["runs"]), path, budget)
    return None


# --- verdicts ---------------------------------------------------------------------------------
# Checks that read the runs' checkpoints besides their metrics.
CHECKPOINT_CHECKS = {"compression": check_compression, "generalization": check_generalization}


def decide(experiment: Experiment, runs: pd.DataFrame, metrics: pd.DataFrame,
           checkpoint_dir: str | os.PathLike) -> Verdict:
    """An experiment's verdict: its rule on the runs, or its check (theory: on SGD steps
    recorded here; compression, generalization: on the runs' checkpoints)."""
    if experiment.check in CHECKPOINT_CHECKS:
        return CHECKPOINT_CHECKS[experiment.check](experiment.spec, experiment.rule, runs,
                                                   checkpoint_dir)
    if experiment.check:
        options = {k: v for k, v in parameters(experiment.rule).items()
                   if k not in ("kind", "where")}
        # On one torch thread, as the checkpoint checks: their float sums are split per
        # thread, so the numbers (claim 3's verdict among them) would depend on the cores
        # of the machine and on whether a pool process or the driver ran the check.
        with process_state(threads=1):
            return Verdict(*THEORY_CHECKS[experiment.check](experiment.spec, **options))
    return evaluate(experiment.rule, runs, metrics)


def by_tolerance(experiment: Experiment, runs: pd.DataFrame, metrics: pd.DataFrame) -> dict:
    """The rule again at each further tolerance the runs tracked (the authors' plots use
    0.04 and 0.05 beside 1e-3): {tol: {verdict, reason, validity}}, the gate at that
    tolerance's own threshold log(2/tol)."""
    if experiment.check or runs.empty:
        return {}
    tolerances = sorted({float(t) for ts in runs.tolerances for t in ts[1:]})
    results = {}
    for tol in tolerances:
        ranks = metrics[metrics.metric == f"avg_rank@{tol:g}"].sort_values("step")
        ends = ranks.groupby("run_id").value.agg(["first", "last"])
        at_tol = runs.drop(columns=["init_avg_rank", "final_avg_rank"]).merge(
            ends.rename(columns={"first": "init_avg_rank", "last": "final_avg_rank"}),
            left_on="run_id", right_index=True, how="left")
        verdict = evaluate(experiment.rule, at_tol, metrics, eps=tol)
        results[f"{tol:g}"] = {"verdict": verdict.verdict, "reason": verdict.reason,
                               "validity": verdict.evidence.get("validity", [])}
    return results


# --- evaluation: one task per experiment, on a pool of processes ----------------------------
def evaluate_experiment(experiment: Experiment, store_path: Path,
                        checkpoint_dir: str | os.PathLike, figures: Path) -> tuple[dict, dict]:
    """An experiment's entry of claims.json and its section of the report: its verdict, its
    figures (drawn into `figures`) and its verdicts at further tolerances. It opens the
    store itself, so that it can run in a pool process."""
    ids = {c.run_id() for c in experiment.configs}
    with Store(store_path, readonly=True) as store:
        all_runs = store.runs()
        runs = all_runs[all_runs.run_id.isin(ids)].reset_index(drop=True)
        metrics = store.metrics(run_ids=ids) if ids else pd.DataFrame(
            columns=["run_id", "step", "epoch", "layer", "metric", "value"])
        verdict = decide(experiment, runs, metrics, checkpoint_dir)
        images = draw_figures(experiment, runs, metrics, store, figures, verdict)
    claim = (_claim_entry(experiment, verdict, runs)
             | {"by_tolerance": by_tolerance(experiment, runs, metrics)})
    return claim, _section(experiment, verdict, runs, images)


def evaluate_all(experiments: list[Experiment], task: Callable[[Experiment], tuple],
                 workers: int, progress: bool = False) -> list[tuple]:
    """`task` of each experiment, in the experiments' order, on min(workers, experiments,
    cores) processes of one torch thread each; inline, as before, when that is one. The
    longest are sent first (theory checks train, checkpoint checks load every run's model),
    so that no process is left with a long one at the end. A task's exception is raised
    here as it would be inline: the first in the experiments' order; the other tasks are
    stopped."""
    from tqdm import tqdm

    processes = min(workers, len(experiments), available_cpus())
    bar = tqdm(total=len(experiments), desc="claims", unit="claim", file=sys.stderr,
               disable=not progress)
    if processes <= 1:
        results = []
        with bar:
            for experiment in experiments:
                results.append(task(experiment))
                bar.update()
        return results
    # forkserver, as the local backend: a clean process (no torch threads to inherit) that
    # imports torch, pandas and matplotlib once; each pool process is a cheap fork of it.
    # (It is already running, with the backend's preloads, when this driver trained runs.)
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["rankbias.claims.pipeline", "rankbias.report.plots"])
    longest_first = sorted(range(len(experiments)), key=lambda i: (
        experiments[i].check not in THEORY_CHECKS, experiments[i].check not in CHECKPOINT_CHECKS))
    pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_pool_process,
                               initargs=(os.getpid(),))
    try:
        with bar:
            futures = {i: pool.submit(task, experiments[i]) for i in longest_first}
            for future in futures.values():
                future.add_done_callback(lambda _: bar.update())
            return [futures[i].result() for i in range(len(experiments))]
    except BaseException:
        # Nothing is left running once a task failed (or on Ctrl-C). Python 3.14 has
        # pool.terminate_workers(); before it, the processes are the pool's private dict.
        for process in list((pool._processes or {}).values()):
            process.terminate()
        raise
    finally:
        pool.shutdown(cancel_futures=True)


def _pool_process(driver: int) -> None:
    """A pool process: one torch thread, Ctrl-C left to the driver, gone with the driver."""
    from tqdm import tqdm

    from rankbias.runs.backends.local import prepare_worker

    prepare_worker(driver, threads=1)
    # The checks' progress bars: tqdm's default lock is a named semaphore, which a process
    # stopped by terminate() leaves behind (the resource tracker then warns at exit).
    tqdm.set_lock(threading.RLock())


# --- the whole pipeline ----------------------------------------------------------------------
def reproduce(wanted: list[str] | None = None, scale: str = "quick", out: str = "out",
              workers: int | None = None, ensemble: str = "auto", backend: str = "local",
              address: str | None = None, progress: bool = True,
              stdout: TextIO | None = None,
              experiments_dir: str | os.PathLike | None = None,
              run_timeout: float | None = None,
              checkpoint_dir: str | os.PathLike | None = None,
              slurm: SlurmOptions | None = None) -> dict:
    """Run the chosen claims at `scale`; write claims.json and report.html into `out`.

    `experiments_dir`: a folder of experiment files to use instead of the built-in ones.
    `slurm`: the SlurmOptions of backend="slurm" (see `run_sweep`).
    """
    stdout = stdout or sys.stdout
    started = time.time()
    experiments = select(list_experiments(scale, experiments_dir), wanted)
    if backend == "slurm":  # before the output folder is made: nothing half-written
        from rankbias.runs.backends.slurm import prepare

        slurm = prepare(slurm, run_timeout)
    folder = Path(out)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    for stale in (folder / "figures").glob("claim[0-9][0-9]_*.png"):
        stale.unlink()  # figures of an earlier reproduction here: this one draws its own
    store_path = folder / "results.db"
    configs = all_configs(experiments)
    summary = run_sweep(configs, store_path, workers, backend, address, ensemble,
                        progress=progress, run_timeout=run_timeout,
                        checkpoint_dir=checkpoint_dir, slurm=slurm)
    task = functools.partial(evaluate_experiment, store_path=store_path, figures=folder / "figures",
                             checkpoint_dir=checkpoint_dir or checkpoint_dir_for(store_path))
    evaluated = evaluate_all(experiments, task, workers or available_cpus(), progress)
    claims, sections = [claim for claim, _ in evaluated], [section for _, section in evaluated]
    wall = time.time() - started
    document = {"scale": scale, "wall_s": round(wall, 1), "sweep": summary.as_dict(),
                "claims": claims}
    atomic_write_text(folder / "claims.json", to_json(document, indent=1))
    atomic_write_text(folder / "claims.md", claims_markdown(document))
    from rankbias.report.explorer import write_explorer

    intro = {"title": "Summary", "text": (
        f"Scale {scale}: {len(claims)} claims, {summary.total} runs "
        f"({summary.executed} trained now, {summary.skipped} reused, {summary.failed} failed, "
        f"{summary.diverged} diverged) in {wall:.0f} s. Verdicts: "
        + ", ".join(f"{sum(c['verdict'] == v for c in claims)} {v}"
                    for v in (PASS, FAIL, INCONCLUSIVE))),
        "table": [{"claim": c["claim"], "id": c["id"], "verdict": c["verdict"],
                   "statement": c["statement"]} for c in claims]}
    write_explorer(folder / "report.html", store_path, f"rankbias reproduce --scale {scale}",
                   claims=claims, figures=[intro] + sections)
    stdout.write(verdict_table(claims))
    stdout.write(f"{len(claims)} claims in {wall:.0f} s; wrote {folder / 'report.html'} and "
                 f"{folder / 'claims.json'}\n")
    return document


def _claim_entry(experiment: Experiment, verdict: Verdict, runs: pd.DataFrame) -> dict:
    counts = runs.status.value_counts().to_dict() if len(runs) else {}
    return {"id": experiment.id, "claim": experiment.claim, "section": experiment.section,
            "statement": experiment.statement,
            "verdict": verdict.verdict, "rule": experiment.rule_text,
            "rule_spec": experiment.rule, "reason": verdict.reason,
            "evidence": {**verdict.evidence, "run_status": counts}}


def _section(experiment: Experiment, verdict: Verdict, runs: pd.DataFrame,
             images: list[Path]) -> dict:
    evidence = {k: v for k, v in verdict.evidence.items() if k != "rows"}
    text = (f"Claim {experiment.claim}: {experiment.statement}\nRule (stated in advance): "
            f"{experiment.rule_text}\nResult: {verdict.reason}\nEvidence: "
            f"{to_json(evidence)}")
    head = "Beyond the paper" if experiment.section == "beyond" else f"Claim {experiment.claim}"
    return {"title": f"{head}: {experiment.id}", "verdict": verdict.verdict,
            "text": text, "images": images}



