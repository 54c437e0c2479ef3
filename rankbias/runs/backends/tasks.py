"""What every backend shares: the work of one task in a worker, and the driver's queue.

A task is a list of runs trained together (one run, or a stack of compatible runs). The
driver hands tasks out as workers free up, claiming each run in the store first, so any
number of drivers on one store train each run once; it renews its claims while they
train and waits for runs that another live driver holds (taking them over if it dies).
"""

from __future__ import annotations

import time
import traceback

from rankbias.runs.store import FINISHED, LEASE_S, Store
from rankbias.training.checkpoint import checkpoint_path
from rankbias.training.config import RunConfig
from rankbias.training.train import RunResult

RENEW_S = LEASE_S / 6  # how often a driver renews the claims of its runs in training
POLL_S = 2.0  # how often an idle driver looks at runs that another driver holds


def execute_task(configs: list[dict], checkpoint_dir: str | None) -> list[RunResult]:
    """Train one task in a worker; never raises. Each run continues from its checkpoint
    in `checkpoint_dir` when there is one. A run that raises becomes a `failed` result
    carrying the error, so the sweep goes on."""
    from rankbias.training.train import train_run

    cfgs = [RunConfig.from_dict(c) for c in configs]
    try:
        if len(cfgs) > 1:
            from rankbias.training.ensemble import train_ensemble

            return train_ensemble(cfgs, checkpoint_dir=checkpoint_dir)
        path = checkpoint_path(checkpoint_dir, cfgs[0].run_id())
        return [train_run(cfgs[0], checkpoint_path=path, resume=True)]
    except Exception as err:  # isolation: report, do not crash the worker
        message = f"{type(err).__name__}: {err}".splitlines()[0]
        detail = traceback.format_exc(limit=3)
        return [failed_result(c, f"{message}\n{detail}") for c in cfgs]


def failed_result(cfg: RunConfig, error: str) -> RunResult:
    now = time.time()
    return RunResult(run_id=cfg.run_id(), config=cfg.to_dict(), status="failed", error=error,
                     started=now, finished=now)


class TaskQueue:
    """The driver's tasks, handed out one at a time, each run claimed in the store first."""

    def __init__(self, store: Store, tasks: list[list[RunConfig]]) -> None:
        self.store = store
        self.pending = list(tasks)
        self.held: dict[str, RunConfig] = {}  # runs another live driver is training
        self.in_flight: dict[str, RunConfig] = {}  # runs this driver is training
        self.by_others = 0  # runs that another driver finished while this one waited
        self.renewed = time.monotonic()

    def next(self) -> list[RunConfig] | None:
        """The next task, reduced to the runs this driver could claim; None when none is
        left to claim now (see `waiting`)."""
        while self.pending:
            task = self.pending.pop(0)
            claimed = []
            for cfg in task:
                if self.store.claim(cfg.run_id(), cfg.to_dict()):
                    claimed.append(cfg)
                elif self.store.status(cfg.run_id()) in FINISHED:
                    self.by_others += 1
                else:
                    self.held[cfg.run_id()] = cfg
            if claimed:
                self.in_flight.update((c.run_id(), c) for c in claimed)
                return claimed
        return None

    def finished(self, run_id: str) -> None:
        self.in_flight.pop(run_id, None)

    def waiting(self) -> bool:
        """Whether runs held by other drivers are still unfinished. Runs whose driver died
        (claim lapsed) become tasks of this driver; finished ones are counted."""
        for run_id, cfg in list(self.held.items()):
            status = self.store.status(run_id)
            if status in FINISHED:
                del self.held[run_id]
                self.by_others += 1
            elif status != "running" or self.store.claim(run_id, cfg.to_dict()):
                del self.held[run_id]
                self.store.release([run_id])  # claimed again when its task is handed out
                self.pending.append([cfg])
        return bool(self.held) and not self.pending

    def renew(self, force: bool = False) -> None:
        """Renew this driver's claims every RENEW_S seconds (or now)."""
        if force or time.monotonic() - self.renewed >= RENEW_S:
            self.store.renew(list(self.in_flight))
            self.renewed = time.monotonic()

    def release(self) -> None:
        """Give back the claims of runs in flight (the sweep was interrupted)."""
        self.store.release(list(self.in_flight))
