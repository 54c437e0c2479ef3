"""Sweeps: grids of runs from one YAML file, resumable, on local processes or Ray.

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

An experiment file of `rankbias reproduce` holds one such spec per scale under
`scales: {quick: ..., full: ..., paper: ...}`; `--scale` picks one.

Runs finished in the store (done or diverged) are skipped, so rerunning the same command
continues where it stopped; failed runs are retried. Only this driver writes the store;
workers return results.
"""

from __future__ import annotations

import copy
import itertools
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from rankbias.config import RunConfig, check_keys, read_yaml
from rankbias.store import FINISHED, Store, checkpoint_dir_for
from rankbias.train import RunResult
from rankbias.utils import RankbiasError, text_table

SWEEP_KEYS = ["base", "grid", "zip", "variants", "seeds"]
EXPERIMENT_KEYS = ["id", "claim", "statement", "rule", "rule_text", "check", "figures", "note",
                   "section", "scales"]
SCALES = ("quick", "full", "paper")


# --- the sweep file -------------------------------------------------------------------------
def expand(spec: dict, where: str = "sweep") -> list[RunConfig]:
    """The run configs of one sweep spec (base x grid x zip x variants x seeds), duplicates
    removed."""
    if not isinstance(spec, dict):
        raise RankbiasError(f"{where} must be a mapping with base/grid/zip/seeds")
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
        cfg = RunConfig.from_dict(values)
        if cfg.run_id() not in seen:
            seen.add(cfg.run_id())
            configs.append(cfg)
    return configs


def _set_dotted(values: dict, key: str, value: Any, where: str) -> None:
    head, _, rest = key.partition(".")
    if not rest:
        values[head] = value
        return
    if head not in ("model_args", "dataset_args"):
        raise RankbiasError(f"{where}: dotted key {key!r} must start with model_args. or "
                            "dataset_args.")
    values[head] = {**(values.get(head) or {}), rest: value}


def load_sweep(path: str | os.PathLike, scale: str | None = None) -> list[RunConfig]:
    """The runs of a sweep file, or of one scale of an experiment file."""
    spec = read_yaml(path)
    if not isinstance(spec, dict):
        raise RankbiasError(f"{path} must hold a mapping (base/grid/zip/seeds or scales)")
    if "scales" in spec:
        check_keys(spec, EXPERIMENT_KEYS, str(path))
        scale = scale or "quick"
        if scale not in spec["scales"]:
            raise RankbiasError(f"{path} has no scale {scale!r}; it has "
                                f"{', '.join(spec['scales'])}")
        return expand(spec["scales"][scale], f"{path} (scale {scale})")
    if scale is not None:
        raise RankbiasError(f"{path} has no scales: leave out --scale")
    return expand(spec, str(path))


# --- execution ------------------------------------------------------------------------------
@dataclass
class SweepSummary:
    total: int = 0
    executed: int = 0
    skipped: int = 0
    failed: int = 0
    diverged: int = 0
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        return {"total": self.total, "executed": self.executed, "skipped": self.skipped,
                "failed": self.failed, "diverged": self.diverged, "wall_s": round(self.wall_s, 2)}


def execute_task(configs: list[dict], checkpoint_dir: str | None) -> list[RunResult]:
    """Run one task (a run, or a group trained together) in a worker; never raises.

    A run that raises becomes a `failed` result carrying the error, so the sweep goes on.
    """
    from rankbias.train import train_run

    cfgs = [RunConfig.from_dict(c) for c in configs]
    try:
        if len(cfgs) > 1:
            from rankbias.ensemble import train_ensemble

            return train_ensemble(cfgs)
        ckpt = Path(checkpoint_dir) / f"{cfgs[0].run_id()}.pt" if checkpoint_dir else None
        return [train_run(cfgs[0], checkpoint_path=ckpt, resume=True)]
    except Exception as err:  # isolation: report, do not crash the worker
        message = f"{type(err).__name__}: {err}".splitlines()[0]
        detail = traceback.format_exc(limit=3)
        return [failed_result(c, f"{message}\n{detail}") for c in cfgs]


