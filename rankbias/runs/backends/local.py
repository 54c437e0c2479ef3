"""The local backend: long-lived worker processes, one task at a time each.

Workers are forks of a forkserver that imported torch and the trainer once, with one
torch thread each (two 2-thread processes on 2 cores run many times slower:
docs/performance.md, "One torch thread per process").
A worker that dies fails its task only and is replaced; one that runs past the run
timeout is killed, its runs marked failed with the reason, and replaced.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait

from rankbias.runs.backends.tasks import POLL_S, RENEW_S, TaskQueue, execute_task, failed_result
from rankbias.training.config import RunConfig
from rankbias.training.train import RunResult
from rankbias.utils import RankbiasError


def prepare_worker(driver: int, threads: int = 1) -> None:
    """A worker process's set-up (also the claims' evaluation pool's): Ctrl-C left to the
    driver `driver` (a pid), an exit once that driver is gone, `threads` torch threads."""
    import torch

    # Ctrl-C reaches the whole process group: the driver handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_driver, args=(driver,), daemon=True).start()
    torch.set_num_threads(threads)


def _worker_main(conn, threads: int, driver: int) -> None:
    prepare_worker(driver, threads)
    while True:
        try:
            message = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if message is None:
            return
        configs, ckpt_dir = message
        conn.send(execute_task(configs, ckpt_dir))


def _exit_with_driver(driver: int) -> None:
    """End this worker once the driver is gone. A driver killed outright (`kill`, SIGKILL,
    a batch system's SIGTERM) runs no clean-up, and its workers (children of the
    forkserver, which outlives it too) would train their tasks to the end for nobody. Its
    runs' claims lapse with it: the next sweep on the store takes them over, from their
    checkpoints."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(driver, 0)
        except (ProcessLookupError, PermissionError):  # gone (or its pid reused by another user)
            os._exit(1)


class _Worker:
    def __init__(self, context) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, 1, os.getpid()),
                                       daemon=True)
        self.process.start()
        child.close()
        self.task: list[RunConfig] | None = None
        self.deadline = float("inf")

    def send(self, task: list[RunConfig], ckpt_dir: str, timeout: float | None) -> None:
        self.task = task
        self.deadline = time.monotonic() + timeout if timeout else float("inf")
        self.conn.send(([c.to_dict() for c in task], ckpt_dir))

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)


def run_tasks_locally(queue: TaskQueue, ckpt_dir: str, workers: int,
                      record: Callable[[RunResult], None], run_timeout: float | None = None
                      ) -> None:
    """Train the queue's tasks on `workers` processes until none is left or held elsewhere."""
    # forkserver: a clean process (no OpenMP threads to inherit) imports torch and the
    # trainer once; every worker, replacements included, is a cheap fork of it. The first
    # torch.optim optimizer imports torch._dynamo (~2 s here): preloaded too.
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["rankbias.runs.backends.tasks", "rankbias.training.ensemble",
                                    "torch._dynamo"])
    pool = [_Worker(context) for _ in range(max(1, min(workers, len(queue.pending))))]
    deaths_in_a_row = 0  # workers lost with no result in between: a broken set-up

    def fail(worker: _Worker, why: str) -> None:
        for cfg in worker.task:
            record(failed_result(cfg, why))
        worker.stop()
        pool[pool.index(worker)] = _Worker(context)

    try:
        while True:
            for worker in pool:
                if worker.task is None and (task := queue.next()) is not None:
                    try:
                        worker.send(task, ckpt_dir, run_timeout)
                    except OSError:  # found dead while idle: replace it, send again
                        worker.stop()
                        fresh = pool[pool.index(worker)] = _Worker(context)
                        fresh.send(task, ckpt_dir, run_timeout)
            busy = [w for w in pool if w.task is not None]
            if not busy:
                if not queue.waiting():
                    if not queue.pending:
                        return
                    continue
                time.sleep(POLL_S)  # runs held by another driver: wait for them
                queue.renew()
                continue
            deadline = min(w.deadline for w in busy)
            timeout = max(0.0, min(RENEW_S, deadline - time.monotonic()))
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout)
            queue.renew()
            for worker in busy:
                if worker.conn in ready and worker.conn.poll():
                    try:
                        results = worker.conn.recv()
                    except (EOFError, OSError):  # the worker died
                        results = None
                    if results is not None:
                        worker.task, deaths_in_a_row = None, 0
                        for result in results:
                            record(result)
                        continue
                if not worker.process.is_alive():
                    code = worker.process.exitcode
                    fail(worker, f"worker process died (exit code {code})")
                    deaths_in_a_row += 1
                    if deaths_in_a_row >= 3:
                        raise RankbiasError(
                            f"3 worker processes died in a row (exit code {code}) without "
                            "finishing a run; the other runs are left pending. Run the "
                            "sweep from a script file or the rankbias command (workers "
                            "re-import the main module), or check memory")
                elif time.monotonic() >= worker.deadline:
                    fail(worker, f"timed out after {run_timeout:g} s (--run-timeout); the "
                                 "worker was stopped")
    finally:
        for worker in pool:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
            worker.stop()
