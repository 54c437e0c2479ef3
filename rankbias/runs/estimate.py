"""How big a sweep is, and how long it will take here: `rankbias sweep FILE --dry-run`;
with --backend slurm, the job array it would submit instead of a time (`slurm_plan`).

    plan = plan_sweep(configs, ensemble="auto", workers=2)
    print(format_plan(plan, probe_rates(plan.tasks)))

Counts come from the configs and the published sizes of the data sets (no file is read):
runs, SGD steps (epochs x mini-batches per epoch, each run's own), and the tasks the sweep
would hand to its workers (a stack of runs trained together counts as one task). The
estimate times a few real steps of every kind of task in this process, on synthetic data
of the right shape, for about two seconds in all, and one tracking point of one member
(the evaluation on the training and test sets, scaled from a few hundred examples, and the
rank summaries of every matrix: about a sixth of the quick scale's training time), then
schedules the tasks on the workers, the longest first, as the sweep does. It leaves out
the workers' start and cannot see a GPU the machine lacks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rankbias.data import describe
from rankbias.training.budget import budget_cells
from rankbias.training.config import RunConfig
from rankbias.training.sgd import batch_starts
from rankbias.training.state import process_state
from rankbias.training.train import resolve_device
from rankbias.utils import RankbiasError, text_table

if TYPE_CHECKING:
    from rankbias.runs.backends.slurm import SlurmOptions


@dataclass
class Plan:
    runs: int
    steps: int  # SGD steps of all runs together
    tasks: list[list[RunConfig]] = field(repr=False)
    workers: int = 1

    @property
    def stacks(self) -> int:
        return sum(len(t) > 1 for t in self.tasks)


def run_steps(cfg: RunConfig) -> int:
    """SGD steps of one run: epochs x mini-batches per epoch. (With BatchNorm the trainer
    drops a last batch of a single example; counted here as dropped for every model.)"""
    n, _, _ = describe(cfg.dataset, cfg.dataset_args)
    return cfg.epochs * len(batch_starts(n, cfg.batch_size, cfg.drop_last, batch_norm=True))


def run_tracks(cfg: RunConfig) -> int:
    """Tracking points of one run: at step 0, then after every track_every-th epoch and the
    last (train.Run._tracks_after)."""
    return 1 + cfg.epochs // cfg.track_every + (cfg.epochs % cfg.track_every > 0)


def plan_sweep(configs: list[RunConfig], ensemble: str = "auto", workers: int = 1) -> Plan:
    from rankbias.runs.sweep import group_tasks

    return Plan(len(configs), sum(run_steps(c) for c in configs),
                group_tasks(configs, ensemble, workers), workers)


def _kind(task: list[RunConfig]) -> tuple:
    """What a task's step costs depend on: model, input, batch size, stack size, device."""
    cfg = task[0]
    return (cfg.model, repr(sorted(cfg.model_args.items())), cfg.dataset,
            repr(sorted(cfg.dataset_args.items())), cfg.batch_size, len(task), cfg.optimizer,
            cfg.device)


@dataclass(frozen=True)
class Rate:
    steps_per_s: float  # of the whole task: one step of a stack advances all its runs
    track_s: float  # one tracking point of one run


def probe_rates(tasks: list[list[RunConfig]], budget_s: float = 2.0) -> dict[tuple, Rate]:
    """The step rate and tracking time of every kind of task, timed in this process with
    one torch thread, as a worker runs."""
    kinds = {}
    for task in tasks:
        kinds.setdefault(_kind(task), task)
    rates = {}
    with process_state(threads=1):
        for kind, task in kinds.items():
            rates[kind] = _probe(task, budget_s / len(kinds))
    return rates


