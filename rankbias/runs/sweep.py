"""Sweeps: grids of runs from one YAML file, resumable, on local processes, Ray or SLURM.

A sweep file:

    base:                      # a run config (RunConfig field names)
      model: mlp
      epochs: 100
      model_args: {depth: 6, width: 100}
    grid:                      # cartesian product; dotted keys reach into dicts
      batch_size: [8, 32, 128]
      model_args.width: [50, 100]
    zip:                       # lists varied together (same length), e.g. constant lr*wd
      lr: [0.1, 0.2, 0.4]
      weight_decay: [0.02, 0.01, 0.005]
    variants:                  # whole sets of overrides, crossed with the rest
      - {dataset: digits}
      - {dataset: fashion-mnist, dataset_args: {subset: 10000}}
    seeds: [0, 1, 2]
    steps: 2000                # optional: each run trains ceil(2000 / its steps per epoch)
                               # epochs, so every B gets the same number of SGD steps
    k_star: 6                  # optional, constant lr: each run trains until T >= 6 k* of
                               # its own, k* = log(2/eps) / (lr wd): equal decay budgets
    milestones_at: [0.5, 0.75] # optional: multistep, lr x gamma at these fractions of each
                               # run's own epochs (the same schedule shape in steps)

An experiment file of `rankbias reproduce` holds one such spec per scale under
`scales: {quick: ..., full: ..., paper: ...}`; `--scale` picks one.

Runs finished in the store (done or diverged) are skipped, so rerunning the same command
continues where it stopped; failed runs are retried. Only this driver writes the store;
workers return results.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rankbias.runs.backends.local import run_tasks_locally
from rankbias.runs.backends.tasks import TaskQueue
from rankbias.runs.store import FINISHED, Store, checkpoint_dir_for
from rankbias.training.budget import budget_cells
from rankbias.training.config import RunConfig, check_keys, read_yaml
from rankbias.training.train import RunResult
from rankbias.utils import RankbiasError, available_cpus, pause_point, text_table

SWEEP_KEYS = ["base", "grid", "zip", "variants", "seeds", "steps", "k_star", "milestones_at"]
EXPERIMENT_KEYS = ["id", "claim", "statement", "rule", "rule_text", "check", "figures", "note",
                   "section", "scales"]
REQUIRED_KEYS = {"id": str, "claim": int, "statement": str, "rule_text": str, "rule": dict,
                 "scales": dict}
_KINDS = {str: "text", int: "whole number", dict: "mapping"}

if TYPE_CHECKING:
    from rankbias.runs.backends.slurm import SlurmOptions


# --- the sweep file -------------------------------------------------------------------------
def expand(spec: dict | list, where: str = "sweep") -> list[RunConfig]:
    """The run configs of one sweep spec (base x grid x zip x variants x seeds), or of a
    list of specs (their union: e.g. one grid per architecture), duplicates removed."""
    if isinstance(spec, list) and spec:
        configs = [c for i, part in enumerate(spec) for c in expand(part, f"{where}, part {i + 1}")]
        return list({c.run_id(): c for c in configs}.values())
    if not isinstance(spec, dict):
        raise RankbiasError(f"{where} must be a mapping with base/grid/zip/seeds (or a list "
                            "of them)")
    check_keys(spec, SWEEP_KEYS, where)
    base = spec.get("base") or {}
    grid = spec.get("grid") or {}
    zipped = spec.get("zip") or {}
    seeds = spec.get("seeds")
    variants = spec.get("variants") or [{}]
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise RankbiasError(f"{where}: variants must be a list of mappings of overrides")
    for key, values in list(grid.items()) + list(zipped.items()):
        if not isinstance(values, list) or not values:
            raise RankbiasError(f"{where}: {key} must be a non-empty list of values")
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise RankbiasError(f"{where}: the zip lists must have one length, got "
                            + ", ".join(f"{k}={len(v)}" for k, v in zipped.items()))
    if seeds is not None and (not isinstance(seeds, list) or not seeds):
        raise RankbiasError(f"{where}: seeds must be a non-empty list of integers")
    grid_points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    zip_points = [dict(zip(zipped, combo)) for combo in zip(*zipped.values())] or [{}]
    configs, seen = [], set()
    for point, paired, variant, seed in itertools.product(grid_points, zip_points, variants,
                                                          seeds or [None]):
        values = copy.deepcopy(base)
        for key, value in {**point, **paired, **copy.deepcopy(variant)}.items():
            _set_dotted(values, key, value, where)
        if seed is not None:
            values["seed"] = seed
        try:
            cfg = RunConfig.from_dict(values)
        except RankbiasError as err:  # name the file: a sweep may be one of several
            raise RankbiasError(f"{where}: {err}") from None
        cfg = _length(cfg, spec, where)
        if cfg.run_id() not in seen:
            seen.add(cfg.run_id())
            configs.append(cfg)
    return configs


def _length(cfg: RunConfig, spec: dict, where: str) -> RunConfig:
    """The run's epochs from the spec's `steps` (at least that many SGD steps) or `k_star`
    (at least that many k* of its own: equal decay budgets at a constant lr), and its
    multistep milestones from `milestones_at` (fractions of its own epochs)."""
    from rankbias.training.budget import k_star, steps_per_epoch

    if "steps" in spec and "k_star" in spec:
        raise RankbiasError(f"{where}: give steps or k_star, not both")
    steps = spec.get("steps")
    if "k_star" in spec:
        if cfg.schedule != "constant" or not math.isfinite(k_star(cfg)):
            raise RankbiasError(f"{where}: k_star needs a constant lr and weight decay > 0 "
                                "(k* = log(2/eps) / (lr wd)); use steps for the others")
        steps = spec["k_star"] * k_star(cfg) if _positive(spec["k_star"]) else 0
    if steps is not None:
        if not _positive(steps):
            raise RankbiasError(f"{where}: steps and k_star must be positive numbers")
        cfg = cfg.replace(epochs=max(1, math.ceil(steps / steps_per_epoch(cfg))))
    fractions = spec.get("milestones_at")
    if fractions is not None:
        if not (isinstance(fractions, list) and fractions
                and all(_positive(f) and f < 1 for f in fractions)):
            raise RankbiasError(f"{where}: milestones_at must be a list of fractions in (0, 1)")
        cfg = cfg.replace(schedule="multistep", milestones=sorted(
            {max(1, round(f * cfg.epochs)) for f in fractions}))
    return cfg


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _set_dotted(values: dict, key: str, value: Any, where: str) -> None:
    head, _, rest = key.partition(".")
    if not rest:
        values[head] = value
        return
    if head not in ("model_args", "dataset_args"):
        raise RankbiasError(f"{where}: dotted key {key!r} must start with model_args. or "
                            "dataset_args.")
    values[head] = {**(values.get(head) or {}), rest: value}


def read_experiment(path: str | os.PathLike, scale: str) -> dict:
    """An experiment file of `rankbias reproduce`, checked: its keys, their types, and the
    scale asked for; one-line errors naming the file and what is wrong."""
    spec = read_yaml(path)
    if not isinstance(spec, dict):
        raise RankbiasError(f"{path} must hold a mapping with {', '.join(REQUIRED_KEYS)}")
    check_keys(spec, EXPERIMENT_KEYS, str(path))
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(spec.get(key), kind) or isinstance(spec.get(key), bool):
            raise RankbiasError(f"{path}: {key} must be a {_KINDS[kind]}, got "
                                f"{spec.get(key)!r}")
    if scale not in spec["scales"]:
        raise RankbiasError(f"{path} has no scale {scale!r}; it has "
                            f"{', '.join(spec['scales'])}")
    return spec


def load_sweep(path: str | os.PathLike, scale: str | None = None) -> list[RunConfig]:
    """The runs of a sweep file, or of one scale of an experiment file."""
    spec = read_yaml(path)
    if not isinstance(spec, dict):
        raise RankbiasError(f"{path} must hold a mapping (base/grid/zip/seeds or scales)")
    if "scales" in spec:
        scale = scale or "quick"
        return expand(read_experiment(path, scale)["scales"][scale], f"{path} (scale {scale})")
    if scale is not None:
        raise RankbiasError(f"{path} has no scales: leave out --scale")
    return expand(spec, str(path))


# --- execution ------------------------------------------------------------------------------
@dataclass
class SweepSummary:
    total: int = 0
    executed: int = 0  # trained by this sweep (finished, diverged, stopped or failed)
    skipped: int = 0  # already finished in the store
    by_others: int = 0  # finished meanwhile by another driver on the same store
    failed: int = 0
    diverged: int = 0
    stopped: int = 0  # ended early by the authors' rule (train accuracy stuck at chance)
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        return {"total": self.total, "executed": self.executed, "skipped": self.skipped,
                "by_others": self.by_others, "failed": self.failed, "diverged": self.diverged,
                "stopped": self.stopped, "wall_s": round(self.wall_s, 2)}


def group_tasks(configs: list[RunConfig], ensemble: str = "auto", workers: int = 1,
                max_group: int | None = None) -> list[list[RunConfig]]:
    """Tasks for the workers, the longest first (so no worker is left with a long tail).

    ensemble=auto: runs that differ only in lr, weight decay and seed, of a model that can
    be stacked, train together in stacks sized to memory (`ensemble.stack_limit`: at most
    16 members on a CPU, 256 on a GPU, fewer where they would not fit); groups are split
    into 1-4 stacks of equal size, whichever gives the shortest schedule on `workers`
    (3 stacks on 2 workers leave one idle half the time; 6 halves keep both busy); others
    are one task each. Decided from the configs alone: the device is resolved by each
    worker, not by the driver.
    """
    from rankbias.training.ensemble import can_stack, ensemble_key, stack_limit

    if ensemble == "off":
        return sorted(([c] for c in configs), key=_task_cost, reverse=True)
    groups: dict[Any, list[RunConfig]] = {}
    for cfg in configs:
        key = ensemble_key(cfg) if can_stack(cfg) else cfg.run_id()
        groups.setdefault(key, []).append(cfg)
    limits = [(max_group or stack_limit(g[0], workers)) if len(g) > 1 else 1
              for g in groups.values()]
    plans = [[part for group, limit in zip(groups.values(), limits)
              for part in _split(group, max(-(-len(group) // limit), min(factor, len(group))))]
             for factor in (1, 2, 3, 4)]
    best = min(plans, key=lambda tasks: (makespan(map(_task_cost, tasks), workers), len(tasks)))
    return sorted(best, key=_task_cost, reverse=True)


def _split(group: list[RunConfig], parts: int) -> list[list[RunConfig]]:
    """`group` in `parts` stacks whose sizes differ by at most one."""
    size, extra = divmod(len(group), parts)
    starts = [i * size + min(i, extra) for i in range(parts + 1)]
    return [group[a:b] for a, b in zip(starts, starts[1:])]


def makespan(costs: Iterable[float], workers: int) -> float:
    """When the last worker finishes, tasks of these costs handed out longest first (as the
    queue does), each to the worker free earliest; in the costs' units."""
    loads = [0.0] * max(1, workers)
    for cost in sorted(costs, reverse=True):
        loads[loads.index(min(loads))] += cost
    return max(loads)