def failed_result(cfg: RunConfig, error: str) -> RunResult:
    now = time.time()
    return RunResult(run_id=cfg.run_id(), config=cfg.to_dict(), status="failed", error=error,
                     started=now, finished=now)


def group_tasks(configs: list[RunConfig], ensemble: str = "auto", workers: int = 1,
                max_group: int = 16) -> list[list[RunConfig]]:
    """Tasks for the workers, the longest first (so no worker is left with a long tail).

    ensemble=auto: runs that differ only in lr, weight decay and seed and have a batched
    fast path train together, in groups of at most `max_group`, split further so that
    every worker gets work; others are one task each.
    """
    from rankbias.ensemble import ensemble_key, has_fast_path

    if ensemble == "off":
        return sorted(([c] for c in configs), key=_task_cost, reverse=True)
    groups: dict[Any, list[RunConfig]] = {}
    for cfg in configs:
        key = ensemble_key(cfg) if has_fast_path(cfg) else cfg.run_id()
        groups.setdefault(key, []).append(cfg)
    size = max(1, min(max_group, -(-len(configs) // workers)))
    tasks = [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]
    return sorted(tasks, key=_task_cost, reverse=True)


def _task_cost(task: list[RunConfig]) -> float:
    """Relative time of a task, for ordering only: epochs x batches per epoch (the data
    set size is unknown before loading: an integer `subset` or 1,500); a batched group of
    K costs about as many calls per step as one run, plus a little per member."""
    cfg = task[0]
    subset = cfg.dataset_args.get("subset")
    examples = subset if isinstance(subset, int) else 1500
    return cfg.epochs * examples / cfg.batch_size * (1 + 0.25 * (len(task) - 1))


def run_sweep(configs: list[RunConfig], store_path: str | os.PathLike, workers: int | None = None,
              backend: str = "local", address: str | None = None, ensemble: str = "off",
              progress: bool = True,
              on_result: Callable[[RunResult], None] | None = None) -> SweepSummary:
    """Run every config not yet finished in the store; return the counts.

    Ctrl-C stops the workers; runs in flight are not marked done, so the same call
    continues where it stopped.
    """
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise RankbiasError("--workers must be >= 1")
    if backend not in ("local", "ray"):
        raise RankbiasError(f"unknown backend {backend!r}: use local or ray")
    started = time.time()
    summary = SweepSummary(total=len(configs))
    with Store(store_path) as store:
        todo = [c for c in configs if store.status(c.run_id()) not in FINISHED]
        summary.skipped = len(configs) - len(todo)
        for cfg in todo:
            store.mark(cfg.run_id(), cfg.to_dict(), "pending")
        tasks = group_tasks(todo, ensemble, workers)
        bar = _bar(len(todo), progress)

        def record(result: RunResult) -> None:
            store.save_result(result) if result.status != "failed" else store.mark(
                result.run_id, result.config, "failed", result.error)
            summary.executed += 1
            summary.failed += result.status == "failed"
            summary.diverged += result.status == "diverged"
            if bar:
                bar.update(1)
                bar.set_postfix(failed=summary.failed, diverged=summary.diverged)
            if on_result:
                on_result(result)

        ckpt_dir = str(checkpoint_dir_for(store_path))
        try:
            if not tasks:
                pass
            elif backend == "ray":
                from rankbias.ray_backend import run_tasks_on_ray

                run_tasks_on_ray(tasks, ckpt_dir, workers, address, record)
            else:  # worker processes even for one: a crash must not take the driver down
                run_tasks_locally(tasks, ckpt_dir, workers, record)
        finally:
            if bar:
                bar.close()
    summary.wall_s = time.time() - started
    return summary


def _bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True, desc="sweep")


# --- the local backend: long-lived worker processes, one task at a time each ---------------
def _worker_main(conn, threads: int) -> None:
    import signal

    import torch

    # Ctrl-C reaches the whole process group: the driver handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)  # one thread per process: two 2-thread processes on 2
    while True:                      # cores run many times slower (DESIGN.md)
        try:
            message = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if message is None:
            return
        configs, ckpt_dir = message
        conn.send(execute_task(configs, ckpt_dir))


class _Worker:
    def __init__(self, context) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, 1), daemon=True)
        self.process.start()
        child.close()
        self.task: list[RunConfig] | None = None

    def send(self, task: list[RunConfig], ckpt_dir: str) -> None:
        self.task = task
        self.conn.send(([c.to_dict() for c in task], ckpt_dir))

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(timeout=5)


