"""The body of every `rankbias` command; cli.py only parses the arguments.

Each command is a function of its parsed arguments (an argparse.Namespace) that returns
the exit code: `rankbias train ...` runs `train(args)`. The work itself lives in importable
modules (train, sweep, reproduce, fit, compress, ...); these functions read the arguments,
call them and print. Each imports what it uses inside, so a command loads only its own
modules (no pandas for `rankbias bound`, no matplotlib for `rankbias train`).
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from argparse import Namespace
from typing import TYPE_CHECKING, TextIO

from rankbias.cli.flags import config_values, key_values
from rankbias.utils import RankbiasError, text_table, to_json

if TYPE_CHECKING:
    from rankbias.training.config import RunConfig
    from rankbias.training.train import RunResult


def _set_threads(threads: int) -> None:
    import torch

    if threads < 1:
        raise RankbiasError("--threads must be >= 1")
    torch.set_num_threads(threads)


# --- rankbias analyze / compress / bound ------------------------------------------------------
def analyze(args: Namespace) -> int:
    from rankbias.analyze.analyze import analyze_file
    from rankbias.analyze.spectra import return_freed_memory

    _set_threads(1)  # --threads are matrices at once, each LAPACK call on one core
    if args.threads < 1:
        raise RankbiasError("--threads must be >= 1")
    return_freed_memory()
    analyze_file(args.path, tols=args.tol or [1e-3], relative=args.relative,
                 fmt=args.format, spectra_path=args.spectra, include_all=args.include_all,
                 trust=args.trust, out=sys.stdout, include=args.include, exclude=args.exclude,
                 split_qkv=args.split_qkv, attention_products=args.attention_products,
                 device=args.device, progress=None if not args.no_progress else False,
                 workers=args.threads)
    return 0


def compress(args: Namespace) -> int:
    from rankbias.compress.compress import compress_file

    _set_threads(args.threads)
    compress_file(args.checkpoint, args.out, tol=args.tol,
                  energy=args.energy,
                  max_acc_drop=args.max_acc_drop,
                  dataset=args.dataset,
                  dataset_args=key_values(args.dataset_arg, "--dataset-arg"),
                  finetune_epochs=args.finetune_epochs, include_all=args.include_all,
                  trust=args.trust, fmt=args.format, progress=not args.no_progress)
    return 0


def bound(args: Namespace) -> int:
    from rankbias.theory.bound import bound_report

    print(bound_report(args.batch_size, args.lr, args.weight_decay, eps=args.eps,
                       patches=args.patches, shape=args.shape, fmt=args.format))
    return 0


# --- rankbias data ------------------------------------------------------------------------
def data_list(args: Namespace) -> int:
    from rankbias.data import dataset_status, format_status

    print(format_status(dataset_status(args.root), args.format))
    return 0


def data_download(args: Namespace) -> int:
    from rankbias.data import download

    folder = download(args.name, args.root, base_url=args.base_url,
                      progress=not args.quiet)
    print(f"{args.name}: ready in {folder}")
    return 0


# --- rankbias train / runs ------------------------------------------------------------------
def train(args: Namespace) -> int:
    """The run config from --config and the run flags (flags win), trained into the store."""
    from rankbias.training.config import RunConfig

    _set_threads(args.threads)
    cfg = RunConfig.from_dict(config_values(vars(args), args.config))
    result = train_into_store(cfg, args.store, args.checkpoint_dir, args.resume,
                              args.force, args.format, progress=not args.no_progress)
    if result is not None and result.status == "diverged":
        # The store keeps it (a setting that diverges is a result); the user needs a hint.
        print(f"rankbias train: the run diverged: {result.error}; lower --lr (now {cfg.lr:g}) "
              f"or --weight-decay (now {cfg.weight_decay:g}); --force trains it again",
              file=sys.stderr)
        return 1
    return 0


def train_into_store(cfg: RunConfig, store_path: str, checkpoint_dir: str | None = None,
                     resume: bool = False, force: bool = False, fmt: str = "text",
                     progress: bool = True, out: TextIO | None = None) -> RunResult | None:
    """Train one config into the store, with a progress bar; skip it if already finished."""
    from rankbias.runs.store import FINISHED, checkpoint_dir_for, open_store
    from rankbias.training.checkpoint import checkpoint_path
    from rankbias.training.train import train_run

    out = out or sys.stdout
    run_id = cfg.run_id()
    with open_store(store_path) as store:
        if store.status(run_id) in FINISHED and not force:
            _print_summary(store.summary(run_id), fmt, out,
                           note=f"run {run_id} already finished in {store_path}; not rerun "
                           "(use --force to train again)")
            return None
        ckpt = checkpoint_path(checkpoint_dir or checkpoint_dir_for(store_path), run_id)
        bar: list[_Bar] = []

        def start() -> None:  # the config passed every check: now it is a run
            store.mark(run_id, cfg.to_dict(), "running")
            if progress:
                bar.append(_Bar(cfg))

        try:
            result = train_run(cfg, checkpoint_path=ckpt, resume=resume, on_start=start,
                               on_track=lambda epoch, point: bar and bar[0].update(epoch, point))
        except BaseException as err:
            if store.status(run_id) == "running":
                store.mark(run_id, cfg.to_dict(), "failed",
                           error=f"{type(err).__name__}: {err}".splitlines()[0])
            raise
        finally:
            if bar:
                bar[0].close()
        store.save_result(result)
    if fmt == "text":
        out.write(final_table(result))
    _print_summary(result.summary, fmt, out)
    return result


class _Bar:
    """A tqdm bar over epochs showing loss, accuracy and average rank."""

    def __init__(self, cfg: RunConfig) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=cfg.epochs, unit="epoch", file=sys.stderr, dynamic_ncols=True,
                        desc=f"{cfg.model} B={cfg.batch_size} lr={cfg.lr:g} "
                             f"wd={cfg.weight_decay:g}")

    def update(self, epoch: int, point: dict) -> None:
        self.bar.n = epoch
        self.bar.set_postfix(loss=f"{point['train_loss']:.3g}", acc=f"{point['train_acc']:.3f}",
                             rank=f"{point['avg_rank']:.1f}")

    def close(self) -> None:
        self.bar.close()


def final_table(result: RunResult) -> str:
    """Per-layer metrics at the last tracking point (attention products per head: their
    rank and stable rank, product_rank@ and product_stable_rank)."""
    if not result.rows:
        return ""
    last_step = max(step for step, *_ in result.rows)
    per_layer: dict[str, dict[str, float]] = {}
    for step, _, layer, metric, value in result.rows:
        if step == last_step and layer:
            per_layer.setdefault(layer, {})[metric.removeprefix("product_")] = value
    tol = result.config["tolerances"][0]
    columns = ["layer", f"rank@{tol:g}", "stable_rank", "effective_rank", "fro_norm",
               "weight_change"]
    return text_table([columns] + [[name] + [_cell(values.get(c)) for c in columns[1:]]
                                   for name, values in per_layer.items()])


def _cell(value) -> str:
    """A table cell: '-' when missing, whole numbers without decimals, others to 4 digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.4g}"