def _task_cost(task: list[RunConfig]) -> float:
    """Relative time of a task, for ordering only: epochs x batches per epoch (the data
    set size is unknown before loading: an integer `subset` or 1,500); a batched group of
    K costs about as many calls per step as one run, plus a little per member."""
    cfg = task[0]
    subset = cfg.dataset_args.get("subset")
    examples = subset if isinstance(subset, int) else 1500
    return cfg.epochs * examples / cfg.batch_size * (1 + 0.25 * (len(task) - 1))


def run_sweep(configs: list[RunConfig], store_path: str | os.PathLike, workers: int | None = None,
              backend: str = "local", address: str | None = None, ensemble: str = "auto",
              progress: bool = True, on_result: Callable[[RunResult], None] | None = None,
              run_timeout: float | None = None,
              checkpoint_dir: str | os.PathLike | None = None,
              slurm: SlurmOptions | None = None) -> SweepSummary:
    """Train every config not yet finished in the store; return the counts.

    Each run is claimed in the store before it is trained, so several sweeps on one store
    (on one machine) share the work and train each run once; a sweep waits for the runs
    another one holds, and takes them over if that driver dies. Ctrl-C stops the workers
    and gives the runs in flight back, so the same call continues where it stopped (from
    their checkpoints). `run_timeout`: seconds after which a task (a run, or a stack of
    runs trained together) is stopped and its runs marked failed. `checkpoint_dir`: where
    checkpoints go (default: the store's own folder, `checkpoint_dir_for`). `slurm`: the
    array tasks' resources for backend="slurm" (rankbias/runs/backends/slurm.py), whose
    --slurm-parallelism takes the place of `workers`.
    """
    workers = available_cpus() if workers is None else workers
    if workers < 1:
        raise RankbiasError("--workers must be >= 1")
    if backend not in ("local", "ray", "slurm"):
        raise RankbiasError(f"unknown backend {backend!r}: use local, ray or slurm")
    if backend == "slurm":  # every check before the store is touched
        from rankbias.runs.backends.slurm import prepare

        slurm = prepare(slurm, run_timeout)
        workers = slurm.parallelism
    if ensemble not in ("auto", "off"):
        raise RankbiasError(f"unknown ensemble mode {ensemble!r}: use auto or off")
    if run_timeout is not None and not run_timeout > 0:
        raise RankbiasError(f"--run-timeout must be > 0 seconds, got {run_timeout}")
    started = time.time()
    summary = SweepSummary(total=len(configs))
    with Store(store_path) as store:
        statuses = store.statuses()
        todo = [c for c in configs if statuses.get(c.run_id()) not in FINISHED]
        summary.skipped = len(configs) - len(todo)
        store.add_pending(todo)
        queue = TaskQueue(store, group_tasks(todo, ensemble, workers))
        bar = _bar(len(todo), progress)

        def record(result: RunResult) -> None:
            store.save_result(result) if result.status != "failed" else store.mark(
                result.run_id, result.config, "failed", result.error)
            queue.finished(result.run_id)
            summary.executed += 1
            pause_point("results", summary.executed)
            for status in ("failed", "diverged", "stopped"):
                setattr(summary, status, getattr(summary, status) + (result.status == status))
            if bar:
                bar.update(1)
                bar.set_postfix(failed=summary.failed, diverged=summary.diverged)
            if on_result:
                on_result(result)

        ckpt_dir = str(checkpoint_dir or checkpoint_dir_for(store_path))
        try:
            if not queue.pending:
                pass
            elif backend == "ray":
                from rankbias.runs.backends.ray import run_tasks_on_ray

                run_tasks_on_ray(queue, ckpt_dir, workers, address, record, run_timeout)
            elif backend == "slurm":
                from rankbias.runs.backends.slurm import run_tasks_on_slurm, slurm_dir_for

                run_tasks_on_slurm(queue, ckpt_dir, slurm, record,
                                   slurm.folder or slurm_dir_for(store_path))
            else:  # worker processes even for one: a crash must not take the driver down
                run_tasks_locally(queue, ckpt_dir, workers, record, run_timeout)
        except BaseException:
            queue.release()
            raise
        finally:
            summary.by_others = queue.by_others
            if bar:
                bar.update(queue.by_others)
                bar.close()
    summary.wall_s = time.time() - started
    return summary


def _bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True, desc="sweep")


def sweep_table(configs: Iterable[RunConfig], store_path: str | os.PathLike | None) -> str:
    """The runs of a sweep, one line each, with the fields that vary and each run's decay
    budget (for --dry-run): its steps T, k*, D and T/k* (training/budget.py)."""
    configs = list(configs)
    if not configs:
        return "no runs\n"
    dicts = [c.to_dict() for c in configs]
    varying = [k for k in dicts[0] if len({repr(d[k]) for d in dicts}) > 1]
    statuses = {}
    if store_path and os.path.isfile(store_path):
        with Store(store_path, readonly=True) as store:
            statuses = {c.run_id(): store.status(c.run_id()) for c in configs}
    rows = [["run_id", "in store", *varying, "T", "k*", "D", "T/k*"]]
    for cfg, d in zip(configs, dicts):
        rows.append([cfg.run_id(), statuses.get(cfg.run_id()) or "-",
                     *(str(d[k]) for k in varying), *budget_cells(cfg)])
    return (text_table(rows) + f"{len(configs)} runs; D = sum of lr_t*wd over the steps, the "
            "decay budget: below log(2/eps) (7.6 at eps 1e-3, marked *) weight decay has not "
            "had the time to lower the eps-rank\n")