def run_tasks_locally(tasks: list[list[RunConfig]], ckpt_dir: str, workers: int,
                      record: Callable[[RunResult], None]) -> None:
    """Feed tasks to `workers` processes; a worker that dies fails its task and is replaced."""
    # forkserver: a clean process (no OpenMP threads to inherit) imports torch and the
    # trainer once; every worker, replacements included, is a cheap fork of it. The first
    # torch.optim optimizer imports torch._dynamo (~2 s here): preloaded too.
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["rankbias.sweep", "rankbias.ensemble", "torch._dynamo"])
    pending = list(tasks)
    pool = [_Worker(context) for _ in range(min(workers, len(tasks)))]

    def dispatch(index: int) -> None:
        """Give pool[index] the next task; an idle worker found dead is replaced first."""
        task = pending.pop(0)
        try:
            pool[index].send(task, ckpt_dir)
        except OSError:
            pool[index].stop()
            pool[index] = _Worker(context)
            pool[index].send(task, ckpt_dir)

    deaths_in_a_row = 0  # workers lost with no result in between: a broken set-up
    try:
        for index in range(len(pool)):
            dispatch(index)
        while any(w.task is not None for w in pool):
            busy = [w for w in pool if w.task is not None]
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for worker in busy:
                if worker.conn in ready and worker.conn.poll():
                    try:
                        results = worker.conn.recv()
                    except (EOFError, OSError):  # the worker died
                        results = None
                    if results is not None:
                        worker.task = None
                        deaths_in_a_row = 0
                        for result in results:
                            record(result)
                if worker.task is not None and not worker.process.is_alive():
                    code = worker.process.exitcode
                    for cfg in worker.task:
                        record(failed_result(cfg, f"worker process died (exit code {code})"))
                    worker.stop()
                    deaths_in_a_row += 1
                    if deaths_in_a_row >= 3:
                        raise RankbiasError(
                            f"3 worker processes died in a row (exit code {code}) without "
                            "finishing a run; the other runs are left pending. Run the "
                            "sweep from a script file or the rankbias command (workers "
                            "re-import the main module), or check memory")
                    pool[pool.index(worker)] = worker = _Worker(context)
                if worker.task is None and pending:
                    dispatch(pool.index(worker))
    finally:
        for worker in pool:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
            worker.stop()


def sweep_table(configs: Iterable[RunConfig], store_path: str | os.PathLike | None) -> str:
    """The runs of a sweep, one line each, with the fields that vary (for --dry-run)."""
    configs = list(configs)
    if not configs:
        return "no runs\n"
    dicts = [c.to_dict() for c in configs]
    varying = [k for k in dicts[0] if len({repr(d[k]) for d in dicts}) > 1]
    statuses = {}
    if store_path and os.path.isfile(store_path):
        with Store(store_path) as store:
            statuses = {c.run_id(): store.status(c.run_id()) for c in configs}
    rows = [["run_id", "in store", *varying]]
    for cfg, d in zip(configs, dicts):
        rows.append([cfg.run_id(), statuses.get(cfg.run_id()) or "-",
                     *(str(d[k]) for k in varying)])
    return text_table(rows) + f"{len(configs)} runs\n"