PRODUCT_KEYS = ("init_avg_qk_rank", "final_avg_qk_rank", "init_avg_ov_rank", "final_avg_ov_rank")


def _print_summary(summary: dict, fmt: str, out: TextIO, note: str | None = None) -> None:
    if fmt == "json":
        if note:
            print(note, file=sys.stderr)
        keys = ("run_id", "status", "init_avg_rank", "final_avg_rank", "train_acc", "test_acc",
                "epochs", "steps", "wall_s", *PRODUCT_KEYS)
        out.write(to_json({k: summary.get(k) for k in keys if k in summary}) + "\n")
        return
    if note:
        out.write(note + "\n")
    out.write(f"run {summary['run_id']}: {summary['status']} after {summary['epochs']} epochs "
              f"({summary['steps']} steps, {summary['wall_s']:.1f} s); average rank "
              f"{summary['init_avg_rank']:.2f} -> {summary['final_avg_rank']:.2f}; train acc "
              f"{summary['train_acc']:.4f}, test acc {summary['test_acc']:.4f}\n")
    if "final_avg_qk_rank" in summary:
        out.write(f"attention products, mean rank per head: W_Q^T W_K "
                  f"{summary['init_avg_qk_rank']:.2f} -> {summary['final_avg_qk_rank']:.2f}, "
                  f"W_O W_V {summary['init_avg_ov_rank']:.2f} -> "
                  f"{summary['final_avg_ov_rank']:.2f}\n")