def _probe(task: list[RunConfig], seconds: float) -> Rate:
    from rankbias.models import create_model, random_input
    from rankbias.training.ensemble import can_stack, handwritten_mlp
    from rankbias.training.mlp_stack import MLPStack
    from rankbias.training.sgd import loss_function, make_optimizer, sgd_step
    from rankbias.training.stack import ModelStack

    cfg = task[0]
    device = resolve_device(cfg.device)
    _, shape, classes = describe(cfg.dataset, cfg.dataset_args)
    models = [create_model(cfg.model, shape, classes, **cfg.model_args).to(device)
              for _ in task]
    x = random_input(models[0], shape, len(task), cfg.batch_size, device=device)
    y = torch.randint(classes, (len(task), cfg.batch_size), device=device)
    if len(task) > 1 and can_stack(cfg):
        engine = MLPStack if handwritten_mlp(cfg) else ModelStack
        stack = engine(models, task, device)

        def step() -> None:
            with torch.inference_mode(not stack.autograd):
                stack.step(x, y)
    else:
        optimizers = [make_optimizer(m, c) for m, c in zip(models, task)]
        loss_fn = loss_function(cfg.loss, classes)

        def step() -> None:  # a task that is not a stack trains its runs one by one
            for model, optimizer, xs, ys in zip(models, optimizers, x, y):
                sgd_step(model, optimizer, loss_fn, xs, ys)
    step()  # warm-up: first-call allocations and kernel selection
    count, started = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - started < seconds:
        step()
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    steps_per_s = count / (time.perf_counter() - started)
    return Rate(steps_per_s, _track_seconds(models[0], cfg, shape, classes, device))


EVAL_PROBE = 256  # examples evaluated to time the evaluation; its cost is linear in them


def _track_seconds(model: torch.nn.Module, cfg: RunConfig, shape: tuple[int, ...],
                   classes: int, device: torch.device) -> float:
    """Seconds of one tracking point of one run (train.Run.track): the evaluation on the
    training and test sets, timed on EVAL_PROBE synthetic examples and scaled to their
    sizes, and the rank summaries of every matrix (RankTracker.track, after a first point
    so that the weight change is measured too)."""
    from rankbias.data import n_test_examples
    from rankbias.metrics.tracker import RankTracker
    from rankbias.models import random_input
    from rankbias.training.sgd import evaluate, loss_function

    examples = describe(cfg.dataset, cfg.dataset_args)[0] + n_test_examples(cfg.dataset,
                                                                            cfg.dataset_args)
    chunk = min(examples, EVAL_PROBE)
    x = random_input(model, shape, chunk, device=device)
    y = torch.randint(classes, (chunk,), device=device)
    loss_fn = loss_function(cfg.loss, classes)
    tracker = RankTracker(model, cfg.tolerances)
    evaluate(model, x, y, loss_fn)  # warm-up
    tracker.track(0)
    evaluation = _fastest(lambda: evaluate(model, x, y, loss_fn)) * examples / chunk
    return evaluation + _fastest(lambda: tracker.track(1))


def _fastest(call: Callable[[], object], repeats: int = 3) -> float:
    """The shortest of a few timings of `call`: one alone can hold a garbage collection."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def task_seconds(task: list[RunConfig], rate: Rate) -> float:
    """A task's steps at its probed rate, and every tracking point of each of its runs."""
    return run_steps(task[0]) / rate.steps_per_s + sum(map(run_tracks, task)) * rate.track_s


def estimate_seconds(plan: Plan, rates: dict[tuple, Rate]) -> float:
    """Wall time of the sweep: every task's time, handed to the workers longest first (the
    sweep's own order), each to the one free earliest."""
    from rankbias.runs.sweep import makespan

    return makespan((task_seconds(t, rates[_kind(t)]) for t in plan.tasks), plan.workers)


def format_plan(plan: Plan, rates: dict[tuple, Rate] | None = None) -> str:
    text = (f"{plan.runs} runs, {plan.steps:,} SGD steps, in {len(plan.tasks)} tasks "
            f"({plan.stacks} stacks of 2+ runs trained together) for {plan.workers} workers\n")
    if rates:
        seconds = estimate_seconds(plan, rates)
        text += (f"estimated wall time here: {_duration(seconds)} (training and rank tracking, "
                 f"from a {len(rates)}-kind probe)\n")
    return text


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


CPU_PROBE_LIMIT = 2_000_000  # parameters: a bigger model's CPU step says nothing of a GPU run


def measurable(configs: list[RunConfig]) -> bool:
    """Whether this machine can time these runs usefully: their device exists here, and on
    a CPU their models are small (a full-width ResNet-18 or VGG-16 is a GPU's work)."""
    from rankbias.models import create_model

    try:
        devices = {resolve_device(c.device).type for c in configs}
    except RankbiasError:
        return False
    if devices != {"cpu"}:
        return True
    kinds = {(c.model, repr(sorted(c.model_args.items())), c.dataset,
              repr(sorted(c.dataset_args.items()))): c for c in configs}
    for cfg in kinds.values():
        _, shape, classes = describe(cfg.dataset, cfg.dataset_args)
        model = create_model(cfg.model, shape, classes, **cfg.model_args)
        if sum(p.numel() for p in model.parameters()) > CPU_PROBE_LIMIT:
            return False
    return True


# --- the dry run of --backend slurm --------------------------------------------------------
def slurm_plan(configs: list[RunConfig], store_path: str | os.PathLike,
               options: SlurmOptions, ensemble: str = "auto",
               checkpoint_dir: str | os.PathLike | None = None) -> str:
    """What `--backend slurm --dry-run` prints under the runs: the stacks the array would
    train (runs not finished in the store), its size and the job script. Submits nothing."""
    from rankbias.runs.backends.slurm import job_script, slurm_dir_for
    from rankbias.runs.slurm_jobs import recorded_jobs
    from rankbias.runs.store import FINISHED, Store, checkpoint_dir_for
    from rankbias.runs.sweep import group_tasks

    statuses, recorded = {}, {}
    if os.path.isfile(store_path):
        with Store(store_path) as store:
            statuses, recorded = store.statuses(), recorded_jobs(store)
    todo = [c for c in configs if statuses.get(c.run_id()) not in FINISHED]
    tasks = group_tasks(todo, ensemble, options.parallelism)
    folder = Path(options.folder or slurm_dir_for(store_path)).expanduser().absolute()
    rows = [["task", "runs", "model", "dataset", "batch_size", "run ids"]]
    for i, task in enumerate(tasks):
        ids = [c.run_id() for c in task]
        rows.append([str(i), str(len(task)), task[0].model, task[0].dataset,
                     str(task[0].batch_size), " ".join(ids[:3]) + (" ..." if len(ids) > 3 else "")])
    waiting = sum(c.run_id() in recorded for c in todo)
    text = (f"SLURM: one job array of {len(tasks)} tasks (one per stack of runs), at most "
            f"{min(options.parallelism, max(1, len(tasks)))} at once, for {len(todo)} runs not "
            f"finished in the store\n")
    if waiting:
        text += (f"{waiting} of them have a recorded job: those still queued or running are "
                 "waited for, not submitted again\n")
    text += (f"job folder (scripts, logs, results): {folder}\ncheckpoints (every node must see "
             f"this folder): {Path(checkpoint_dir or checkpoint_dir_for(store_path)).resolve()}\n")
    if not tasks:
        return text + "nothing to submit\n"
    return text + text_table(rows) + "job script (what sbatch gets):\n" + job_script(
        options, len(tasks), folder)


def budget_table(configs: list[RunConfig], label: str = "") -> str:
    """One line per setting (its seeds together) with the fields that vary: T, k*, D and
    T/k*; D marked * below log(2/eps)."""
    settings = {c.replace(seed=0).run_id(): c for c in configs}
    if not settings:
        return ""
    dicts = [{"model": _architecture(c), **{k: v for k, v in c.to_dict().items()
                                            if k not in ("model", "model_args")}}
             for c in settings.values()]
    varying = [k for k in dicts[0] if k != "seed" and len({repr(d[k]) for d in dicts}) > 1]
    rows = [["claim", *varying, "T", "k*", "D", "T/k*"]]
    for cfg, d in zip(settings.values(), dicts):
        rows.append([label, *(str(d[k]) for k in varying), *budget_cells(cfg)])
    return text_table(rows)


def _architecture(cfg: RunConfig) -> str:
    """The model and the options that differ from its defaults: mlp(depth=4, width=64)."""
    from rankbias.models import model_options

    defaults = model_options(cfg.model)
    options = ", ".join(f"{k}={v}" for k, v in cfg.model_args.items() if defaults.get(k) != v)
    return f"{cfg.model}({options})" if options else cfg.model