def runs(args: Namespace) -> int:
    """List the runs of a store."""
    from rankbias.runs.slurm_jobs import recorded_jobs
    from rankbias.runs.store import open_store

    with open_store(args.store, readonly=True) as store:
        frame = store.runs()
        jobs = recorded_jobs(store)
    columns = ["run_id", "status", "model", "dataset", "batch_size", "lr", "weight_decay", "seed",
               "epochs", "epochs_done", "init_avg_rank", "final_avg_rank", "train_acc",
               "test_acc", "wall_s"]
    frame = frame[[c for c in columns if c in frame.columns]]
    if jobs:
        frame = _with_slurm_jobs(frame, jobs)
    if args.format == "json":
        sys.stdout.write(to_json(frame.to_dict(orient="records")) + "\n")
    elif args.format == "csv":
        sys.stdout.write(frame.to_csv(index=False))
    elif len(frame):
        sys.stdout.write(text_table([list(frame.columns)] + [
            [_cell(v) for v in row] for row in frame.itertuples(index=False)]))
    else:
        sys.stdout.write("no runs\n")
    return 0


def _with_slurm_jobs(frame, jobs: dict):
    """Two columns after status: the SLURM job (array_task) of each unfinished run that has
    one, and that job's state now (squeue, else sacct)."""
    from rankbias.runs.backends.slurm import describe_states
    from rankbias.runs.store import FINISHED

    unfinished = ~frame.status.isin(FINISHED)
    ids = [jobs[r][0] if r in jobs and u else None for r, u in zip(frame.run_id, unfinished)]
    states = describe_states({i for i in ids if i})
    frame = frame.copy()
    at = list(frame.columns).index("status") + 1
    frame.insert(at, "slurm_job", ids)
    frame.insert(at + 1, "slurm_state", [states.get(i) if i else None for i in ids])
    return frame


# --- rankbias sweep / reproduce ---------------------------------------------------------------
def dry_run_plan(configs: list, ensemble: str, workers: int | None) -> str:
    """What `--dry-run` prints under the runs: counts, and the estimate where measurable."""
    from rankbias.runs.estimate import format_plan, measurable, plan_sweep, probe_rates
    from rankbias.utils import available_cpus

    plan = plan_sweep(configs, ensemble, workers or available_cpus())
    if not configs:
        return ""
    if not measurable(configs):
        return format_plan(plan) + ("no wall-time estimate: these runs need a GPU this "
                                    "machine does not have, or are too big to time on a CPU\n")
    return format_plan(plan, probe_rates(plan.tasks))


def slurm_options(args: Namespace):
    """The SlurmOptions of the --slurm-* flags (None unless --backend slurm), checked."""
    if args.backend != "slurm":
        return None
    from rankbias.runs.backends.slurm import SlurmOptions

    extra = {}
    for item in args.slurm_opt or []:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("--")
        if not key or any(c.isspace() for c in key):
            raise RankbiasError(f"--slurm-opt takes KEY=VALUE (or a KEY alone), got {item!r}")
        extra[key] = value if sep else True
    given = {name: getattr(args, f"slurm_{name}") for name in
             ("partition", "mem", "account", "qos", "folder")
             if getattr(args, f"slurm_{name}") is not None}
    return SlurmOptions(time_min=args.slurm_time, cpus_per_task=args.slurm_cpus_per_task,
                        gpus_per_task=args.slurm_gpus_per_task,
                        parallelism=args.slurm_parallelism,
                        signal_delay_s=args.slurm_signal_delay, extra=extra, **given).check()


def _slurm_dry_run(configs: list, store: str, args: Namespace) -> str:
    """The stacks, the array and its job script: --backend slurm --dry-run."""
    from rankbias.runs.backends.slurm import check_slurm
    from rankbias.runs.estimate import slurm_plan

    check_slurm(submitting=False)  # the script needs submitit, not a cluster
    return slurm_plan(configs, store, slurm_options(args), args.ensemble, args.checkpoint_dir)


def sweep(args: Namespace) -> int:
    from rankbias.runs.sweep import load_sweep, run_sweep, sweep_table

    configs = load_sweep(args.file, args.scale)
    if args.dry_run:
        sys.stdout.write(sweep_table(configs, args.store))
        sys.stdout.write(_slurm_dry_run(configs, args.store, args) if args.backend == "slurm"
                         else dry_run_plan(configs, args.ensemble, args.workers))
        return 0
    summary = run_sweep(configs, args.store, args.workers, args.backend, args.address,
                        args.ensemble, progress=not args.no_progress,
                        run_timeout=args.run_timeout, checkpoint_dir=args.checkpoint_dir,
                        slurm=slurm_options(args))
    if args.format == "json":
        print(to_json(summary.as_dict()))
    else:
        s = summary.as_dict()
        print(f"{s['total']} runs: {s['executed']} executed, {s['skipped']} already in "
              f"{args.store}, {s['by_others']} finished by another sweep meanwhile, "
              f"{s['failed']} failed, {s['diverged']} diverged, {s['stopped']} stopped "
              f"({s['wall_s']:.1f} s)")
    return 1 if summary.failed else 0


def reproduce(args: Namespace) -> int:
    from rankbias.claims.pipeline import (
        all_configs,
        budget_tables,
        experiment_table,
        list_experiments,
        select,
    )
    from rankbias.claims.pipeline import reproduce as reproduce_claims

    if args.dry_run:
        experiments = select(list_experiments(args.scale, args.experiments), args.claims)
        sys.stdout.write(experiment_table(experiments) + budget_tables(experiments))
        configs = all_configs(experiments)
        if args.backend == "slurm":
            sys.stdout.write(_slurm_dry_run(configs, os.path.join(args.out, "results.db"), args))
        else:
            sys.stdout.write(dry_run_plan(configs, args.ensemble, args.workers)
                             + "then each claim's verdict and figures (not in the estimate)\n")
        return 0
    reproduce_claims(args.claims, args.scale, args.out, args.workers, args.ensemble,
                     args.backend, args.address, progress=not args.no_progress,
                     experiments_dir=args.experiments, run_timeout=args.run_timeout,
                     checkpoint_dir=args.checkpoint_dir, slurm=slurm_options(args))
    return 0


# --- rankbias report / serve / fit / predict --------------------------------------------------
def report(args: Namespace) -> int:
    from rankbias.report.report import report_store

    if args.max_groups < 1:
        raise RankbiasError("--max-groups must be >= 1")
    path = report_store(args.store, args.out, progress=not args.no_progress,
                        max_groups=args.max_groups)
    print(f"report written to {path}")
    return 0


def serve(args: Namespace) -> int:
    from rankbias.report.explorer import serve as serve_store

    if not 0 <= args.port <= 65535:
        raise RankbiasError(f"--port must be in 0..65535, got {args.port}")
    serve_store(args.store, args.host, args.port)
    return 0


def fit(args: Namespace) -> int:
    from rankbias.fit.fit import fit_report, fit_store, plot_fits

    result = fit_store(args.store, args.by, args.per_layer)
    print(fit_report(result, args.format))
    if args.figure:
        print(f"figure written to {plot_fits(result.fits, args.figure)}", file=sys.stderr)
    return 0


def predict(args: Namespace) -> int:
    """The report on stdout, warnings (extrapolation, several fits) on stderr."""
    from rankbias.fit.fit import predict as predict_rank
    from rankbias.fit.fit import predict_report

    result = predict_rank(args.model, args.batch_size, args.lr, args.weight_decay, args.store,
                          args.dataset, args.eps, args.patches)
    if result.get("extrapolated"):
        lo, hi = result["x_range"]
        print(f"rankbias predict: warning: x = {result['x']:.4g} lies outside the fitted x range "
              f"[{lo:.4g}, {hi:.4g}]: the prediction is an extrapolation", file=sys.stderr)
    if result.get("other_fits"):
        print(f"rankbias predict: warning: {result['other_fits']} other fit(s) match "
              f"{args.model!r}; used the one with the most runs ({result['fit_of']}); "
              "narrow with --dataset", file=sys.stderr)
    print(predict_report(result, args.format))
    return 0
